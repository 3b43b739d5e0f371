"""Compute-time pacing: how an agent on this machine computes like a slower device.

A block runs at this machine's full speed on the agent's worker thread; the pacer then holds the
result until the block's time *on the emulated device* has passed since it started:

    release = start + cpu_time / speed

where ``cpu_time`` is the worker thread's own CPU time for the block (``time.thread_time``, so other
processes on this machine, or a preemption in the middle of the block, do not count) and ``speed``
is the device's speed as a fraction of one of this machine's cores (``cpu_cores`` of the host, at
most 1: the worker computes on one thread). This replaces a CFS quota, which lets a capped host
compute in bursts and then stall until the next period (100 ms by default; at least 1 ms of quota
per period on this kernel, so 20 ms for a 0.05-core host) — the artefact that made head-split plans
run 3-5x their prediction. Under pacing every block takes its own share, not a period's.

``speed = None`` is no pacing (compute as fast as the machine, as before). The pacer keeps the last
calls' timings so the agent can report its compute fidelity (``stats()``): the spread of identical
blocks' paced times and how often a block was late (its wall time already beyond its paced time,
e.g. when this machine was so loaded that the block itself took longer than the device would).
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

import numpy as np

HISTORY = 4096  # calls kept for the fidelity figures


class ComputePacer:
    """One per agent; used only from the worker thread (``paced()`` reads that thread's CPU clock)."""

    def __init__(self, speed: float | None = None):
        self.speed: float | None = None
        self.set_speed(speed)
        self._calls: deque = deque(maxlen=HISTORY)  # (kind, cpu_s, wall_s, paced_s)

    def set_speed(self, speed: float | None) -> None:
        if speed is not None and not (0.0 < float(speed) <= 1.0):
            raise ValueError(f"pacing speed must be in (0, 1] of one core, got {speed}")
        self.speed = None if speed is None else float(speed)

    @contextmanager
    def paced(self, kind: str = "block"):
        """Run the body at full speed, then hold until ``start + cpu_time / speed``."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        yield
        cpu = time.thread_time() - cpu0
        wall = time.perf_counter() - wall0
        if self.speed is not None:
            target = wall0 + cpu / self.speed
            hold = target - time.perf_counter()
            if hold > 0:
                time.sleep(hold)
        self._calls.append((kind, cpu, wall, time.perf_counter() - wall0))

    def clear(self) -> None:
        self._calls.clear()

    def stats(self) -> dict:
        """Per block kind: calls, median and p95 of the paced time, p95/median, late fraction."""
        out: dict = {"speed": self.speed, "kinds": {}}
        kinds: dict[str, list] = {}
        for kind, cpu, wall, paced in self._calls:
            kinds.setdefault(kind, []).append((cpu, wall, paced))
        for kind, rows in kinds.items():
            a = np.asarray(rows)  # (n, 3): cpu, wall, paced
            target = a[:, 0] / self.speed if self.speed else a[:, 1]
            med, p95 = float(np.median(a[:, 2])), float(np.percentile(a[:, 2], 95))
            out["kinds"][kind] = {
                "calls": len(rows), "median_s": med, "p95_s": p95, "p95_over_median": p95 / med if med > 0 else None,
                "cpu_median_s": float(np.median(a[:, 0])),
                # a call is late when it ended more than 10 % (or 0.2 ms) after its paced release
                "late_fraction": float(np.mean(a[:, 2] > np.maximum(target * 1.1, target + 2e-4))),
            }
        return out
