"""How an emulated host is made as slow as its device: the CPU emulation modes, as pure decisions.

``cpu_cores`` of a host is its speed as a share of one of this machine's cores. Three ways to get it:

- ``pace`` (default): the agent computes at full speed and holds each block's result until
  ``cpu_time / speed`` has passed (``node_agent.pacing``); the cgroup's CPU cap is relaxed to the
  machine's cores so that the worker thread is never throttled mid-block. No period artefacts, and
  a host is immune to other processes' load as long as the block itself fits in its paced time.
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

MODES = ("pace", "cfs-short", "cfs")
MIN_QUOTA_US = 1000  # the kernel refuses a smaller cfs quota
MAX_PERIOD_US = 1_000_000


def shortest_period_us(cores: float) -> int:
    """The shortest CFS period whose quota for ``cores`` is still >= 1 ms (at least 1 ms itself)."""
    return min(MAX_PERIOD_US, max(MIN_QUOTA_US, math.ceil(MIN_QUOTA_US / cores)))


def cgroup_cpu(mode: str, cores: float) -> tuple[float, int]:
    """(cores the cgroup's quota grants, its period in µs) for a host of ``cores`` under ``mode``."""
    if mode == "pace":
        return float(max(1, os.cpu_count() or 1)), CFS_PERIOD_US
    if mode == "cfs-short":
        return cores, shortest_period_us(cores)
    if mode == "cfs":
        return cores, CFS_PERIOD_US
    raise ValueError(f"unknown cpu emulation {mode!r} (known: {', '.join(MODES)})")


def pace_speed(mode: str, cores: float) -> float | None:
    """The agent's pacing speed (fraction of one core, the worker's one thread), None = not paced."""
    if mode != "pace":
        return None
    return min(1.0, float(cores))
