"""Starting the net check's probes inside emulated hosts (``python -m testbed.emulation.netprobe``),
collecting their output, and what disturbed this VM while they ran (hypervisor steal, CPU wait)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _py(net, host: str, args: list[str], **kw) -> subprocess.Popen:
    return net.popen_in_host(host, [sys.executable, "-m", "testbed.emulation.netprobe", *args], cgroup=False,
                             cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out, err


def host_counters() -> tuple[float, float, float]:
    """(monotonic seconds, CPU time the hypervisor stole from this VM in s summed over CPUs, time in
    s some task waited for a CPU: ``/proc/pressure/cpu``; 0 where the kernel has no PSI)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    steal = int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
        waited = int(some.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        waited = 0.0
    return time.monotonic(), steal, waited


def host_disturbance(before: tuple[float, float, float]) -> dict:
    """What disturbed this VM since ``before`` (``host_counters``): the share of CPU time stolen
    by the hypervisor (per CPU) and the share of time some task waited for a CPU. A shaper's
    timer and the sender both need a CPU on time; a rate that misses with these high says more
    about the host than about the shaping."""
    t1, steal1, wait1 = host_counters()
    span = max(t1 - before[0], 1e-9)
    return {"steal_pct": round(100 * (steal1 - before[1]) / span / (os.cpu_count() or 1), 2),
            "cpu_wait_pct": round(100 * (wait1 - before[2]) / span, 2)}
