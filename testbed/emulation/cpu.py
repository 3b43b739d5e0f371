"""How an emulated host is made as slow as its device: the CPU emulation modes, as pure decisions.

``cpu_cores`` of a host is its speed as a share of one of this machine's cores. Four ways to get it:

- ``pace`` (default): the agent computes at full speed and holds each block's result until the
  emulated device's roofline time for it has passed (``node_agent.pacing.DeviceClock``); the device
  is this machine's measured one-core roofline (``node_agent.machine``) scaled by ``cpu_cores``.
  The cgroup's CPU cap is relaxed to the machine's cores so that the worker is never throttled
  mid-block. No period artefacts, immune to other processes' load and to cache state as long as
  the block itself fits in its device time, and exactly the time the cost model predicts.
- ``pace-cpu``: the same hold, but until ``cpu_time / cpu_cores`` (the worker thread's own CPU time
  scaled): immune to load, not to cache state — kept as the measured alternative.
- ``cfs-short``: a CFS quota with the shortest period this kernel allows for the share (the quota
  must be at least 1 ms, so a 0.05-core host gets a 20 ms period). Shrinks the burst artefact.
- ``cfs``: a CFS quota with the kernel's default 100 ms period (the first round's behaviour): a
  capped host computes in bursts and waits for the next period.

``testbed.emulation.network`` applies the cgroup side; ``testbed.backends.emulated`` tells each agent
its pacing speed.
"""
from __future__ import annotations

import math
import os

from testbed.emulation.cgroups import CFS_PERIOD_US

MODES = ("pace", "pace-cpu", "cfs-short", "cfs")
PACED = ("pace", "pace-cpu")
MIN_QUOTA_US = 1000  # the kernel refuses a smaller cfs quota
MAX_PERIOD_US = 1_000_000


def shortest_period_us(cores: float) -> int:
    """The shortest CFS period whose quota for ``cores`` is still >= 1 ms (at least 1 ms itself)."""
    return min(MAX_PERIOD_US, max(MIN_QUOTA_US, math.ceil(MIN_QUOTA_US / cores)))


def cgroup_cpu(mode: str, cores: float) -> tuple[float, int]:
    """(cores the cgroup's quota grants, its period in µs) for a host of ``cores`` under ``mode``."""
    if mode in PACED:
        return float(max(1, os.cpu_count() or 1)), CFS_PERIOD_US
    if mode == "cfs-short":
        return cores, shortest_period_us(cores)
    if mode == "cfs":
        return cores, CFS_PERIOD_US
    raise ValueError(f"unknown cpu emulation {mode!r} (known: {', '.join(MODES)})")


def pacing_for(mode: str, cores: float, machine: dict | None = None) -> dict:
    """The ``pace`` command for a host of ``cores`` under ``mode``: ``{"clock": {...}}`` (the device's
    roofline, ``machine``'s one-core figures scaled by ``min(1, cores)`` — the worker computes on one
    thread), ``{"speed": s}`` (pace-cpu) or ``{"speed": None}`` (not paced: the cgroup limits it)."""
    if mode not in MODES:
        raise ValueError(f"unknown cpu emulation {mode!r} (known: {', '.join(MODES)})")
    s = min(1.0, float(cores))
    if mode == "pace":
        if machine is None:
            raise ValueError("cpu emulation 'pace' needs the machine's measured roofline")
        return {"clock": {"flops_per_s": machine["flops_per_s"] * s, "bytes_per_s": machine["bytes_per_s"] * s,
                          "call_s": machine["call_s"] / s}}
    return {"speed": s if mode == "pace-cpu" else None}
