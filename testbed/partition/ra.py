"""The resource-aware (RA) myopic head-level partitioner (paper-notes "RA algorithm", steps 1-5).

One round (one decision epoch), given a snapshot:
 1. Residual memory per device = budget - embedding/LM head (source) ; every block is sized at the
    memory horizon ``T + tokens_until_next_decision`` (KV growth until the next decision).
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
 5. Hysteresis: per block, a device other than its current one pays its migration delay amortised
    over ``tokens_until_next_decision``; finally the whole current placement is kept unless the new
    one's latency + amortised migration delay is lower.
Pure function of the snapshot; numpy for the per-layer vectors, a heap for the per-block choice.
"""
from __future__ import annotations

import numpy as np

from testbed.partition import blocks as B
from testbed.partition.common import Problem, check_memory, evaluate
from testbed.partition.errors import InfeasiblePlan
from testbed.partition.cost import Net, decode_cost
from testbed.partition.migration import migration_estimate
from testbed.partition.cost import placement_memory
from testbed.placement import FfnShard, LayerPlacement, Placement


from testbed.partition.ra_greedy import NoFit, _round


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


def _usable(prob: Problem, pl: Placement) -> bool:
    """Placement only uses known, allowed devices and fits every budget until the next decision."""
    if pl.source != prob.snap.source or len(pl.layers) != prob.dims.n_layers:
        return False
    if not pl.devices() <= set(prob.names):
        return False
    if any(not prob.allowed[prob.index[d]] for d in pl.devices() - {pl.source}):
        return False
    try:
        check_memory(pl, prob.snap, prob.dims, prob.cost_model, prob.T + prob.snap.tokens_until_next_decision)
    except InfeasiblePlan:
        return False
    return True


def _objective(prob: Problem, pl: Placement, H: float, net: Net) -> tuple[float, float, float]:
    """(latency + migration delay / H, latency, migration delay) of moving from snapshot.current."""
    if prob.cost_model == "paper":
        lat = evaluate(pl, prob.snap, prob.dims, "paper").token_latency_s
    else:
        lat = decode_cost(pl, prob.snap, prob.dims, net=net).token_latency_s
    mig = migration_estimate(prob.snap.current, pl, prob.snap, prob.dims, cost_model=prob.cost_model,
                             net=net).delay_s
    return lat + mig / H, lat, mig


def _with_block(pl: Placement, l: int, block, dev: str) -> Placement:
    """``pl`` with head group ``block`` (int) or FFN shard ``block`` (FfnShard) of layer ``l`` on ``dev``."""
    lp = pl.layers[l]
    if isinstance(block, int):
        heads = lp.heads[:block] + (dev,) + lp.heads[block + 1:]
        lp = LayerPlacement(heads, lp.proj, lp.ffn)
    else:
        lp = LayerPlacement(lp.heads, lp.proj, tuple(FfnShard(dev, s.col_start, s.col_end) if s == block else s
                                                      for s in lp.ffn))
    return Placement(pl.source, pl.layers[:l] + (lp,) + pl.layers[l + 1:], meta=pl.meta)


def repair(prob: Problem, cur: Placement, H: float, net: Net, budget: np.ndarray,
           n_dest: int = 3, max_moves: int = 64) -> Placement | None:
    """Minimal moves that make ``cur`` fit again (a device outgrew its memory with the KV caches, or
    its budget shrank): while some device is over budget at the memory horizon, try moving each of
    its head groups / FFN shards to the ``n_dest`` destinations with room that receive it fastest
    (devices already holding part of that layer first) and apply the move with the lowest
    ``latency + migration delay / H``. None if blocks sit on a device that is down or not allowed,
    or no move helps."""
    if not cur.devices() <= set(prob.names) or any(
            not prob.allowed[prob.index[d]] for d in cur.devices() - {cur.source}):
        return None
    dims, T_mem, sz = prob.dims, prob.T_mem, prob.sz
    pl = cur
    for _ in range(max_moves):
        mem = placement_memory(pl, prob.snap, dims, T_mem)
        used = np.array([float(mem.get(n, 0)) for n in prob.names])
        used[prob.src] -= B.source_bytes(dims)
        over = used - prob.budget
        j = int(np.argmax(over))
        if over[j] <= 0:
            return pl
        room = np.where(prob.allowed, budget - used, -np.inf)
        name, best = prob.names[j], None
        for l, lp in enumerate(pl.layers):
            layer_devs = {prob.index[d] for d in lp.heads} | {prob.index[s.device] for s in lp.ffn}
            blocks = [(g, sz.head_b) for g, d in enumerate(lp.heads) if d == name]
            blocks += [(s, (s.col_end - s.col_start) * sz.ffn_col_b) for s in lp.ffn if s.device == name]
            seen = set()
            for blk, nbytes in blocks:
                kind = ("h", nbytes) if isinstance(blk, int) else ("f", blk.col_start)
                if kind in seen:
                    continue
                seen.add(kind)
                ok = np.nonzero(room >= nbytes)[0]
                ok = ok[ok != j]
                if ok.size == 0:
                    continue
                t = prob.lat[j, ok] + nbytes * prob.spb[j, ok] - np.array([k in layer_devs for k in ok]) * 1e6
                for k in ok[np.argsort(t, kind="stable")[:n_dest]].tolist():
                    cand = _with_block(pl, l, blk, prob.names[k])
                    obj = _objective(prob, cand, H, net)[0]
                    if best is None or obj < best[0]:
                        best = (obj, cand)
        if best is None:
            return None
        pl = best[1]
    return None


