"""RA step 6: level memory by heads (issue 19) — lower the largest device's peak at (almost) no latency.

The memory policy RA states (``ra.planner``'s docstring): first minimise latency (+ migration delay
/ H) subject to every device having room for the KV growth until the memory horizon (the next
decisions, or the end of the run when the snapshot knows ``tokens_remaining``); then, among plans
whose objective is within ``tol`` (default 2 %) of that best one, minimise the largest device's
PEAK — its blocks' bytes at the end of the run when known, else at the memory horizon.

``level`` does the second part greedily, at the granularity only a head-level planner has: while
some move lowers the device with the largest peak, it moves ONE head group with its KV cache, or
one FFN chunk (``ffn_dim / ffn_chunks`` columns), off that device to a device with headroom, never
a whole layer. Each candidate is evaluated with the full cost model (``ra.choice._objective``:
latency + migration delay from the current placement / H, so on a re-decision a move pays its
migration within the horizon or is not made) and the move with the smallest objective increase
per byte of peak removed is applied, as long as the plan's objective AND its predicted latency
both stay within ``(1 + tol)`` of those the leveling started from (the objective alone would let a
re-decision whose objective is dominated by a forced migration's stall trade up to 9 % of latency,
measured on the recorded RA instances). Destinations that keep the dataflow short come first:
a device that already holds part of the layer or sends the layer's input (no new hop), then
devices by the transfer time the block's messages would take (a head needs the layer's input and
sends its output to the projection; an FFN chunk needs ``h`` from the projection and sends its
partial to the aggregator). A destination must fit the moved block at the peak horizon and end
below the peak it relieves, so the sorted vector of peaks decreases at every move (termination);
the work is bounded by ``max_evals`` plan evaluations (no clock: deterministic).
Pure functions of a ``Problem``. Where the objective is the latency (no current placement) under
``decode``, each round runs compiled (``ra.leveling_kernel``, the same moves); the Python round
(``_candidates``, ``_best_move``) is the reference and takes re-decisions.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from testbed.partition.common import Problem, sizes_for
from testbed.partition.cost import layer_kernel
from testbed.partition.ra import leveling_kernel
from testbed.partition.ra.choice import _block_use, _objective, plan_arrays, plan_cost, problem_net
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


def worker_peaks(prob: Problem, pl: Placement, until: int | None = None) -> np.ndarray:
    """Block bytes per device (index order) at ``until`` (default ``peak_horizon``), the source's
    embedding/LM head excluded."""
    return _block_use(prob, pl, peak_horizon(prob) if until is None else until)


def _leveled(prob: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(devices whose peak the policy levels, bytes each holds besides its blocks). Every device
    but the source; the source too when it may hold blocks (``allow_blocks_on_source``), with its
    embeddings and LM head counted, so the largest peak is the largest device's whole footprint
    (leveling a worker below a source that holds most of the model lowers no device that matters)."""
    from testbed.partition.cost import blocks as B

    w = np.ones(len(prob.names), dtype=bool)
    fixed = np.zeros(len(prob.names))
    if prob.snap.allow_blocks_on_source:
        fixed[prob.src] = float(B.source_bytes(prob.dims))
    else:
        w[prob.src] = False
    return w, fixed


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


