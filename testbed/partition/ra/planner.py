"""The resource-aware (RA) myopic head-level partitioner (paper-notes "RA algorithm", steps 1-5).

One round (one decision epoch), given a snapshot:
 1. Residual memory per device = budget - embedding/LM head (source) ; every block is sized at the
    memory horizon ``T + tokens_until_next_decision`` (KV growth until the next decision). Every
    memory horizon (this one, the headroom, the anticipation window, ``repair``'s targets) is capped
    at the end of generation when the snapshot says it (``tokens_remaining``).
 2. Layers are walked in dataflow order (all layers have equal demand); the projection is the
    layer's anchor: a few candidate devices are tried (``proj_candidates``: the cheapest by input
    transfer + compute, plus its current device) and the best resulting layer is kept. Per anchor,
    both claim orders (heads first, FFN chunks first: whichever kind claims first gets the fast
    devices' memory; a fixed "largest first" order let the FFN chunks fill the fastest device and
    pushed the heads onto far devices, 50-60 % above the optimum) and a few FFN aggregators (in the
    last layer its transfer to the source counts) are tried. On big clusters (``thorough`` off)
    the FFN-first order is only tried when heads first fails, and fewer aggregators (time).
 3. Each block goes to the device minimising its marginal effect on the layer's critical path GIVEN
    WHAT IS ALREADY PLACED this round: a device's finish time grows with the heads (or FFN columns)
    it already got, so heads spread across devices whenever that lowers the critical path. Under
    ``decode`` the key is the device's finish time with the block added (input transfer + serial
    compute + output transfer); under ``paper`` it is the exact increase of the paper's T_token.
    Devices without room for the block (memory incl. KV growth) are skipped.
 4. Contention: if some block fits nowhere, the round is redone with each layer limited to its fair
    share of every device's residual memory (frees the tightest devices for later layers); if that
    fails too, blocks are first-fit packed by size; if even that fails -> InfeasiblePlan with numbers.
 4b. The best contiguous layer split within the same memory (EdgeShard's DP, device orders cut
    to ``2 x n_layers`` devices) is a candidate too (``layer_split``): it replaces the greedy's
    plan when it is better by latency + migration delay / H, or (a first plan) at most
    ``split_slack`` worse with fewer bytes on the links per token (each layer the greedy splits at
    a full device adds messages, and those cost the most when a link drops).
 4c. The baselines' plans are candidates too (``portfolio``): EdgeShard's best layer split over
    the full memory (not the balanced caps) and Galaxy's tensor-parallel split of every layer
    over the best group of fastest devices (FFN columns split as many ways as the group has
    devices, where the greedy stops at ``ffn_chunks``). The one with the lowest latency +
    migration delay / H replaces the plan so far unless the plan so far is more than
    ``portfolio_slack`` lower — RA is never slower than a plan it can reach (issue 12: within
    2 % of the best of EdgeShard and Galaxy at every point of the map), and its own irregular
    plan must win by more than the cost model's error to be kept (issue 13: at the compute-bound
    regime point RA's own plan, predicted 0.02 % faster than Galaxy's, ran 5.5 % slower).
 4d. Hedge (``rate_hedge``, ``ra.hedge``): a split that wins only while every link stays as fast as
    measured is traded for the plan with the lower worse-case regret between today's links and
    links at ``rate_hedge`` x their rate — among plans at most ``portfolio_slack`` above the
    baselines' best today, so a static network costs RA at most that slack against them.
 4e. Memory horizon (issue 19, ``ra.horizon``): when the snapshot knows the end of the run and the
    plan above does not fit until then, steps 2-4c are redone sized for the end, and that plan is
    taken when the first one's gain until it stops fitting is at most the migration its overflow
    at the end would force.
 5. Hysteresis: per block, a device other than its current one pays its migration delay amortised
    over the horizon ``H``; finally (``ra.choice.choose_plan``) the current placement is kept unless the new
    one (or a per-layer mixture) lowers latency + migration delay / H, i.e. a voluntary move must
    gain more than its delay over H tokens, the delay at the MEASURED path rates with each sender's
    transfers serialised on its uplink (``migration``). Memory-forced moves are handled apart:
    the KV growth is linear, so how long the current placement still fits is known exactly. When
    it stops fitting before the next decision, the cheapest repair (fewest bytes over the slowest
    links) makes it fit; when it will stop within ``anticipate_epochs`` decisions after that, the
    repair is made NOW if headroom is cheap (its cost per token of headroom bought is at most
    ``preempt`` token latencies: over a fast uplink), else deferred until forced (a slow uplink
    may recover, and then only the minimum moves). Cheap repairs are topped up beyond the minimum.
 6. Leveling (issue 19, ``ra.leveling``), applied to step 5's plan: the chosen plan's largest device
    peak is lowered by head / FFN-chunk moves while its objective and latency stay within
    ``level_tol`` (2 %) where memory binds, at practically equal latency (0.1 %) elsewhere.
Pure function of the snapshot; numpy for the per-layer vectors, a heap for the per-block choice.
"""
from __future__ import annotations

