"""The resource manifest: every namespace, link, bridge, route, rule, cgroup and process a run
creates is appended (and fsync'ed) to a JSONL file the moment it exists, so that
``cleanup_from_manifest`` can remove exactly those even after the orchestrator was SIGKILLed.

Nothing is ever found or removed by name pattern: only what a manifest line names. Processes are
identified by PID *and* their kernel start time, so a recycled PID is never signalled. And a line is
not enough (issue 15 item 6): a device, route or cgroup is removed only when its name carries the
tag of the run that journalled it (``Scope``: the ``run_tag`` / ``run_id`` the network notes before
creating anything), a link inside a host only when that host's namespace is the journal's own;
anything else a journal names (``docker0``, ``/sys/fs/cgroup/memory/system.slice``) is refused.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

# removal order: processes before the namespaces they live in, links before bridges, cgroups last
_ORDER = ("process", "iptables", "veth", "bridge", "route", "host", "cgroup", "socket_dir")
# on other machines, removed over SSH by ``testbed.backends.ssh.clean`` (``headroom clean`` calls both)
REMOTE_KINDS = ("remote",)


def proc_start_time(pid: int) -> Optional[int]:
    """Kernel start time (clock ticks since boot) of ``pid``, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def same_process(pid: Optional[int], start_time: Optional[int]) -> bool:
    return pid is not None and start_time is not None and proc_start_time(pid) == start_time


class Manifest:
    """Append-only JSONL of created resources (one object a line, with ``kind``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def add(self, kind: str, **fields) -> dict:
        entry = {"kind": kind, "t": time.time(), **fields}
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def add_process(self, pid: int, kind: str = "process", **fields) -> dict:
        return self.add(kind, pid=pid, start_time=proc_start_time(pid), **fields)

    def note(self, key: str, value) -> dict:
        """Run facts that are not resources (e.g. the delay mechanism used)."""
        return self.add("meta", key=key, value=value)

    def entries(self) -> list[dict]:
        return list(read_manifest(self.path))


def read_manifest(path: str | os.PathLike) -> Iterator[dict]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by SIGKILL mid-write: the resource was not created yet


def guard_metric(tag: str) -> int:
    """The metric of a run's unreachable guard route (``EmulatedNetwork``), derived from its tag."""
    return 1000 + int(tag, 16) % 60000


@dataclass(frozen=True)
class Scope:
    """What one journal may remove: names carrying its run's tags, links inside its own hosts."""

    tags: frozenset = frozenset()  # network tags: bridges and root-side veths are hr<tag>...
    run_ids: frozenset = frozenset()  # cgroups are headroom-<run_id>-<host> under a cgroup root
    netns: frozenset = frozenset()  # (pid, start_time) of the journal's hosts: links inside them are its own

    @classmethod
    def of(cls, entries: list[dict], tags=(), run_ids=()) -> "Scope":
        meta = [e for e in entries if e.get("kind") == "meta"]
        return cls(frozenset(tags) | {str(e["value"]) for e in meta if e.get("key") == "run_tag"},
                   frozenset(run_ids) | {str(e["value"]) for e in meta if e.get("key") == "run_id"},
                   frozenset((e.get("pid"), e.get("start_time")) for e in entries if e.get("kind") == "host"))

    def refusal(self, e: dict) -> Optional[str]:
        """Why ``e`` is not this run's to remove (None: it is)."""
        kind = e.get("kind")
        if kind in ("bridge", "veth") and not (kind == "veth" and e.get("netns_pid") is not None):
            ok = any(str(e.get("dev", "")).startswith(f"hr{t}") for t in self.tags)
            return None if ok else f"device {e.get('dev')!r} does not carry this run's tag (hr{'|'.join(self.tags) or '?'})"
        if kind in ("veth", "iptables"):
            ok = (e.get("netns_pid"), e.get("start_time")) in self.netns
            return None if ok else f"namespace of pid {e.get('netns_pid')} is not one of this run's hosts"
        if kind == "route":
            ok = any(e.get("route") == ["unreachable", e["route"][1], "metric", str(guard_metric(t))]
                     for t in self.tags) if isinstance(e.get("route"), list) and len(e["route"]) == 4 else False
            return None if ok else f"route {e.get('route')} is not this run's guard route"
        if kind == "cgroup":
            return _cgroup_refusal(e, self.run_ids)
        if kind == "socket_dir":
            path = Path(str(e.get("path")))
            ok = path.parent == Path("/tmp") and path.name.startswith("hr-")
            return None if ok else f"{path} is not a headroom socket directory (/tmp/hr-*)"
        return None  # processes and host shells: identified by PID and kernel start time


def _cgroup_refusal(e: dict, run_ids: frozenset) -> Optional[str]:
    from testbed.emulation.cgroups import V1_CPU, V1_MEMORY, V2_ROOTS, group_name

    path = Path(str(e.get("path")))
    names = {group_name(r, str(e.get("host"))) for r in run_ids}
    if path.parent in (V1_MEMORY, V1_CPU, *V2_ROOTS) and path.name in names:
        return None
    return f"cgroup {path} is not this run's (expected {' or '.join(sorted(names)) or 'headroom-<run_id>-<host>'} " \
           "under a cgroup root)"