class _Compiled:
    """The plan as ``leveling_kernel.level_round`` reads it, kept up to date move by move, and the
    problem's constants: the rounds of a plan whose objective is its latency (no current placement)
    under ``decode``."""

    def __init__(self, prob: Problem, pl: Placement, only: set[int] | None):
        arr, memo = plan_arrays(prob), _memo(prob)
        if arr._kc is None:
            arr._kc = np.array([float(arr.k[c]) for c in layer_kernel.CONSTANTS])
        self.prob, self.memo, self.index = prob, memo, prob.index
        self.const = (arr.lat, arr.spb, arr.speed, arr.mem_bw, arr.call_s, arr._kc, float(arr.lm_s), int(prob.src))
        self.sizes = np.array([memo.sz.x_b, memo.sz.head_out_b, memo.sz.head_b, memo.sz.ffn_col_b], dtype=float)
        L = len(pl.layers)
        self.only = np.array([only is None or l in only for l in range(L)])
        self.heads = np.array([[self.index[d] for d in lp.heads] for lp in pl.layers], dtype=np.int64)
        self.proj = np.array([self.index[lp.proj] for lp in pl.layers], dtype=np.int64)
        self.shards = [self._shards(lp) for lp in pl.layers]
        self.flat = self._flat()
        self.canon = np.array([memo.canon(lp) for lp in pl.layers], dtype=np.int64)
        n = len(prob.names)  # what level_round keeps per layer between rounds (its docstring)
        self.kept = (np.empty(L), np.empty(L), np.empty((2, L, n), dtype=np.int64), np.empty((2, L, n)),
                     np.zeros((2, L, 2), dtype=np.int64), np.zeros(L, dtype=bool))

    def _shards(self, lp: LayerPlacement) -> list:
        return [(self.index[s.device], s.col_start, s.col_end) for s in lp.ffn]

    def _flat(self) -> tuple:
        """The shards as ``level_round`` reads them: (devices, first columns, end columns, offsets)."""
        flat = [s for layer in self.shards for s in layer]
        soff = np.cumsum([0] + [len(layer) for layer in self.shards])
        return (*(np.array(col, dtype=np.int64) for col in zip(*flat)), soff)

    def round(self, pl: Placement, a: int, room: np.ndarray, chunk_cols: int, n_dest: int, cur: float,
              limit: float, lat_limit: float, budget: int):
        """``level_round`` on ``pl``: (status, evaluations, the best ``_Move`` or None, its objective)."""
        status, n, (l, kind, blk, cols, dest), obj = leveling_kernel.level_round(
            *self.const, self.heads, self.proj, *self.flat, self.canon, self.prob.allowed, a, room, chunk_cols,
            n_dest, self.only, self.sizes, float(self.prob.H), cur, limit, lat_limit, budget, *self.kept)
        if status != leveling_kernel.OK or l < 0:
            return status, n, None, obj
        sz = self.memo.sz
        if kind == 0:
            return status, n, _Move(False, 0.0, l, blk, 0, dest, sz.head_b), obj
        return status, n, _Move(False, 0.0, l, pl.layers[l].ffn[blk], cols, dest, cols * sz.ffn_col_b), obj

    def moved(self, m: _Move, lp: LayerPlacement) -> None:
        """Record move ``m``, which made layer ``m.l`` into ``lp`` (the next layer's input may have changed)."""
        self.kept[-1][m.l:m.l + 2] = False
        self.canon[m.l] = self.memo.canon(lp)
        if isinstance(m.blk, int):
            self.heads[m.l, m.blk] = m.dest
        else:
            self.shards[m.l] = self._shards(lp)
            self.flat = self._flat()


