"""The cgroup filesystem as one machine sees it: where the v1 memory/cpu hierarchies and a v2 root
are, which one is usable, and removing one of our groups (killing what is left in it first).

Standard library only and importing nothing of the project: the SSH backend's device helper
carries this module to devices that have no Headroom installed (``testbed.backends.ssh.helper``),
and the local cgroups (``testbed.emulation.cgroups``) and clean-up (``testbed.emulation.cleanup``)
use the same functions on this machine.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

V1_MEMORY = Path("/sys/fs/cgroup/memory")
V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


def v1_usable() -> bool:
    return (V1_MEMORY / "memory.limit_in_bytes").exists() and (V1_CPU / "cpu.cfs_quota_us").exists()


def v2_root() -> Optional[Path]:
    """The first unified root whose controllers include memory and cpu, or None."""
    for root in V2_ROOTS:
        try:
            ctrls = (root / "cgroup.controllers").read_text().split()
        except OSError:
            continue
        if "memory" in ctrls and "cpu" in ctrls:
            return root
    return None


def detect_version() -> Optional[str]:
    """'v1' when the v1 memory and cpu hierarchies exist, 'v2' when a unified root offers both."""
    if v1_usable():
        return "v1"
    if v2_root() is not None:
        return "v2"
    return None


def remove_group(path: Path, tries: int = 50, pause_s: float = 0.05) -> bool:
    """Kill the processes left in the group ``path`` (we placed them there), then remove it. False
    when it did not exist; ``OSError`` when it stays busy after ``tries`` attempts."""
    path = Path(path)
    if not path.is_dir():
        return False
    for _ in range(tries):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return True
        except OSError:
            time.sleep(pause_s)
    raise OSError(f"cannot remove cgroup {path}: still busy")
