"""Per-host memory and CPU limits with cgroup v1 (memory + cpu hierarchies) or v2 (unified).

Groups are named ``headroom-<run>-<host>``. Builders return ``(file, value)`` writes and are pure;
``HostCgroup`` applies them, places PIDs (the controller does this: cgroups are not visible inside
a Mininet host), reads usage/peak/OOM-kill counters, and lowers a limit below current usage by
reclaiming first (v1: ``memory.force_empty``; v2: ``memory.high``) or raising ``CgroupError``.
"""
from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from testbed.core.cgroupfs import V1_CPU, V1_MEMORY, V2_ROOTS, detect_version, v2_root  # noqa: F401 (re-exported)
from testbed.core.errors import BackendError

CFS_PERIOD_US = 100_000
MIB = 1024 * 1024


class CgroupError(BackendError):
    """A cgroup could not be created, limited or read."""


def group_name(run_id: str, host: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return f"headroom-{safe}-{host}"


# --------------------------------------------------------------------------- pure builders
def cpu_quota_us(cores: float, period_us: int = CFS_PERIOD_US) -> int:
    if cores <= 0:
        raise ValueError(f"cpu_cores must be > 0, got {cores}")
    return max(1000, int(round(cores * period_us)))


def memory_limit_writes(version: str, limit_bytes: int) -> list[tuple[str, str]]:
    if version == "v1":
        return [("memory", "memory.limit_in_bytes", str(int(limit_bytes)))]
    return [("unified", "memory.max", str(int(limit_bytes))), ("unified", "memory.swap.max", "0")]


def cpu_limit_writes(version: str, cores: float, period_us: int = CFS_PERIOD_US) -> list[tuple[str, str, str]]:
    quota = cpu_quota_us(cores, period_us)
    if version == "v1":
        return [("cpu", "cpu.cfs_period_us", str(period_us)), ("cpu", "cpu.cfs_quota_us", str(quota))]
    return [("unified", "cpu.max", f"{quota} {period_us}")]


def setup_writes(version: str) -> list[tuple[str, str, str]]:
    """Settings applied once after creation: no swap, OOM killer on (v1)."""
    if version == "v1":
        return [("memory", "memory.swappiness", "0"), ("memory", "memory.oom_control", "0")]
    return []


def v2_subtree_enable(subtree_control: str) -> Optional[str]:
    """What to write to the v2 root's ``cgroup.subtree_control`` so that its children get memory.max
    and cpu.max (``"+memory +cpu"``, or only the missing one); None when both are on already. A
    root without them (a plain v2 kernel without systemd's delegation) would otherwise fail every
    limit write with ENOENT."""
    on = set(subtree_control.split())
    missing = [c for c in ("memory", "cpu") if c not in on]
    return " ".join(f"+{c}" for c in missing) or None


def parse_oom_kills(version: str, text: str) -> int:
    """``oom_kill N`` from v1 memory.oom_control or v2 memory.events."""
    m = re.search(r"^oom_kill (\d+)$", text, flags=re.M)
    return int(m.group(1)) if m else 0


@dataclass
class OomEvent:
    host: str
    usage_bytes: int
    oom_kills: int
    t: float


# --------------------------------------------------------------------------- one host's group
class HostCgroup:
    def __init__(self, run_id: str, host: str, version: Optional[str] = None, manifest=None):
        self.host, self.run_id = host, run_id
        self.name = group_name(run_id, host)
        self.version = version or detect_version()
        if self.version is None:
            raise CgroupError("no usable cgroup memory+cpu controllers (neither v1 nor v2)")
        self.manifest = manifest
        if self.version == "v1":
            self.dirs = {"memory": V1_MEMORY / self.name, "cpu": V1_CPU / self.name}
        else:
            self.dirs = {"unified": v2_root() / self.name}
        self._seen_ooms = 0

    def create(self) -> "HostCgroup":
        if self.version == "v2":
            self._enable_v2_controllers()
        for d in self.dirs.values():
            try:
                self._mkdir(d)
            except FileExistsError:
                raise CgroupError(f"{d} already exists (another run with id {self.name}?)") from None
            if self.manifest is not None:
                self.manifest.add("cgroup", path=str(d), host=self.host)
        for w in setup_writes(self.version):
            self._write(*w, quiet=True)
        return self

    def _enable_v2_controllers(self) -> None:
        ctl = self.dirs["unified"].parent / "cgroup.subtree_control"
        try:
            want = v2_subtree_enable(ctl.read_text())
            if want:
                ctl.write_text(want)
        except OSError as exc:
            raise CgroupError(f"{ctl}: cannot enable the memory and cpu controllers for child groups "
                              f"({os.strerror(exc.errno)})") from exc

    # file access: the only methods that touch the cgroup filesystem (the SSH backend's remote
    # groups override these three and reuse everything else)
    def _mkdir(self, d: Path) -> None:
        d.mkdir()

    def _write_raw(self, ctrl: str, file: str, value: str) -> None:
        (self.dirs[ctrl] / file).write_text(value)

    def _read(self, ctrl: str, file: str) -> str:
        return (self.dirs[ctrl] / file).read_text()

    def _write(self, ctrl: str, file: str, value: str, quiet: bool = False) -> None:
        try:
            self._write_raw(ctrl, file, value)
        except OSError as exc:
            if quiet:
                return
            raise CgroupError(f"{self.dirs[ctrl] / file} <- {value}: {os.strerror(exc.errno)}") from exc

    def set_memory(self, limit_bytes: int) -> int:
        """Set the memory limit; reclaim first when usage is above it. Returns the limit read back."""
        limit_bytes = int(limit_bytes)
        if self.version == "v2":
            self._write("unified", "memory.high", str(limit_bytes))  # throttles + reclaims first
            for w in memory_limit_writes("v2", limit_bytes):
                self._write(*w, quiet=w[1] == "memory.swap.max")
            self._write("unified", "memory.high", "max")
            return self.memory_limit()
        try:
            self._write_raw("memory", "memory.limit_in_bytes", str(limit_bytes))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"{self.name}: memory limit {limit_bytes}: {os.strerror(exc.errno)}") from exc
            self._reclaim_then_set(limit_bytes)
        return self.memory_limit()

    def _reclaim_then_set(self, limit_bytes: int) -> None:
        for _ in range(3):
            self._write("memory", "memory.force_empty", "0", quiet=True)
            try:
                self._write_raw("memory", "memory.limit_in_bytes", str(limit_bytes))
                return
            except OSError:
                time.sleep(0.05)
        raise CgroupError(f"{self.name}: cannot lower memory limit to {limit_bytes} B: usage is "
                          f"{self.usage_bytes()} B and could not be reclaimed (EBUSY)")

    def set_cpu(self, cores: float, period_us: int = CFS_PERIOD_US) -> float:
        for w in cpu_limit_writes(self.version, cores, period_us):
            self._write(*w)
        return self.cpu_cores()

    def add_pid(self, pid: int) -> None:
        for ctrl in self.dirs:
            self._write(ctrl, "cgroup.procs", str(int(pid)))

    def pids(self) -> list[int]:
        ctrl = "memory" if self.version == "v1" else "unified"
        return [int(p) for p in self._read(ctrl, "cgroup.procs").split()]

    def memory_limit(self) -> int:
        if self.version == "v1":
            return int(self._read("memory", "memory.limit_in_bytes"))
        text = self._read("unified", "memory.max").strip()
        return -1 if text == "max" else int(text)

    def cpu_cores(self) -> float:
        if self.version == "v1":
            quota, period = int(self._read("cpu", "cpu.cfs_quota_us")), int(self._read("cpu", "cpu.cfs_period_us"))
        else:
            q, p = self._read("unified", "cpu.max").split()
            quota, period = (-1 if q == "max" else int(q)), int(p)
        return -1.0 if quota < 0 else quota / period

    def usage_bytes(self) -> int:
        if self.version == "v1":
            return int(self._read("memory", "memory.usage_in_bytes"))
        return int(self._read("unified", "memory.current"))

    def peak_bytes(self) -> int:
        if self.version == "v1":
            return int(self._read("memory", "memory.max_usage_in_bytes"))
        try:
            return int(self._read("unified", "memory.peak"))
        except OSError:
            return self.usage_bytes()

    def reset_peak(self) -> None:
        if self.version == "v1":
            self._write("memory", "memory.max_usage_in_bytes", "0", quiet=True)
        else:
            self._write("unified", "memory.peak", "0", quiet=True)  # kernels >= 6.12

    def oom_kills(self) -> int:
        if self.version == "v1":
            return parse_oom_kills("v1", self._read("memory", "memory.oom_control"))
        return parse_oom_kills("v2", self._read("unified", "memory.events"))

    def failcnt(self) -> int:
        if self.version == "v1":
            return int(self._read("memory", "memory.failcnt"))
        m = re.search(r"^max (\d+)$", self._read("unified", "memory.events"), flags=re.M)
        return int(m.group(1)) if m else 0

    def poll_oom(self) -> Optional[OomEvent]:
        """A new OOM kill since the last poll, with the usage read right now."""
        kills = self.oom_kills()
        if kills > self._seen_ooms:
            self._seen_ooms = kills
            return OomEvent(self.host, self.usage_bytes(), kills, time.time())
        return None

    def stats(self) -> dict:
        return {"host": self.host, "version": self.version, "memory_limit_bytes": self.memory_limit(),
                "usage_bytes": self.usage_bytes(), "peak_bytes": self.peak_bytes(),
                "oom_kills": self.oom_kills(), "failcnt": self.failcnt(), "cpu_cores": self.cpu_cores()}

    def remove(self) -> None:
        from testbed.emulation.cleanup import Scope, cleanup_entries

        cleanup_entries([{"kind": "cgroup", "path": str(d), "host": self.host} for d in self.dirs.values()],
                        Scope(run_ids=frozenset({self.run_id})))


class CgroupSet:
    """All hosts' groups of one run."""

    def __init__(self, run_id: str, manifest=None, version: Optional[str] = None):
        self.run_id, self.manifest = run_id, manifest
        self.version = version or detect_version()
        self.groups: dict[str, HostCgroup] = {}

    def create(self, host: str, mem_limit_mib: float, cpu_cores: float, period_us: int = CFS_PERIOD_US) -> HostCgroup:
        g = HostCgroup(self.run_id, host, self.version, self.manifest).create()
        self.groups[host] = g
        g.set_memory(int(mem_limit_mib * MIB))
        g.set_cpu(cpu_cores, period_us)
        return g

    def __getitem__(self, host: str) -> HostCgroup:
        return self.groups[host]

    def poll_oom(self) -> list[tuple[str, int]]:
        """(host, usage_bytes at the time) for each host with a new OOM kill since the last poll."""
        events = [g.poll_oom() for g in self.groups.values()]
        return [(e.host, e.usage_bytes) for e in events if e is not None]

    def remove_all(self) -> None:
        for g in self.groups.values():
            g.remove()
        self.groups.clear()