def level(prob: Problem, pl: Placement, tol: float = 0.02, chunks: int = 4, n_dest: int = 2,
          max_evals: int = 2000, ref_latency_s: float = float("inf"),
          only: set[int] | None = None, compiled: bool = True) -> tuple[Placement, dict]:
    """Lower the largest worker peak of ``pl`` within ``(1 + tol)`` x its objective and x its
    latency (or ``ref_latency_s`` when lower: the fastest plan the planner weighed) (module
    docstring), moving blocks of the layers in ``only`` (default: all). Returns (plan, what was
    done: ``moves``, ``evals``, peaks before and after). ``compiled``: rounds of a plan with no
    current placement under ``decode`` run in ``leveling_kernel`` (the same moves; False: the
    Python rounds, the reference)."""
    until = peak_horizon(prob)
    cur, lat0, _ = _objective(prob, pl, prob.H, problem_net(prob))
    limit, lat_limit = (1 + tol) * cur, (1 + tol) * min(lat0, ref_latency_s)
    used = worker_peaks(prob, pl, until)
    fit = _block_use(prob, pl, int(prob.T_mem))
    workers, fixed = _leveled(prob)
    before = float((used + fixed)[workers].max(initial=0.0))
    chunk_cols = -(-prob.dims.ffn_dim // max(1, chunks))
    fast = None
    if compiled and prob.cost_model == "decode" and no_migration(prob, len(pl.layers)):
        fast = _Compiled(prob, pl, only)
    moves = evals = 0
    while evals < max_evals:
        total = used + fixed
        a = int(np.argmax(np.where(workers, total, -np.inf)))
        # room at the peak horizon (and at the memory horizon the plan was made for), below a's peak
        room = np.minimum(prob.budget - used, prob.budget - fit)
        room = np.minimum(room, total[a] - total - 1.0)
        status = None
        if fast is not None:
            status, n, m, obj = fast.round(pl, a, room, chunk_cols, n_dest, cur, limit, lat_limit, max_evals - evals)
        if status == leveling_kernel.OK:
            evals += n
            if m is None:
                break
            lp = _memo(prob).moved_layer(pl.layers[m.l], m)
            pl, cur = Placement(pl.source, pl.layers[:m.l] + (lp,) + pl.layers[m.l + 1:], meta=pl.meta), obj
        else:  # the Python round (also where the compiled one met a NaN arrival)
            cands = _candidates(prob, pl, a, room, chunk_cols, n_dest, only)
            best, n = _best_move(prob, pl, cands, cur, limit, lat_limit, max_evals - evals)
            evals += n
            if best is None:
                break
            _, cur, m, pl = best
        if fast is not None:
            fast.moved(m, pl.layers[m.l])
        delta_fit = m.nbytes if isinstance(m.blk, FfnShard) else prob.sz.head_b
        used[a] -= m.nbytes
        used[m.dest] += m.nbytes
        fit[a] -= delta_fit
        fit[m.dest] += delta_fit
        moves += 1
    after = float((used + fixed)[workers].max(initial=0.0))
    return pl, {"leveling_moves": moves, "leveling_evals": evals,
                "leveling_peak_before_bytes": int(before), "leveling_peak_after_bytes": int(after)}


def memory_binds(prob: Problem, pl: Placement, frac: float) -> bool:
    """Whether memory binds for ``pl``: some device that may hold blocks ends above ``frac`` of its
    block budget at the peak horizon (the end of the run when known). Where it does not, a lower
    peak buys nothing the run needs, and step 6 levels only at (practically) equal latency."""
    peaks = worker_peaks(prob, pl)
    ok = prob.allowed & (prob.budget > 0)
    return bool(np.any(peaks[ok] > frac * prob.budget[ok]))


def level_plan(prob: Problem, pl: Placement, tol: float, chunks: int, max_evals: int,
               ref_latency_s: float = float("inf"), rate_hedge: float | None = None,
               only: set[int] | None = None) -> Placement:
    """``level``'s plan with what it did in ``meta`` (``leveling_*``); ``pl`` itself when nothing moved,
    or when ``rate_hedge`` is set and the leveled plan's objective with every link at ``rate_hedge`` x
    its rate (``ra.hedge``) is more than ``1 + tol`` times ``pl``'s: moves that cost nothing while the
    links hold can put heads behind slow links (step 4d's bet, made again by the back door).
    ``only``: the layers whose blocks may move (``level``)."""
    if only is not None and not only:
        return pl
    out, info = level(prob, pl, tol, chunks, max_evals=max_evals, ref_latency_s=ref_latency_s, only=only)
    if not info["leveling_moves"]:
        return pl
    if rate_hedge is not None:
        from testbed.partition.ra.hedge import slow_objective

        if slow_objective(prob, out, rate_hedge) > (1 + tol) * slow_objective(prob, pl, rate_hedge):
            return pl
    return Placement(out.source, out.layers, meta={**pl.meta, **info})