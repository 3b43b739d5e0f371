"""RA step 6's moves (``ra.leveling``), one round in Python: the candidate moves of one head group
or one FFN chunk off the device with the largest peak (``_candidates``: destinations near the
layer's dataflow first, then by the transfer time of the block's messages, each with room), their
de-duplication by what decides their effect (``_signature``) within the evaluation budget, and the
move with the least objective added per byte of peak removed within the bounds (``_best_move``);
how a move changes a layer (``_moved_layer``). The reference of the compiled round
(``ra.leveling_kernel``) and the round re-decisions use. Pure functions of a ``Problem``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from testbed.partition.common import Problem, sizes_for
from testbed.partition.ra.choice import _objective, plan_arrays, plan_cost, problem_net
from testbed.partition.ra.objective import no_migration, objective_without_migration, remember_cost
from testbed.core.placement import FfnShard, LayerPlacement, Placement

class _Move(NamedTuple):
    """One candidate: block ``blk`` (head group index, or an FfnShard) of layer ``l`` from ``a`` to ``dest``."""

    far: bool  # the destination adds a hop to the layer's dataflow
    key_s: float  # the block's messages' transfer time to/from the destination (ranking only)
    l: int
    blk: int | FfnShard
    cols: int  # FFN columns moved (0 for a head)
    dest: int
    nbytes: float  # bytes at the peak horizon


def peak_horizon(prob: Problem) -> int:
    """Context at which peaks are measured: the end of the run when known, else the memory horizon."""
    end = prob.snap.end_context_len
    return int(end) if end != float("inf") else int(prob.T_mem)


def _move(pl: Placement, m: _Move, dest: str) -> Placement:
    """``pl`` with move ``m`` applied (``_moved_layer``)."""
    return Placement(pl.source, pl.layers[:m.l] + (_moved_layer(pl.layers[m.l], m, dest),) + pl.layers[m.l + 1:],
                     meta=pl.meta)


def _moved_layer(lp: LayerPlacement, m: _Move, dest: str) -> LayerPlacement:
    """Layer ``lp`` with move ``m`` applied (an FFN chunk is cut off the END of its shard; it joins
    the destination's shard when that starts where the chunk ends)."""
    if isinstance(m.blk, int):
        return LayerPlacement(lp.heads[:m.blk] + (dest,) + lp.heads[m.blk + 1:], lp.proj, lp.ffn)
    s, c0 = m.blk, m.blk.col_end - m.cols
    shards, merged = [], False
    for t in lp.ffn:
        if t == s:
            if c0 > s.col_start:
                shards.append(FfnShard(s.device, s.col_start, c0))
        elif t.device == dest and t.col_start == s.col_end:
            shards.append(FfnShard(dest, c0, t.col_end))
            merged = True
        else:
            shards.append(t)
    if not merged:
        new = FfnShard(dest, c0, s.col_end)
        # the whole aggregator shard moved: the destination becomes the aggregator
        shards = [new] + shards if (s == lp.ffn[0] and c0 == s.col_start) else shards + [new]
    return LayerPlacement(lp.heads, lp.proj, tuple(shards))


class _Memo:
    """What leveling derives from the problem and from layer objects, once per problem (layers are
    recognised by identity, each entry keeping its layer so that the id stays taken): per layer
    its devices as indices, a canonical number per layer VALUE (equal layers, one number: a move's
    signature compares layers by value without hashing them each time), the moved layers (a move
    made again in a later round yields the same layer object, whose costs are memoised), and the
    destination keys per (input, proj) / (proj, aggregator) pair."""

    def __init__(self, prob: Problem):
        # what it needs of the problem, not the problem (it lives in the problem's memo: no cycle)
        self.index, self.names = prob.index, prob.names
        self.lat, self.spb, self.allowed = prob.lat, prob.spb, prob.allowed
        # block bytes at the peak horizon (message bytes depend on the context only: prob.sz's)
        self.sz = sizes_for(prob.dims, prob.cost_model, prob.T, peak_horizon(prob))
        self.layers: dict = {}  # id(LayerPlacement) -> (it, its devices)
        self.values: dict = {}  # LayerPlacement -> canonical number
        self.ids: dict = {}  # id(LayerPlacement) -> (it, canonical number)
        self.moved: dict = {}  # (id(layer), block, columns, destination) -> (layer, moved layer)
        self.keys: dict = {}  # ("h", A, P) / ("f", P, agg) -> (key per device, allowed and finite)
        self.ranked: dict = {}  # (id(layer), kind, its input) -> (it, ``_ranked``'s lists)
        self.blocks: dict = {}  # (id(layer), device, chunk columns) -> (it, the blocks ``_candidates`` may move off it)

    def devices(self, lp: LayerPlacement) -> tuple:
        """(proj, aggregator, the layer's devices (a mask over devices), device -> last head group)."""
        hit = self.layers.get(id(lp))
        if hit is None or hit[0] is not lp:
            idx = self.index
            last = {idx[d]: g for g, d in enumerate(lp.heads)}
            devs = np.zeros(len(self.names), dtype=bool)
            devs[[*last, idx[lp.proj], *(idx[s.device] for s in lp.ffn)]] = True
            hit = self.layers[id(lp)] = (lp, (idx[lp.proj], idx[lp.ffn[0].device], devs, last))
        return hit[1]

    def canon(self, lp: LayerPlacement | None):
        if lp is None:
            return None
        hit = self.ids.get(id(lp))
        if hit is None or hit[0] is not lp:
            hit = self.ids[id(lp)] = (lp, self.values.setdefault(lp, len(self.values)))
        return hit[1]

    def moved_layer(self, lp: LayerPlacement, m: _Move) -> LayerPlacement:
        key = (id(lp), m.blk, m.cols, m.dest)
        hit = self.moved.get(key)
        if hit is None or hit[0] is not lp:
            hit = self.moved[key] = (lp, _moved_layer(lp, m, self.names[m.dest]))
        return hit[1]

    def key(self, kind: str, u: int, v: int) -> tuple[np.ndarray, np.ndarray]:
        """Transfer time of a block's messages to/from each device (heads: x from ``u`` = the
        layer's input, output to ``v`` = the proj; FFN chunks: h from ``u`` = the proj, partial to
        ``v`` = the aggregator), and where it is finite on an allowed device."""
        hit = self.keys.get((kind, u, v))
        if hit is None:
            sz, lat, spb = self.sz, self.lat, self.spb
            out_b = sz.head_out_b if kind == "h" else sz.x_b
            key = lat[u] + sz.x_b * spb[u] + lat[:, v] + out_b * spb[:, v]  # (devices,)
            hit = self.keys[(kind, u, v)] = (key, self.allowed & np.isfinite(key))
        return hit


def _memo(prob: Problem) -> _Memo:
    memo = prob.memo.get("leveling")
    if memo is None:
        memo = prob.memo["leveling"] = _Memo(prob)
    return memo


def _ranked(memo: _Memo, lp: LayerPlacement, kind: str, A_l: int, P: int, agg: int) -> tuple[list, list, list]:
    """A block's destinations in ``_candidates``' order, those allowed with a finite key only:
    (devices, near or far, key), near ones (a device of the layer or its input ``A_l``: no new
    hop) first, each part by key then index. Memoised per (layer, kind, input)."""
    hit = memo.ranked.get((id(lp), kind, A_l))
    if hit is None or hit[0] is not lp:
        key, usable = memo.key(kind, A_l, P) if kind == "h" else memo.key(kind, P, agg)
        near = memo.devices(lp)[2].copy()
        near[A_l] = True
        parts = []
        for far, mask in ((False, usable & near), (True, usable & ~near)):
            idx = np.flatnonzero(mask)
            idx = idx[np.argsort(key[idx], kind="stable")]  # by key, ties by index
            parts.append((idx.tolist(), [far] * len(idx), key[idx].tolist()))
        devs, fars, keys = (parts[0][i] + parts[1][i] for i in range(3))
        hit = memo.ranked[(id(lp), kind, A_l)] = (lp, (devs, fars, keys))
    return hit[1]


def _candidates(prob: Problem, pl: Placement, a: int, room: np.ndarray, chunk_cols: int,
                n_dest: int, only: set[int] | None = None) -> list[_Move]:
    """Moves of one head group or one FFN chunk per layer (of the layers in ``only``, default all)
    off device ``a``, to the ``n_dest`` best
    destinations with ``room`` for it (bytes; the caller keeps every destination below ``a``'s peak):
    devices near the layer's dataflow first, then by the messages' transfer time, then by index
    (``_ranked``, filtered by room)."""
    memo = _memo(prob)
    sz, name, index = memo.sz, prob.names[a], prob.index
    room_l = room.tolist()
    out: list[_Move] = []
    A = prob.src
    for l, lp in enumerate(pl.layers):
        A_l, A = A, index[lp.ffn[0].device]  # the layer's input, the next layer's
        if only is not None and l not in only:
            continue
        hit = memo.blocks.get((id(lp), a, chunk_cols))
        if hit is None or hit[0] is not lp:
            on_a = [s for s in lp.ffn if s.device == name]
            blocks = []
            if on_a or name in lp.heads:
                P, agg, _, last = memo.devices(lp)
                blocks = [(last[a], 0, sz.head_b, "h", P, agg)] if a in last else []
                for s in on_a:
                    c = min(chunk_cols, s.col_end - s.col_start)
                    blocks.append((s, c, c * sz.ffn_col_b, "f", P, agg))
            hit = memo.blocks[(id(lp), a, chunk_cols)] = (lp, blocks)
        for blk, cols, nbytes, kind, P, agg in hit[1]:
            devs, fars, keys = _ranked(memo, lp, kind, A_l, P, agg)
            taken = 0
            for j, far, k in zip(devs, fars, keys):
                if j != a and room_l[j] >= nbytes:
                    out.append(_Move(far, k, l, blk, cols, j, nbytes))
                    taken += 1
                    if taken == n_dest:
                        break
    return out


def _signature(prob: Problem, pl: Placement, m: _Move) -> tuple:
    """What decides move ``m``'s effect on the objective: the layer, its input device, the next
    layer (its input may change), the layer's current placement (migration) and the move itself
    (the block by kind and columns, not by index: head groups of one device are interchangeable).
    Layers by value (``_Memo.canon``)."""
    l, cur, memo = m.l, prob.snap.current, _memo(prob)
    blk = "h" if isinstance(m.blk, int) else (m.blk.col_start == pl.layers[l].ffn[0].col_start, m.blk, m.cols)
    return (memo.canon(pl.layers[l]), pl.layers[l - 1].ffn[0].device if l else None,
            memo.canon(pl.layers[l + 1] if l + 1 < len(pl.layers) else None),
            memo.canon(cur.layers[l] if cur is not None and len(cur.layers) == len(pl.layers) else None),
            blk, m.dest)


def _best_move(prob: Problem, pl: Placement, cands: list[_Move], cur: float, limit: float, lat_limit: float,
               budget: int):
    """The candidate with the least objective added per byte among those within ``limit`` (objective)
    and ``lat_limit`` (latency), evaluating at most ``budget`` distinct moves, most promising first:
    ((score, objective, move, plan) or None, evaluations made). Under ``decode`` every candidate's
    latency is computed at once (``PlanArrays.latencies_swapped``), and without a current placement
    (no migration: the objective is the latency) no candidate plan is built but the best one."""
    net, best, seen, todo, memo = problem_net(prob), None, set(), [], _memo(prob)
    for m in sorted(cands, key=lambda m: (m.far, m.key_s, m.l, m.dest)):
        if len(todo) >= budget:
            break
        same = _signature(prob, pl, m)
        if same in seen:  # an identical layer in the same surroundings: the same effect
            continue
        seen.add(same)
        todo.append((m, memo.moved_layer(pl.layers[m.l], m)))
    if not todo:
        return None, 0

    def plan(m: _Move, lp: LayerPlacement) -> Placement:
        return Placement(pl.source, pl.layers[:m.l] + (lp,) + pl.layers[m.l + 1:], meta=pl.meta)

    if prob.cost_model == "decode":
        lats = plan_arrays(prob).latencies_swapped(pl, [(m.l, lp) for m, lp in todo])
    else:
        lats = [plan_cost(prob, plan(m, lp), net) for m, lp in todo]
    free = no_migration(prob, len(pl.layers))
    for (m, lp), lat in zip(todo, lats):
        if lat.token_latency_s > lat_limit:
            continue  # no migration estimate for a move the latency already rules out
        cand = None
        if free:
            obj = objective_without_migration(lat.token_latency_s, prob.H)
        else:
            cand = plan(m, lp)
            remember_cost(prob, cand, lat)
            obj = _objective(prob, cand, prob.H, net)[0]
        score = (obj - cur) / m.nbytes  # objective added per byte of peak removed
        if obj <= limit and (best is None or score < best[0]):
            best = (score, obj, m, cand if cand is not None else lp)
    if best is not None and not isinstance(best[3], Placement):
        best = (*best[:3], plan(best[2], best[3]))
    return best, len(todo)
