"""Baseline partitioners: greedy first-fit, round-robin and Galaxy-style tensor parallelism.

EdgeShard (layer DP) lives in ``edgeshard``. All are pure functions of a snapshot; every block is
sized at the memory horizon ``T + tokens_until_next_decision``. The FFN is one block per layer
(``ffn_chunks = 1``) except in Galaxy, which splits its columns.

Simplifications (also in the README of this package):
- ``greedy``: blocks in model order (L0.H0.., L0.proj, L0.ffn, L1...), each on the first device in
  snapshot order with room. No latency awareness.
- ``round_robin``: blocks in model order, cyclic over the devices allowed to hold blocks; a device
  without room is skipped (next in the cycle).
- ``galaxy``: one device group for all layers = the ``g`` fastest devices, ``g`` chosen by the cost
  model among 1..n (planned once, never re-planned). Inside each layer, heads (KV groups) and FFN
  columns are split in proportion to device speed, water-filled under each device's memory limit,
  rounded by largest remainder. Galaxy's sequence-parallel connective blocks degenerate for one
  decoded token, so W_o and the FFN aggregation sit on the group's fastest device.
"""
from __future__ import annotations

import numpy as np

from testbed.partition.common import Problem, check_memory, evaluate
from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import FfnShard, LayerPlacement, Placement


def _blocks_in_order(prob: Problem):
    d = prob.dims
    for l in range(d.n_layers):
        for g in range(d.n_kv_heads):
            yield l, f"L{l}.H{g}", prob.sz.head_b
        yield l, f"L{l}.proj", prob.sz.proj_b
        yield l, f"L{l}.ffn", d.ffn_dim * prob.sz.ffn_col_b


def _assemble(prob: Problem, where: dict[str, str]) -> Placement:
    d = prob.dims
    layers = tuple(
        LayerPlacement(tuple(where[f"L{l}.H{g}"] for g in range(d.n_kv_heads)), where[f"L{l}.proj"],
                       (FfnShard(where[f"L{l}.ffn"], 0, d.ffn_dim),))
        for l in range(d.n_layers))
    return Placement(prob.snap.source, layers)


def first_fit(snapshot, dims, cost_model: str = "decode") -> Placement:
    """``greedy``: first-fit in block order."""
    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    resid = prob.budget.copy()
    order = np.nonzero(prob.allowed)[0].tolist()
    where: dict[str, str] = {}
    for _, block, nbytes in _blocks_in_order(prob):
        j = next((j for j in order if resid[j] >= nbytes), None)
        if j is None:
            raise prob.no_fit(block, nbytes, resid)
        resid[j] -= nbytes
        where[block] = prob.names[j]
    pl = _assemble(prob, where)
    return Placement(pl.source, pl.layers, meta={"algorithm": "greedy"})


def round_robin(snapshot, dims, cost_model: str = "decode") -> Placement:
    """``round_robin``: cyclic over the devices allowed to hold blocks, skipping full ones."""
    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    resid = prob.budget.copy()
    order = np.nonzero(prob.allowed)[0].tolist()
    where: dict[str, str] = {}
    pos = 0
    for _, block, nbytes in _blocks_in_order(prob):
        for step in range(len(order)):
            j = order[(pos + step) % len(order)]
            if resid[j] >= nbytes:
                break
        else:
            raise prob.no_fit(block, nbytes, resid)
        resid[j] -= nbytes
        where[block] = prob.names[j]
        pos = (pos + step + 1) % len(order)
    pl = _assemble(prob, where)
    return Placement(pl.source, pl.layers, meta={"algorithm": "round_robin"})


def _largest_remainder(frac: np.ndarray, total: int) -> np.ndarray:
    raw = frac * total
    out = np.floor(raw).astype(int)
    rest = total - int(out.sum())
    if rest > 0:
        out[np.argsort(-(raw - out), kind="stable")[:rest]] += 1
    return out