def choose_plan(prob: Problem, new: Placement, horizon_tokens: float, budget: np.ndarray | None = None) -> Placement:
    """Step 5 with the migration delay computed properly (``migration`` aggregation):

    minimise ``T_token(plan) + migration_delay(current -> plan) / H`` over the current placement
    (if it still fits until the next decision), the new plan and per-layer mixtures of the two
    (first-improvement pass over the layers where they differ), so only the layers whose move
    pays for itself over ``H`` tokens move. When the current placement no longer fits (KV growth,
    a shrunk budget), ``repair`` adds the candidate that moves only the blocks that must move; if a
    device went down there is no such candidate and the new plan (mixed per layer) is used."""
    cur = prob.snap.current
    if cur is None or len(cur.layers) != prob.dims.n_layers or cur.source != new.source:
        return new
    net = Net(prob.snap)
    H = max(1.0, float(horizon_tokens))
    cands = [(_objective(prob, new, H, net)[0], new)]
    if _usable(prob, cur):
        cands.append((_objective(prob, cur, H, net)[0], cur))
    else:
        fixed = repair(prob, cur, H, net, budget if budget is not None else prob.budget)
        if fixed is not None and _usable(prob, fixed):
            cands.append((_objective(prob, fixed, H, net)[0], fixed))
    best_obj, best = min(cands, key=lambda c: c[0])
    diff = [l for l in range(prob.dims.n_layers) if cur.layers[l] != new.layers[l]]
    if len(diff) > 1:
        for l in diff:
            other = cur.layers[l] if best.layers[l] == new.layers[l] else new.layers[l]
            cand = Placement(best.source, best.layers[:l] + (other,) + best.layers[l + 1:], meta=best.meta)
            if not _usable(prob, cand):
                continue
            obj = _objective(prob, cand, H, net)[0]
            if obj < best_obj - 1e-12:
                best_obj, best = obj, cand
    if best is cur:
        return cur
    return Placement(best.source, best.layers, meta=new.meta)


def _keep_current(prob: Problem, new: Placement, horizon_tokens: float | None = None) -> Placement:
    """Whole-plan step 5 (used by EdgeShard-dynamic and the exact solver): keep the current
    placement unless the new one's latency + migration delay / H is lower (H defaults to one epoch)."""
    cur = prob.snap.current
    if cur is None or len(cur.layers) != prob.dims.n_layers or cur.source != new.source:
        return new
    if not _usable(prob, cur):
        return new
    H = max(1.0, float(horizon_tokens or prob.N))
    net = Net(prob.snap)
    return cur if _objective(prob, cur, H, net)[0] <= _objective(prob, new, H, net)[0] else new


def resource_aware(snapshot, dims, cost_model: str = "decode", ffn_chunks: int | None = None,
                   proj_candidates: int = 4, headroom_epochs: int = 4, horizon_epochs: int = 4,
                   horizon_tokens: int | None = None, mem_balance: float | None = 1.25,
                   balance_slack: float = 0.1, thorough: bool | None = None,
                   headroom_gain: float = 0.05) -> Placement:
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
    tight plan, ``repair`` moves the fewest blocks)."""
    from testbed.partition.baselines import first_fit

    N = max(1, snapshot.tokens_until_next_decision)
    H = float(horizon_tokens if horizon_tokens is not None else N * max(1, horizon_epochs))
    prob = Problem(snapshot, dims, cost_model, mem_tokens=N * max(1, headroom_epochs))
    try:
        prob.check_totals()
    except InfeasiblePlan:
        prob = Problem(snapshot, dims, cost_model)
        prob.check_totals()
    prob.H = max(1.0, H)
    if thorough is None:
        thorough = int(prob.allowed.sum()) <= 16
    prob.thorough = thorough
    K = max(1, min(ffn_chunks or (1 if cost_model == "paper" else 4), dims.ffn_dim))

    def one_round(budget, pr=prob):
        err = None
        for share in (False, True):
            try:
                return _round(pr, K, proj_candidates, share, budget), None
            except NoFit as exc:
                err = exc
        return None, err

    layers, last_err = one_round(prob.budget)
    capped = balanced_budget(prob, mem_balance, K)
    meta = {"algorithm": "resource_aware", "ffn_chunks": K}
    if layers is not None and capped is not prob.budget:
        bal, _ = one_round(capped)
        if bal is not None:
            free = Placement(snapshot.source, layers, meta=meta)
            tight = Placement(snapshot.source, bal, meta=meta)
            if (evaluate(tight, snapshot, dims, cost_model).token_latency_s
                    <= (1 + balance_slack) * evaluate(free, snapshot, dims, cost_model).token_latency_s):
                layers, meta = bal, {**meta, "mem_balanced": True}
    if layers is None:
        try:
            return first_fit(snapshot, dims, cost_model)
        except InfeasiblePlan:
            raise prob.no_fit(last_err.block, last_err.nbytes, prob.budget) from None
    budget = capped if meta.get("mem_balanced") else prob.budget
    if thorough and prob.T_mem > prob.T + prob.N:
        tight = Problem(snapshot, dims, cost_model)
        tight.H, tight.thorough = prob.H, True
        lt, _ = one_round(tight.budget, tight)
        if lt is not None:
            t_lat = evaluate(Placement(snapshot.source, lt), snapshot, dims, cost_model).token_latency_s
            h_lat = evaluate(Placement(snapshot.source, layers), snapshot, dims, cost_model).token_latency_s
            if t_lat < (1 - headroom_gain) * h_lat:
                layers, meta, prob, budget = lt, {**meta, "tight_memory": True}, tight, tight.budget
    new = Placement(snapshot.source, layers, meta=meta)
    return choose_plan(prob, new, prob.H, budget)
