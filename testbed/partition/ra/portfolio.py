"""RA steps 4b-4d: the candidates beyond the greedy's plan, and the choice among them.

4b: the best contiguous layer split within the greedy's budget (EdgeShard's DP); 4c: the
baselines' plans (EdgeShard's full-memory split, Galaxy's tensor-parallel split per group size):
the best of them unless the plan so far is more than ``portfolio_slack`` better; 4d: the hedge against links that slow down
(``ra.hedge``). What each step does and why is in ``ra.planner``'s docstring. Pure functions of a
``Problem``.
"""
from __future__ import annotations

import numpy as np

from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import Placement
from testbed.partition.common import Problem
from testbed.partition.ra.choice import _objective, migration_lower_bound, plan_arrays, plan_cost, problem_net


def _with_layer_split(prob: Problem, layers, meta: dict, slack: float, budget: np.ndarray):
    """The greedy's layers, or the best contiguous layer split within the greedy's ``budget``
    (EdgeShard's DP, ``edgeshard.best_split``; the memory-balanced caps when the greedy took
    them) when that is better by latency + migration delay from the current placement / H
    (``ra.choice._objective``), or, for a first plan, at most ``slack`` worse and ships fewer
    bytes per token. A layer-level placement is a head-level one with each layer's blocks
    together; the greedy, filling devices layer by layer, splits layers where a device is full,
    and every split adds bytes on the links (bytes that cost more when a link drops)."""
    from testbed.partition.layer.edgeshard import best_split

    split = best_split(prob, max_devices=2 * prob.dims.n_layers, budget=budget)
    if split is None:
        return layers, meta
    whole = split_layers(prob, split)
    net = problem_net(prob)
    a, b = Placement(prob.snap.source, whole), Placement(prob.snap.source, layers)
    ob = _objective(prob, b, prob.H, net)[0]
    first = prob.snap.current is None  # later, a move that pays over H is never traded for bytes
    # the split's latency alone (<= its objective) may already rule it out: no migration estimate
    oa = _objective_below(prob, a, net, (1 + slack) * ob if first else ob)
    fewer = lambda: plan_cost(prob, a, net).bytes_moved < plan_cost(prob, b, net).bytes_moved  # noqa: E731
    if oa < ob or (first and oa <= (1 + slack) * ob and fewer()):
        return whole, {**meta, "layer_split": True}
    return layers, meta


def split_layers(prob: Problem, split: list[int]) -> tuple:
    """The layers of a contiguous split (device index per layer), built once per problem and split
    (the same objects each time: the planner's memos recognise a plan by its layer objects)."""
    from testbed.partition.common import uniform_layers

    memo = prob.memo.setdefault("split_layers", {})
    key = tuple(split)
    if key not in memo:
        memo[key] = uniform_layers([prob.names[k] for k in split], prob.dims)
    return memo[key]


def _objective_below(prob: Problem, pl: Placement, net, bound: float) -> float:
    """``_objective(pl)``, or a lower bound of it when that is already above ``bound`` (its
    latency, then latency + a lower bound of the migration delay: the comparison with ``bound``
    is decided without the migration estimate's memory-safe waves, the costly part)."""
    lat = plan_cost(prob, pl, net).token_latency_s
    if lat > bound:
        return lat
    low = lat + migration_lower_bound(prob, pl, net) / prob.H
    if low > bound:
        return low
    return _objective(prob, pl, prob.H, net)[0]


def galaxy_groups(n: int) -> list[int]:
    """Group sizes Galaxy's candidate tries among ``n`` devices: every size up to 16, then a
    geometric ladder (x1.25) and ``n`` itself — a plan per size is a full evaluation."""
    sizes, g = list(range(1, min(n, 16) + 1)), 16
    while g < n:
        g = min(n, max(g + 1, int(g * 1.25)))
        sizes.append(g)
    return sizes


def _portfolio_candidates(prob: Problem, with_layer_split: bool) -> list[tuple]:
    """Step 4c's candidates: EdgeShard's full-memory layer split and Galaxy's tensor-parallel split
    per group size (``layer.baselines.galaxy_plans``, sized at RA's memory horizon): (layers, tag)."""
    from testbed.partition.layer.baselines import galaxy_plans
    from testbed.partition.layer.edgeshard import best_split

    split = best_split(prob, max_devices=2 * prob.dims.n_layers) if with_layer_split else None
    cands = []
    if split is not None:
        cands.append((split_layers(prob, split), {"portfolio": "layer_split"}))
    for g, pl in galaxy_plans(prob, galaxy_groups(int(prob.allowed.sum()))):
        if not isinstance(pl, InfeasiblePlan):
            cands.append((pl.layers, {"portfolio": "tensor_parallel", "group_size": g}))
    return cands


