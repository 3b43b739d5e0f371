"""What a candidate plan costs inside one RA decision (and the exact solver's and EdgeShard-
dynamic's): its token latency and bytes on the links (``plan_cost``, under ``decode`` with
``cost.arrays``), its migration delay from the current placement (``_objective``, through
``migration.planner_delay``), and the per-problem memos that make each plan cost once.
Pure functions of a ``Problem`` (``prob.memo`` holds the memos).
"""
from __future__ import annotations

from testbed.core.placement import Placement
from testbed.partition.common import Problem, evaluate
from testbed.partition.cost.arrays import PlanArrays, PlanLatency
from testbed.partition.cost.latency import CostResult, Net
from testbed.partition.cost.migration import planner_delay


def problem_net(prob: Problem) -> Net:
    """The problem's one ``Net``: its path lookups and per-layer costs are shared by every plan
    the decision weighs (the greedy's, the layer split, the baselines', the per-layer mixes)."""
    net = prob.memo.get("net")
    if net is None:
        net = prob.memo["net"] = Net(prob.snap)
    return net


def plan_cost(prob: Problem, pl: Placement, net: Net | None = None) -> CostResult | PlanLatency:
    """``pl``'s token latency and bytes on the links (``token_latency_s``, ``bytes_moved``) under
    ``prob``'s model, computed once per problem (``prob.memo``); under ``decode`` with arrays
    (``cost.arrays``: the same floats as ``decode_cost``)."""
    memo = prob.memo.setdefault("cost", {})
    hit = _recall(memo, pl)
    if hit is None:
        if prob.cost_model == "paper":
            hit = _store(memo, pl, evaluate(pl, prob.snap, prob.dims, "paper"))
        else:
            hit = _store(memo, pl, plan_arrays(prob).latency(pl))
    return hit


def _recall(memo: dict, pl: Placement):
    """A value memoised for ``pl``: by identity, else for a placement of the same source and the
    same layer OBJECTS (planners rebuild placements around the layers they already have: the same
    plan is not evaluated twice; hashing whole placements by value would cost more). None if absent."""
    hit = memo.get(id(pl))
    if hit is not None and hit[0] is pl:
        return hit[1]
    hit = memo.get(_layers_key(pl))
    if hit is not None and hit[0].source == pl.source and all(a is b for a, b in zip(hit[0].layers, pl.layers)):
        memo[id(pl)] = (pl, hit[1])
        return hit[1]
    return None


def _layers_key(pl: Placement) -> tuple:
    return ("layers", pl.source, *map(id, pl.layers))


def _store(memo: dict, pl: Placement, val):
    memo[id(pl)] = memo[_layers_key(pl)] = (pl, val)  # the entry keeps pl (and its layers' ids) alive
    return val


def plan_arrays(prob: Problem) -> PlanArrays:
    """The problem's ``cost.arrays.PlanArrays`` (its per-layer memo is shared by every plan)."""
    arrays = prob.memo.get("arrays")
    if arrays is None:
        arrays = prob.memo["arrays"] = PlanArrays(prob)
    return arrays


def _objective(prob: Problem, pl: Placement, H: float, net: Net) -> tuple[float, float, float]:
    """(latency + migration delay / H, latency, migration delay) of moving from snapshot.current.

    The migration delay uses the snapshot's (current, measured) path rates and the ``migration``
    aggregation: one sender's transfers serialised on its uplink, senders in parallel. Both are
    computed once per problem and placement (``prob.memo``)."""
    lat = plan_cost(prob, pl, net).token_latency_s
    memo = prob.memo.setdefault("migration", {})
    mig = _recall(memo, pl)
    if mig is None:
        mig = _store(memo, pl, planner_delay(prob.snap.current, pl, prob.snap, prob.dims, prob.cost_model, net,
                                             prob.memo.setdefault("migration_parts", {})))
    return lat + mig / H, lat, mig


def no_migration(prob: Problem, n_layers: int) -> bool:
    """Whether ``_objective``'s migration delay is 0 for every plan of ``n_layers`` layers: there
    is no current placement of as many layers to move from (``planner_delay``)."""
    cur = prob.snap.current
    return cur is None or len(cur.layers) != n_layers


def objective_without_migration(latency_s: float, H: float) -> float:
    """``_objective(...)[0]`` of a plan of latency ``latency_s`` when ``no_migration`` holds (the
    same float: the latency + a zero delay / H), without building the plan."""
    return latency_s + 0.0 / H


def remember_cost(prob: Problem, pl: Placement, val: PlanLatency) -> None:
    """Record ``pl``'s ``plan_cost``, computed elsewhere with the same arithmetic (``cost.arrays``)."""
    _store(prob.memo.setdefault("cost", {}), pl, val)


def migration_lower_bound(prob: Problem, pl: Placement, net: Net) -> float:
    """A lower bound of ``_objective``'s migration delay without scheduling memory-safe waves
    (``planner_delay(one_wave=True)``): to rule a candidate out cheaply. Once per problem and plan."""
    memo = prob.memo.setdefault("migration_low", {})
    low = _recall(memo, pl)
    if low is None:
        low = _store(memo, pl, planner_delay(prob.snap.current, pl, prob.snap, prob.dims, prob.cost_model, net,
                                             prob.memo.setdefault("migration_parts", {}), one_wave=True))
    return low


# memos whose entries do not depend on a problem's memory horizon (only on the snapshot, the
# model, the cost model and the current placement): plan latencies and their per-layer parts,
# migration delays (and their one-wave lower bounds) and their per-layer items, the same over
# slowed links (the hedge), and the layer objects that key them
HORIZON_FREE_MEMOS = ("cost", "migration", "migration_low", "migration_parts", "split_layers", "galaxy_layers",
                      "hedge")


def share_costs(prob: Problem, other: Problem) -> None:
    """Let ``other``, a problem of the same snapshot, model and cost model sized for another
    memory horizon (the end-of-run sizing, ``ra.planner._end_sized``), use ``prob``'s memos of
    what does not depend on the horizon: a plan weighed by both (the same baseline candidate, a
    layer split of the same devices) is costed once."""
    if other.snap is not prob.snap or other.dims != prob.dims or other.cost_model != prob.cost_model:
        raise ValueError("share_costs: the problems must be of the same snapshot, model and cost model")
    problem_net(prob)
    if prob.cost_model == "decode":
        plan_arrays(prob)
        other.memo["arrays"] = prob.memo["arrays"]
    other.memo["net"] = prob.memo["net"]
    for key in HORIZON_FREE_MEMOS:
        other.memo[key] = prob.memo.setdefault(key, {})