def _water_fill(speed: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Fractions proportional to speed, none above its cap (sum 1 if the caps allow)."""
    frac = np.zeros_like(speed)
    free = np.ones(len(speed), dtype=bool)
    left = 1.0
    for _ in range(len(speed)):
        share = left * speed * free / max(float((speed * free).sum()), 1e-300)
        over = free & (share > cap)
        if not over.any():
            frac[free] = share[free]
            return frac
        frac[over], left = cap[over], left - float(cap[over].sum())
        free &= ~over
    return frac


def _galaxy_plan(prob: Problem, group: list[int]) -> Placement:
    d, L = prob.dims, prob.dims.n_layers
    speed = prob.C[group]
    per_layer = d.n_kv_heads * prob.sz.head_b + d.ffn_dim * prob.sz.ffn_col_b
    room = prob.budget[group].copy()
    room[0] -= L * prob.sz.proj_b
    room -= L * (prob.sz.head_b + prob.sz.ffn_col_b)  # largest-remainder rounding adds <= 1 of each
    frac = _water_fill(speed, np.clip(room, 0, None) / (L * per_layer))
    if frac.sum() < 1 - 1e-9:
        raise InfeasiblePlan(f"galaxy group of {len(group)} cannot hold the model")
    heads = _largest_remainder(frac, d.n_kv_heads)
    cols = _largest_remainder(frac, d.ffn_dim)
    names = [prob.names[j] for j in group]
    # the layer is a function of the group and the two splits: one object per such triple in
    # ``prob.memo`` (shared with the problems of the same snapshot, ``ra.objective.share_costs``), so
    # that the planners' memos by identity cost it once
    key = (tuple(group), tuple(heads.tolist()), tuple(cols.tolist()))
    made = prob.memo.setdefault("galaxy_layers", {})
    layer = made.get(key)
    if layer is None:
        head_t = tuple(n for n, c in zip(names, heads) for _ in range(c))
        shards, pos = [], 0
        for n, c in zip(names, cols):
            if c > 0:
                shards.append(FfnShard(n, pos, pos + int(c)))
                pos += int(c)
        shards.sort(key=lambda s: s.device != names[0])
        if shards[0].device != names[0]:  # aggregator must hold a shard: give it one column
            raise InfeasiblePlan("galaxy: fastest device holds no FFN columns")
        layer = made[key] = LayerPlacement(head_t, names[0], tuple(shards))
    pl = Placement(prob.snap.source, (layer,) * L, meta={"algorithm": "galaxy", "group": names})
    check_memory(pl, prob.snap, d, prob.cost_model, prob.T_mem)
    return pl


def galaxy_plans(prob: Problem, sizes):
    """(g, Galaxy's plan over the g fastest allowed devices, or the InfeasiblePlan saying why not)
    for each group size g in ``sizes`` (at most the number of allowed devices)."""
    order = sorted(np.nonzero(prob.allowed)[0].tolist(), key=lambda j: (-prob.C[j], j))
    for g in sizes:
        if g > len(order):
            break
        try:
            yield g, _galaxy_plan(prob, order[:g])
        except InfeasiblePlan as exc:
            yield g, exc


def galaxy(snapshot, dims, cost_model: str = "decode", max_group: int | None = None) -> Placement:
    """``galaxy``: per-layer tensor parallelism over the best group of fastest devices."""
    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    n = int(prob.allowed.sum())
    best, best_lat, last_err = None, np.inf, None
    for g, pl in galaxy_plans(prob, range(1, min(n, max_group or n) + 1)):
        if isinstance(pl, InfeasiblePlan):
            last_err = pl
            continue
        lat = evaluate(pl, snapshot, dims, cost_model).token_latency_s
        if lat < best_lat:
            best, best_lat = pl, lat
    if best is None:
        raise InfeasiblePlan(f"galaxy: no group of the fastest devices holds the model ({last_err})")
    return best