def _with_portfolio(prob: Problem, layers, meta: dict, slack: float, with_layer_split: bool = True,
                    rate_hedge: float | None = None):
    """Step 4c: the best of EdgeShard's full-memory layer split and Galaxy's tensor-parallel split,
    unless the plan so far is more than ``slack`` lower by latency + migration delay / H.
    ``with_layer_split=False`` (RA's ``layer_split`` off): Galaxy's candidate only.
    Step 4d (``rate_hedge``, ``ra.hedge``): then the pick with the lowest worse relative regret
    between today's links and links at ``rate_hedge`` x their rate, among the plans at most ``slack``
    above the baselines' best today, when that regret is more than ``slack`` lower."""
    net = problem_net(prob)
    src = prob.snap.source
    cands = [(layers, {})] + _portfolio_candidates(prob, with_layer_split)
    plans = [Placement(src, c[0]) for c in cands]
    if prob.cost_model == "decode":  # every candidate's layers in one batch
        plan_arrays(prob).warm(plans)
    best_obj = _objective(prob, plans[0], prob.H, net)[0]
    # the fastest plan weighed: leveling's latency tolerance (step 6) counts from it on a first plan
    prob.memo["portfolio_latency_s"] = min((plan_cost(prob, pl, net).token_latency_s for pl in plans[1:]),
                                           default=float("inf"))
    if rate_hedge is None:
        now = [best_obj] + [_objective(prob, pl, prob.H, net)[0] for pl in plans[1:]]
        pick = _unless_clearly_better(now, slack)
    else:
        now, pick = _hedged_pick(prob, plans, best_obj, slack, rate_hedge, net)
    if pick == 0 or tuple(cands[pick][0]) == tuple(layers):  # a baseline's plan that is ours already
        return layers, meta
    return cands[pick][0], {**meta, **cands[pick][1]}


def _unless_clearly_better(now: list[float], slack: float) -> int:
    """Step 4c's rule over objectives ``now`` (ours first, then the baselines'): the best
    baseline's plan unless ours is more than ``slack`` below it (0: ours). A plan of RA's own
    (heads of one layer spread unevenly, blocks moved to level memory) must beat the regular plans
    of the baselines by more than the cost model's error to be worth its irregularity: at the
    compute-bound regime point (SmolLM2 on 4 slow workers, 1 Gbit/s) RA's own plan, predicted
    0.02 % faster than Galaxy's, ran 5.5 % (and in another run 7 %) slower than it, emulated."""
    if len(now) < 2:
        return 0
    best = min(range(1, len(now)), key=now.__getitem__)
    return 0 if now[0] < (1 - slack) * now[best] else best


def _hedged_pick(prob: Problem, plans: list[Placement], ours: float, slack: float, frac: float, net):
    """Steps 4c + 4d over ``plans`` (ours first, then the baselines'): (objectives now, the pick)."""
    from testbed.partition.ra import hedge

    lat = [ours] + [plan_cost(prob, pl, net).token_latency_s for pl in plans[1:]]
    # Objectives are costly where a plan's migration needs memory-safe waves; a lower bound of one
    # (``_objective_below``: latency, then latency + a one-wave migration bound) that is already
    # above what it is compared with decides the same as the objective itself, so the exact
    # objective is computed only for candidates that could still lower ``base_best`` or be
    # admissible (at most ``bound``).
    base_best = float("inf")  # the baselines' best objective today (an objective is >= its latency)
    for i in sorted(range(1, len(plans)), key=lat.__getitem__):
        if lat[i] >= base_best:
            break
        base_best = min(base_best, _objective_below(prob, plans[i], net, base_best))
    bound = (1 + slack) * base_best
    # above ``bound`` a candidate is neither the baselines' best nor admissible: its lower bound
    # stands in for its objective (step 4c's and 4d's choices are the same)
    now = [ours] + [_objective_below(prob, pl, net, bound) if l <= bound else l
                    for pl, l in zip(plans[1:], lat[1:])]
    pick = _unless_clearly_better(now, slack)  # step 4c
    ok = [o <= bound for o in now]  # admissible: at most ``slack`` above the baselines' best today
    if sum(ok) < 2:
        return now, pick
    slow = [hedge.slow_objective(prob, pl, frac) if a else None for pl, a in zip(plans, ok)]
    regret = hedge.regrets(now, slow)
    h = min(range(len(plans)), key=lambda i: (regret[i], now[i]))
    if h != pick and regret[h] < regret[pick] * (1 - slack):
        pick = h
    return now, pick
