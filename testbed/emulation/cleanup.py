"""The resource manifest: every namespace, link, bridge, route, rule, cgroup and process a run
creates is appended (and fsync'ed) to a JSONL file the moment it exists, so that
``cleanup_from_manifest`` can remove exactly those even after the orchestrator was SIGKILLed.

Nothing is ever found or removed by name pattern: only what a manifest line names. Processes are
identified by PID *and* their kernel start time, so a recycled PID is never signalled.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
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
    path = Path(e["path"])
    if not path.is_dir():
        return None
    for _ in range(50):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:  # processes we placed in our own cgroup
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return f"removed cgroup {path}"
        except OSError:
            time.sleep(0.05)
    raise OSError(f"cannot remove cgroup {path}: still busy")


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


def cleanup_entries(entries: list[dict]) -> list[str]:
    """Remove the given resources (latest first within each kind); return what was removed."""
    removed: list[str] = []
    errors: list[str] = []
    for kind in _ORDER:
        for e in reversed([e for e in entries if e.get("kind") == kind]):
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
    return removed


def cleanup_from_manifest(path: str | os.PathLike) -> list[str]:
    """Idempotently remove exactly the resources ``path`` recorded; return one line per removal."""
    return cleanup_entries(list(read_manifest(path)))
