"""Compute-time pacing: how an agent on this machine computes like a slower device.

A block runs at this machine's full speed on the agent's worker thread; the pacer then holds the
result until the block's time *on the emulated device* has passed since it started. Two clocks:

- ``DeviceClock`` (``pace``, the default): the device's time for the block is its roofline,
  ``max(FLOPs / flops_per_s, bytes read / bytes_per_s) + call_s`` (decode on edge CPUs is
  memory-bound; the call term is the fixed cost of one block call on the device). The block's FLOPs
  and bytes come from ``testbed.partition.cost.blocks.call_work`` — the very numbers the cost models
  use, timed by the cost model's own ``testbed.partition.cost.roofline`` — so the emulated device
  spends exactly the time the planner's model says, whatever this machine's load or cache state.
  This is the classic compute-then-hold emulation of a slower processor.
- ``speed`` (``pace-cpu``): release at ``start + cpu_time / speed``, the worker thread's own CPU
  time scaled by a fraction of one of this machine's cores. Kept as the measured alternative:
  a block's CPU time here depends on what the cache holds (a layer's blocks run alone take half
  the CPU they take in a decode that streams every layer), so it misses the cost model by up to
  36 % on tensor-parallel plans (``bench/bench_agents.py``).

Both replace a CFS quota, which lets a capped host compute in bursts and then stall until the next
period (100 ms by default; at least 1 ms of quota per period on this kernel, so 20 ms for a
0.05-core host) — the artefact that made head-split plans run 3-5x their prediction.

A block is *late* when this machine itself took longer than the device's time (the device is
faster than this machine, or the machine was overloaded); it is then released when done and
counted in ``stats()``, which also reports each kind's paced time relative to its device time.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import statistics

from node_agent.inbox import lower_timer_slack
from testbed.partition.cost.roofline import matvec_rate, roofline_s

HISTORY = 4096  # calls kept for the fidelity figures
SPIN_S = 5e-5  # the last part of a hold is spun: a sleep overshoots by ~20 us even at 1 ns timer slack


@dataclass(frozen=True)
class DeviceClock:
    """An emulated device's speed: sustained FLOP/s, memory bandwidth (bytes/s), seconds per call."""

    flops_per_s: float
    bytes_per_s: float
    call_s: float = 0.0

    def __post_init__(self):
        if not (self.flops_per_s > 0 and self.bytes_per_s > 0 and self.call_s >= 0):
            raise ValueError(f"device clock needs positive FLOP/s and bytes/s and call_s >= 0, got {self}")

    def time_s(self, flops: float, nbytes: float, calls: int = 1) -> float:
        """The roofline time of ``calls`` block calls doing ``flops`` and reading ``nbytes`` in all
        (``calls = 0``: elementwise work folded into its neighbour, e.g. summing FFN partials)."""
        return roofline_s(flops, nbytes, self.flops_per_s, self.bytes_per_s, self.call_s, calls)

    def matvec_flops_per_s(self, bytes_per_param: float) -> float:
        """The FLOP/s of a batch-1 matrix-vector product in this roofline (2 FLOPs per weight read):
        the one rate a FLOPs-only cost model needs for decode blocks."""
        return matvec_rate(self.flops_per_s, self.bytes_per_s, bytes_per_param)

    def scaled(self, speed: float) -> "DeviceClock":
        """A device ``speed`` times as fast (rates times, call cost over ``speed``)."""
        return DeviceClock(self.flops_per_s * speed, self.bytes_per_s * speed, self.call_s / speed)

    def to_dict(self) -> dict:
        return asdict(self)


class ComputePacer:
    """One per agent; used only from the worker thread (``paced()`` reads that thread's CPU clock)."""

    def __init__(self, speed: float | None = None, clock: DeviceClock | None = None):
        self.speed: float | None = None
        self.clock: DeviceClock | None = clock
        self.set_speed(speed)
        self._calls: deque = deque(maxlen=HISTORY)  # (kind, cpu_s, wall_s, paced_s, target_s)
        self._slack_lowered = False

    def set_speed(self, speed: float | None) -> None:
        if speed is not None and not (0.0 < float(speed) <= 1.0):
            raise ValueError(f"pacing speed must be in (0, 1] of one core, got {speed}")
        self.speed = None if speed is None else float(speed)

    def set_clock(self, clock: DeviceClock | dict | None) -> None:
        self.clock = DeviceClock(**clock) if isinstance(clock, dict) else clock

    @property
    def mode(self) -> str:
        return "device" if self.clock is not None else ("cpu" if self.speed is not None else "none")

    @contextmanager
    def paced(self, kind: str = "block", flops: float = 0.0, nbytes: float = 0.0, calls: int = 1):
        """Run the body at full speed, then hold until its start plus the emulated device's time."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        yield
        cpu = time.thread_time() - cpu0
        wall = time.perf_counter() - wall0
        if self.clock is not None:
            target = self.clock.time_s(flops, nbytes, calls)
        elif self.speed is not None:
            target = cpu / self.speed
        else:
            target = wall
        self._hold_until(wall0 + target)
        self._calls.append((kind, cpu, wall, time.perf_counter() - wall0, target))

    def _hold_until(self, release: float) -> None:
        if not self._slack_lowered:  # the worker thread's timer slack (50 us by default)
            self._slack_lowered = lower_timer_slack() or True
        hold = release - time.perf_counter()
        if hold > SPIN_S:
            time.sleep(hold - SPIN_S)
        while time.perf_counter() < release:
            pass

    def clear(self) -> None:
        self._calls.clear()

    def stats(self) -> dict:  # pure Python: a first numpy call in an agent charges ~6 MiB to its cgroup
        """Per block kind: calls, median / p95 of the paced time, the paced time over the device's
        time (p50, p95: 1.0 is exact), the full-speed CPU time, and how often a call was late."""
        out: dict = {"mode": self.mode, "speed": self.speed,
                     "clock": self.clock.to_dict() if self.clock else None, "kinds": {}}
        kinds: dict[str, list] = {}
        for kind, *row in self._calls:
            kinds.setdefault(kind, []).append(row)
        for kind, rows in kinds.items():
            paced = [r[2] for r in rows]
            rel = [r[2] / max(r[3], 1e-9) for r in rows]
            med, p95 = statistics.median(paced), quantile(paced, 0.95)
            out["kinds"][kind] = {
                "calls": len(rows), "median_s": med, "p95_s": p95,
                "p95_over_median": p95 / med if med > 0 else None,
                "paced_over_device_p50": statistics.median(rel), "paced_over_device_p95": quantile(rel, 0.95),
                "cpu_median_s": statistics.median(r[0] for r in rows),
                # late: this machine's own compute ran past the device's time by > 10 % (or 0.2 ms)
                "late_fraction": sum(r[1] > max(r[3] * 1.1, r[3] + 2e-4) for r in rows) / len(rows),
            }
        return out


def quantile(values, q: float) -> float:
    """The ``q`` quantile of ``values``, linear between order statistics (numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)