def _run(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20).returncode == 0


def _link_exists(dev: str, netns_pid: Optional[int] = None) -> bool:
    argv = ["ip", "link", "show", "dev", dev]
    if netns_pid is not None:
        argv = ["nsenter", "-t", str(netns_pid), "-n", "--", *argv]
    return _run(argv)


def _kill(pid: int, start_time: Optional[int], group: bool = False) -> bool:
    if not same_process(pid, start_time) or _is_zombie(pid):
        return False  # gone, recycled, or already dead and only waiting to be reaped
    try:
        os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not same_process(pid, start_time) or _is_zombie(pid):
            break
        time.sleep(0.01)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _remove_process(e: dict) -> Optional[str]:
    if _kill(e["pid"], e.get("start_time"), group=e.get("group", False)):
        what = f" ({e['what']})" if e.get("what") else ""
        return f"killed process {e['pid']}{what}"
    return None


def _remove_host(e: dict) -> Optional[str]:
    # the host shell leads its own session; its namespace goes when its last process goes
    if _kill(e["pid"], e.get("start_time"), group=True):
        return f"killed host {e.get('name')} shell {e['pid']} (namespace released)"
    return None


def _remove_iptables(e: dict) -> Optional[str]:
    if not same_process(e.get("netns_pid"), e.get("start_time")):
        return None  # namespace already gone, and the rule with it
    from testbed.emulation.shaping import iptables_delete, in_netns

    if _run(in_netns(e["netns_pid"], iptables_delete(e["rule"]))):
        return f"deleted iptables rule in {e.get('host')}: {e['rule']}"
    return None


def _remove_veth(e: dict) -> Optional[str]:
    if e.get("netns_pid") is not None and not same_process(e["netns_pid"], e.get("start_time")):
        return None
    if _link_exists(e["dev"], e.get("netns_pid")):
        argv = ["ip", "link", "del", "dev", e["dev"]]
        if e.get("netns_pid") is not None:
            argv = ["nsenter", "-t", str(e["netns_pid"]), "-n", "--", *argv]
        if _run(argv):
            return f"deleted link {e['dev']} (with its qdiscs)"
    return None


def _remove_bridge(e: dict) -> Optional[str]:
    if _link_exists(e["dev"]) and _run(["ip", "link", "del", "dev", e["dev"]]):
        return f"deleted bridge {e['dev']}"
    return None


def _remove_route(e: dict) -> Optional[str]:
    argv = ["ip", "route", "del", *e["route"]]
    if _run(argv):
        return f"deleted route {' '.join(e['route'])}"
    return None


def _remove_cgroup(e: dict) -> Optional[str]:
    from testbed.core.cgroupfs import remove_group

    return f"removed cgroup {e['path']}" if remove_group(Path(e["path"])) else None


def _remove_socket_dir(e: dict) -> Optional[str]:
    """A private directory of control sockets: remove its sockets, then the (now empty) directory."""
    path = Path(e["path"])
    if not path.is_dir():
        return None
    for child in path.iterdir():
        if child.is_socket():
            child.unlink()
    path.rmdir()  # fails (and is reported) if something other than our sockets is inside
    return f"removed socket directory {path}"


_REMOVERS = {"process": _remove_process, "host": _remove_host, "iptables": _remove_iptables,
             "veth": _remove_veth, "bridge": _remove_bridge, "route": _remove_route,
             "cgroup": _remove_cgroup, "socket_dir": _remove_socket_dir}


def cleanup_entries(entries: list[dict], scope: Optional[Scope] = None) -> list[str]:
    """Remove the given resources (latest first within each kind) that are in ``scope`` (default:
    the one the entries' own meta lines give); return what was removed, and what was refused."""
    removed: list[str] = []
    errors: list[str] = []
    refused: list[str] = []
    scope = scope or Scope.of(entries)
    for kind in _ORDER:
        for e in reversed([e for e in entries if e.get("kind") == kind]):
            why = scope.refusal(e)
            if why is not None:
                refused.append(f"REFUSED: {kind} {why}: left alone")
                continue
            try:
                what = _REMOVERS[kind](e)
            except (OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                errors.append(f"{kind} {e}: {exc}")
                continue
            if what:
                removed.append(what)
    unknown = sorted({e.get("kind") for e in entries} - set(_ORDER) - set(REMOTE_KINDS) - {"meta"})
    errors += [f"unknown resource kind {k!r}: not removed" for k in unknown]
    if errors:
        removed.extend(f"FAILED: {msg}" for msg in errors)
    return removed + refused


def cleanup_from_manifest(path: str | os.PathLike) -> list[str]:
    """Idempotently remove exactly the resources ``path`` recorded; return one line per removal."""
    return cleanup_entries(list(read_manifest(path)))
