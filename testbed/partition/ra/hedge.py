"""RA step 4d: do not bet on links staying fast (issue 12 item 6, fluctuating networks).

A plan that splits layers across devices trades compute for messages. Near the regime boundary
its gain over keeping whole layers together is small, and it is a bet that the links stay as fast
as the snapshot measured them: when they slow down, the split loses, and moving the weights back
over the slowed links rarely pays within the horizon. On the regime map (fluctuating scenario:
every link wanders between 0.2x and 1x its rate) RA's first plan at R just above the boundary
was 8-14 % slower than the one-device plan of the baselines over 10 repetitions (significant),
while in the static scenario the same plan was 11-13 % faster.

The rule (minimax relative regret over two futures, restricted so RA never gives up more than the
portfolio's slack against the baselines' best plan at today's rates):
  * futures: the links as measured now, and every path's rate times ``frac`` (``rate_hedge``,
    default 0.5: "the links halve"); delays unchanged;
  * admissible: the candidates whose objective (latency + migration delay / H) now is at most
    ``1 + slack`` times the best BASELINE candidate's (EdgeShard's layer split, Galaxy's
    tensor-parallel splits) — so in a static network RA is never more than ``slack`` slower than
    a plan a baseline would have chosen;
  * among them, the plan minimising ``max(obj_now / best_now, obj_slow / best_slow)`` (its worse
    relative regret over the two futures), ties to the lower objective now.
A plan whose gain survives the links halving keeps its place; a marginal bet is traded for the
robust plan a baseline would have made. Pure functions.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from testbed.core.paths import PathMatrix
from testbed.core.placement import Placement
from testbed.core.snapshot import ClusterSnapshot, LinkState
from testbed.partition.common import Problem, evaluate
from testbed.partition.cost.latency import Net
from testbed.partition.cost.migration import planner_delay


def slowed(snapshot: ClusterSnapshot, frac: float) -> ClusterSnapshot:
    """``snapshot`` with every path's rate multiplied by ``frac`` (latencies and devices unchanged)."""
    paths = snapshot.paths
    if isinstance(paths, PathMatrix):
        scaled = PathMatrix(paths.names, paths.bandwidth * frac, paths.latency, paths.up)
    else:
        scaled = {k: LinkState(v.bandwidth_bytes_per_s * frac, v.latency_s, v.up) for k, v in paths.items()}
    return replace(snapshot, paths=scaled)


def slow_objective(prob: Problem, pl: Placement, frac: float) -> float:
    """``pl``'s latency + migration delay / H when every link runs at ``frac`` of its measured rate."""
    from testbed.partition.cost.arrays import PlanArrays

    memo = prob.memo.setdefault("hedge", {})
    if "snap" not in memo:
        memo["snap"] = slowed(prob.snap, frac)
        memo["net"] = Net(memo["snap"])
        # the decode model with arrays over the slowed links (``cost.arrays``: decode_cost's floats)
        memo["arrays"] = PlanArrays(Problem(memo["snap"], prob.dims, prob.cost_model))
    key = ("obj", pl)
    if key not in memo:
        snap, net = memo["snap"], memo["net"]
        if prob.cost_model == "paper":
            lat = evaluate(pl, snap, prob.dims, "paper").token_latency_s
        else:
            lat = memo["arrays"].latency(pl).token_latency_s
        # ``migration_estimate``'s delay over the slowed links (``planner_delay``: the same floats;
        # what each layer ships and the memory-safe waves do not depend on the links: shared memo)
        mig = planner_delay(prob.snap.current, pl, snap, prob.dims, prob.cost_model, net,
                            prob.memo.setdefault("migration_parts", {}))
        memo[key] = lat + mig / prob.H
    return memo[key]


def regrets(now: list[float], slow: list[float | None]) -> list[float]:
    """Per candidate, its worse relative regret over the two futures: ``max(now / best now,
    slow / best slow)`` over the evaluated candidates (``slow`` not None); ``inf`` for the others."""
    ok = [i for i, s in enumerate(slow) if s is not None]
    if not ok:
        return [float("inf")] * len(now)
    best_now, best_slow = min(now[i] for i in ok), min(slow[i] for i in ok)
    if not (np.isfinite(best_now) and np.isfinite(best_slow)) or best_now <= 0 or best_slow <= 0:
        return [float("inf")] * len(now)
    return [max(now[i] / best_now, slow[i] / best_slow) if slow[i] is not None else float("inf")
            for i in range(len(now))]
