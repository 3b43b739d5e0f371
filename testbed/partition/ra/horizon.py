"""RA's memory horizon (issue 19): size blocks for a few epochs of KV growth, or for the end of the run.

A plan sized for ``headroom_epochs`` of KV growth is faster than one sized for the end of the run
only until it stops fitting: the KV growth is linear, so that context ``c*`` is exact
(``common.fits_until``). From there on it must become a plan that fits the end of the run anyway
(no faster than the end-sized plan RA found) and pay the migration that gets it there. So the
end-sized plan is taken when what the epoch-sized plan gains before ``c*``,
``(c* - T) x (latency_end - latency_epochs)``, is at most a LOWER BOUND on that migration: every
device's overflow at the end of the run (its bytes at the final context beyond its budget) must
leave it, at best over its fastest path (latency + bytes / rate), senders in parallel. The bound
ignores the latency the repaired plan loses, so the rule leans to the epoch-sized plan; it picks
the end-sized plan where the overflow is large against the gain (kv_growth: ~2.3 s gained vs
>= 4.6 s of moves) and keeps the fast plan where the overflow is a few heads (memory_squeeze).
Pure functions of a ``Problem`` and two placements.
"""
from __future__ import annotations

import numpy as np

from testbed.partition.common import Problem, fits_until
from testbed.partition.cost.latency import memory
from testbed.partition.ra.choice import plan_cost
from testbed.core.placement import Placement


def overflow_migration_s(prob: Problem, pl: Placement, context_len: int) -> float:
    """Lower bound on the migration delay that makes ``pl`` fit at ``context_len``: per device, its
    bytes beyond its budget over its fastest path to another allowed device; senders in parallel."""
    mem = memory(pl, prob.snap, prob.dims, prob.cost_model, context_len)
    worst = 0.0
    for j, dev in enumerate(prob.snap.devices):
        over = mem.get(dev.name, 0) - dev.mem_budget_bytes
        if over <= 0:
            continue
        others = prob.allowed & (np.arange(len(prob.names)) != j)
        t = prob.lat[j, others] + over * prob.spb[j, others]
        worst = max(worst, float(t.min()) if t.size else float("inf"))
    return worst


def prefer_end_sized(prob_ep: Problem, pl_ep: Placement, prob_end: Problem, pl_end: Placement) -> tuple[bool, dict]:
    """(take the end-sized plan?, the numbers behind it for the plan's meta); module docstring."""
    snap = prob_ep.snap
    T, T_end = snap.context_len, int(snap.end_context_len)
    fit = fits_until(pl_ep, snap, prob_ep.dims, prob_ep.cost_model, T)
    lat_ep = plan_cost(prob_ep, pl_ep).token_latency_s
    lat_end = plan_cost(prob_end, pl_end).token_latency_s
    gain = max(0.0, min(fit, T_end) - T) * max(0.0, lat_end - lat_ep)
    moves = overflow_migration_s(prob_ep, pl_ep, T_end)
    return gain <= moves, {"epochs_plan_gain_s": round(gain, 6), "epochs_plan_min_migration_s": round(moves, 6)}