import functools
import gc

import numpy as np

from testbed.partition.common import NoFit, Problem, fits_until
from testbed.core.errors import InfeasiblePlan
from testbed.partition.ra.choice import choose_plan, plan_arrays, plan_cost
from testbed.partition.ra.portfolio import _with_layer_split, _with_portfolio, galaxy_groups  # noqa: F401
from testbed.partition.ra.greedy import _round
from testbed.partition.ra.horizon import prefer_end_sized
from testbed.partition.ra.leveling import level_plan, memory_binds
from testbed.partition.ra.objective import share_costs
from testbed.core.placement import Placement


def balanced_budget(prob: Problem, mem_balance: float | None, chunks: int) -> np.ndarray:
    """Memory-balance caps: ``min(budget_j, c)`` with the level ``c`` chosen so that the capped
    devices together hold ``mem_balance`` x the model (at the memory horizon). ``mem_balance = 1``
    forces the flattest possible fill (lowest peak), large values = no cap (pack the best devices)."""
    if not mem_balance or mem_balance <= 0:
        return prob.budget
    need = prob.dims.n_layers * prob.layer_bytes()
    b = np.sort(np.clip(prob.budget[prob.allowed], 0, None))
    target = mem_balance * need
    if b.size == 0 or target >= b.sum():
        return prob.budget
    acc, m, level = 0.0, b.size, float(b[-1])
    for i, x in enumerate(b):
        if acc + x * (m - i) >= target:
            level = (target - acc) / (m - i)
            break
        acc += x
    big = max(prob.sz.head_b, prob.sz.proj_b, -(-prob.dims.ffn_dim // chunks) * prob.sz.ffn_col_b)
    level = max(level, 2 * big)
    return np.where(prob.allowed, np.minimum(prob.budget, level), prob.budget)


def _without_collector(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused (its previous state restored).

    A decision builds tens of thousands of short-lived containers (memos, candidate layers) and
    leaves no cyclic garbage (``tests/unit/test_ra_no_cycles.py``): refcounting frees them all
    when it returns. With the collector on, its young-generation passes promoted them while the
    decision ran, and the oldest generation was then scanned again and again: 3.4 of 18 s of the
    128-device simulated run (every fifth RA decision took 150-200 ms instead of 55)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()
    return run


@_without_collector
def resource_aware(snapshot, dims, cost_model: str = "decode", ffn_chunks: int | None = None,
                   proj_candidates: int = 4, headroom_epochs: int = 4, horizon_epochs: int = 4,
                   horizon_tokens: int | None = None, mem_balance: float | None = 1.25,
                   balance_slack: float = 0.1, thorough: bool | None = None,
                   headroom_gain: float = 0.05, anticipate_epochs: int = 2,
                   preempt: float = 1.0, layer_split: bool = True,
                   split_slack: float = 0.1, portfolio: bool = True,
                   portfolio_slack: float = 0.01, rate_hedge: float | None = 0.5,
                   incremental: bool = False, headroom_to_end: bool = True,
                   level_tol: float = 0.02, level_evals: int = 2000, level_bind_frac: float = 0.9,
                   level_tol_free: float = 0.001) -> Placement:
    """One RA decision.

    ``ffn_chunks``: FFN blocks per layer (default 1 under ``paper``, as in the paper; 4 under
    ``decode``). ``proj_candidates``: anchors tried per layer.
    ``headroom_epochs``: blocks are sized with this many epochs of KV growth (a placement packed to
    the brim is evicted by KV growth at the next decision, forcing migrations); if that does not
    fit, one epoch. The current placement stays a candidate as long as it fits the next epoch.
    ``horizon_tokens`` (default ``horizon_epochs`` x tokens per epoch): migration delay is
    amortised over this many tokens, both per block inside the greedy (a block pays
    ``delay from its nearest current holder / H`` to move, so moves over fast links are preferred)
    and for the final whole-plan / per-layer comparison against the current placement.
    ``mem_balance``: a second greedy round caps every device at the level where the capped devices
    hold ``mem_balance`` x the model (flatter fill, lower peak device memory); that plan is taken
    when its predicted latency is at most ``1 + balance_slack`` times the uncapped plan's (the
    balance term trades at most that much latency). ``None`` or 0: no balancing round.
    ``thorough`` (default: at most 16 devices may hold blocks): per anchor, every aggregator
    candidate in both claim orders, and one more round sized for one epoch of KV growth only (the
    exact solver's horizon), taken when its plan is more than ``headroom_gain`` faster than the
    headroom plan (headroom is worth a little latency, not a lot: when the KV caches outgrow the
    tight plan, ``repair`` moves the fewest blocks).
    ``layer_split``: step 4b, with ``split_slack``. ``portfolio``: step 4c, with ``portfolio_slack``
    (the paper's greedy alone: ``layer_split=False, portfolio=False``); ``rate_hedge``: step 4d
    (None: off).
    ``anticipate_epochs``, ``preempt``: when the KV growth will evict the current placement within
    ``anticipate_epochs`` decisions after the next one, the cheapest repair is made now if each
    token of headroom it buys costs at most ``preempt`` token latencies (stall + added latency
    over the horizon), and repairs (forced or anticipated) are extended towards the headroom
    horizon at that price; otherwise a forced move moves only what must move (``choose_plan``).
    ``incremental``: the placement returned carries the snapshot it was decided on, and when the
    current one carries one and only a few links, limits or speeds got worse since, only the
    layers they touch are placed again (``ra.incremental``; anything else: a full decision).
    Memory policy (issue 19): ``headroom_to_end`` (when the snapshot knows ``tokens_remaining``
    and the plan sized for ``headroom_epochs`` does not fit to the end of the run): the plan sized
    for the end of the run (steps 2-4c again) replaces it when the epoch-sized plan's gain until
    it stops fitting is at most the migration its overflow at the end forces (``ra.horizon``).
    ``level_tol``: step 6 (``ra.leveling.level``), applied to the plan step 5 chose: among plans
    within ``1 + level_tol`` of its objective and of its latency (on a first plan: of the fastest
    plan weighed, the baselines' included, so RA stays within ``1 + level_tol`` of them), lower
    the largest device's peak by moving heads / FFN chunks (0: off), with at most ``level_evals``
    plan evaluations — where memory binds (some device ends above ``level_bind_frac`` of its block
    budget, ``ra.leveling.memory_binds``); elsewhere only at practically equal latency
    (``level_tol_free``, 0.1 %): where memory does not bind a lower peak buys nothing, and on the
    emulated regime points a 2 % predicted trade measured 7 % (the moved heads' extra messages)."""
    from testbed.partition.layer.baselines import first_fit
    from testbed.partition.ra.incremental import redecide, with_basis

    K = max(1, min(ffn_chunks or (1 if cost_model == "paper" else 4), dims.ffn_dim))
    prob, headroom_until = _problem(snapshot, dims, cost_model, headroom_epochs, horizon_epochs, horizon_tokens,
                                    thorough)
    sig = (cost_model, ffn_chunks, proj_candidates, headroom_epochs, horizon_epochs, horizon_tokens, mem_balance,
           balance_slack, thorough, headroom_gain, anticipate_epochs, preempt, layer_split, split_slack, portfolio,
           portfolio_slack, rate_hedge, headroom_to_end, level_tol, level_evals, level_bind_frac, level_tol_free)
    first = snapshot.current is None  # a re-decision's portfolio candidates would migrate

    def decide(new: Placement, budget: np.ndarray, changed_only: bool = False) -> Placement:
        """Step 5, then step 6 (leveling), on the problem and horizon in force (the end-sized
        ones when ``_end_sized`` replaced them). ``changed_only`` (the incremental re-decision):
        step 6 moves blocks only in the layers step 5's plan changed from the current placement
        (the others were leveled when they were made)."""
        out = choose_plan(prob, new, prob.H, budget, anticipate_epochs=anticipate_epochs, preempt=preempt,
                          headroom_until=headroom_until)
        if level_tol > 0 and out is not snapshot.current:  # a kept placement was leveled when made
            only = None
            if changed_only:
                only = {l for l, (a, b) in enumerate(zip(out.layers, snapshot.current.layers)) if a != b}
            # the tolerance counts from the fastest plan of this decision: never from a plan that
            # was leveled before (the latency would creep by level_tol at every decision)
            ref = plan_cost(prob, new).token_latency_s
            if first:
                ref = min(ref, prob.memo.get("portfolio_latency_s", float("inf")))
            tol = level_tol if memory_binds(prob, out, level_bind_frac) else min(level_tol, level_tol_free)
            out = level_plan(prob, out, tol, K, level_evals, ref, rate_hedge, only)
        return with_basis(out, prob, sig) if incremental else out

    again = redecide(prob, K, sig, decide) if incremental else None
    if again is not None:
        return again
    layers, meta, budget, last_err = _balanced_round(prob, K, proj_candidates, mem_balance, balance_slack)
    if layers is None:
        try:
            return first_fit(snapshot, dims, cost_model)
        except InfeasiblePlan:
            raise prob.no_fit(last_err.block, last_err.nbytes, prob.budget) from None
    if prob.thorough and prob.T_mem > prob.T + prob.N:
        layers, meta, prob, budget = _tight_round(prob, K, proj_candidates, headroom_gain, layers, meta, budget)
    steps = dict(layer_split=layer_split, split_slack=split_slack, portfolio=portfolio, portfolio_slack=portfolio_slack,
                 rate_hedge=rate_hedge)
    layers, meta = _steps_4bc(prob, layers, meta, budget, **steps)
    if headroom_to_end:
        end = _end_sized(prob, layers, K, proj_candidates, mem_balance, balance_slack, steps)
        if end is not None and end[0] is not None:
            prob, layers, meta, budget = end
            headroom_until = prob.T_mem
        elif end is not None:
            meta = {**meta, **end[2]}
    return decide(Placement(snapshot.source, layers, meta=meta), budget)


def _steps_4bc(prob: Problem, layers, meta: dict, budget, layer_split: bool, split_slack: float,
               portfolio: bool, portfolio_slack: float, rate_hedge: float | None):
    """Steps 4b (layer split within the greedy's budget), 4c (the baselines' plans) and 4d (hedge)."""
    if layer_split:
        layers, meta = _with_layer_split(prob, layers, meta, split_slack, budget)
    if portfolio:
        layers, meta = _with_portfolio(prob, layers, meta, portfolio_slack, with_layer_split=layer_split,
                                       rate_hedge=rate_hedge)
    return layers, meta


def _end_sized(prob: Problem, layers, K: int, proj_candidates: int, mem_balance, balance_slack: float,
               steps: dict):
    """The memory policy's end-of-run sizing (``ra.horizon``): None when it does not apply (the end
    is unknown or within the headroom, or the epoch-sized plan fits to the end); else (problem,
    layers, meta, budget) of the end-sized plan when ``prefer_end_sized`` takes it, or
    (None, None, meta note) when it keeps the epoch-sized plan (or the end-sized one cannot be made)."""
    snap = prob.snap
    if snap.tokens_remaining is None or snap.end_context_len <= prob.T_mem:
        return None
    pl_ep = Placement(snap.source, layers)
    if fits_until(pl_ep, snap, prob.dims, prob.cost_model, prob.T) >= snap.end_context_len:
        return None
    end = Problem(snap, prob.dims, prob.cost_model, mem_tokens=snap.tokens_remaining)
    end.H, end.thorough = prob.H, prob.thorough
    share_costs(prob, end)
    try:
        end.check_totals()
    except InfeasiblePlan:
        return None, None, {"end_sized": "does not fit"}
    lay, meta, budget, _ = _balanced_round(end, K, proj_candidates, mem_balance, balance_slack)
    if lay is None:
        return None, None, {"end_sized": "no placement"}
    lay, meta = _steps_4bc(end, lay, meta, budget, **steps)
    take, why = prefer_end_sized(prob, pl_ep, end, Placement(snap.source, lay))
    if not take:
        return None, None, {"end_sized": False, **why}
    return end, lay, {**meta, "end_sized": True, **why}, budget


def _problem(snapshot, dims, cost_model: str, headroom_epochs: int, horizon_epochs: int,
             horizon_tokens: int | None, thorough: bool | None) -> tuple[Problem, int]:
    """RA's problem: blocks sized for ``headroom_epochs`` of KV growth (one epoch when that does not
    fit), the amortisation horizon ``H`` and ``thorough``; and the headroom horizon (context length)."""
    N = max(1, snapshot.tokens_until_next_decision)
    H = snapshot.amortisation_tokens(horizon_tokens if horizon_tokens is not None else N * max(1, horizon_epochs))
    prob = Problem(snapshot, dims, cost_model, mem_tokens=N * max(1, headroom_epochs))
    try:
        prob.check_totals()
    except InfeasiblePlan:
        prob = Problem(snapshot, dims, cost_model)
        prob.check_totals()
    prob.H = max(1.0, H)
    prob.thorough = int(prob.allowed.sum()) <= 16 if thorough is None else thorough
    return prob, prob.T_mem


def _one_round(prob: Problem, K: int, proj_candidates: int, budget):
    """One greedy round (without, then with shared aggregators): (layers, None) or (None, NoFit)."""
    err = None
    for share in (False, True):
        try:
            return _round(prob, K, proj_candidates, share, budget), None
        except NoFit as exc:
            err = exc.with_traceback(None)  # no frame cycle
    return None, err


def _balanced_round(prob: Problem, K: int, proj_candidates: int, mem_balance: float | None,
                    balance_slack: float):
    """The greedy round, and the memory-balanced one taken when it is at most ``1 + balance_slack``
    times slower: (layers or None, meta, the budget they were placed under, the last NoFit)."""
    layers, last_err = _one_round(prob, K, proj_candidates, prob.budget)
    capped = balanced_budget(prob, mem_balance, K)
    meta = {"algorithm": "resource_aware", "ffn_chunks": K}
    if layers is not None and capped is not prob.budget:
        bal, _ = _one_round(prob, K, proj_candidates, capped)
        if bal is not None:
            free = Placement(prob.snap.source, layers, meta=meta)
            tight = Placement(prob.snap.source, bal, meta=meta)
            if prob.cost_model == "decode":
                plan_arrays(prob).warm([free, tight])  # both plans' layers in one batch
            if (plan_cost(prob, tight).token_latency_s
                    <= (1 + balance_slack) * plan_cost(prob, free).token_latency_s):
                layers, meta = bal, {**meta, "mem_balanced": True}
    return layers, meta, capped if meta.get("mem_balanced") else prob.budget, last_err


def _tight_round(prob: Problem, K: int, proj_candidates: int, headroom_gain: float, layers, meta: dict, budget):
    """``thorough``: a round sized for one epoch of KV growth only, taken when it is more than
    ``headroom_gain`` faster than the headroom plan: (layers, meta, problem, budget) to go on with."""
    snapshot = prob.snap
    tight = Problem(snapshot, prob.dims, prob.cost_model)
    tight.H, tight.thorough = prob.H, True
    lt, _ = _one_round(tight, K, proj_candidates, tight.budget)
    if lt is not None:
        t_lat = plan_cost(tight, Placement(snapshot.source, lt)).token_latency_s
        h_lat = plan_cost(prob, Placement(snapshot.source, layers)).token_latency_s
        if t_lat < (1 - headroom_gain) * h_lat:
            return lt, {**meta, "tight_memory": True}, tight, tight.budget
    return layers, meta, prob, budget
