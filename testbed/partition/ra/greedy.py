"""One greedy round of the resource-aware partitioner: per layer, try anchor (projection) devices
and claim orders, place each head / FFN chunk on the device that least delays the layer's critical
path given what this round already placed (steps 2-4 of ``testbed.partition.ra.planner``'s docstring).
The ``decode``-model passes are in ``ra.decode`` (and compiled, with a layer's whole choice of
anchor, in ``ra.decode_kernel``), the ``paper``-model ones here.
Pure functions over a ``Problem``; numpy for per-device vectors, heaps for the per-block choice.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.common import NoFit, Problem, assign_ffn, assign_heads
from testbed.partition.ra import decode_kernel as DK
from testbed.partition.ra.decode import _tables, ffn_compiled, heads_compiled
from testbed.core.placement import LayerPlacement


def _cur_layer(prob: Problem, l: int):
    cur = prob.snap.current
    if cur is None or len(cur.layers) != prob.dims.n_layers:
        return None
    return cur.layers[l]


def _mig_in(prob: Problem, cur_counts: np.ndarray, nbytes: float) -> np.ndarray:
    """Amortised cost of bringing one block into each device from its nearest current holder."""
    holders = np.nonzero(cur_counts > 0)[0]
    if holders.size == 0:
        return np.zeros(len(prob.names))
    memo = prob.memo.setdefault("ra_move_in", {})
    if nbytes not in memo:  # (from, to): one block's transfer, once per problem and block size
        memo[nbytes] = prob.lat + nbytes * prob.spb
    return memo[nbytes][holders].min(axis=0) / getattr(prob, "H", prob.N)


def _counts(prob: Problem, devices) -> np.ndarray:
    """Blocks per device (index order, as floats)."""
    idx = [prob.index[d] for d in devices]
    return np.bincount(idx, minlength=len(prob.names)).astype(float) if idx else np.zeros(len(prob.names))


@lru_cache(maxsize=64)
def _chunk_mids(ffn_dim: int, chunks: int) -> tuple[int, ...]:
    """The middle column of each of ``chunks`` FFN chunks (which shard holds a chunk)."""
    return tuple((a + b) // 2 for a, b in B.ffn_chunk_bounds(ffn_dim, chunks))


class _Layer:
    """Inputs for planning one layer: input device, anchor, residual memory and hysteresis data."""

    def __init__(self, prob: Problem, l: int, A: int, chunks: int):
        cur = _cur_layer(prob, l)
        # everything but A depends on the layer only through its current placement: computed
        # once per problem for layers without one (a first plan), once per layer otherwise
        memo = prob.memo.setdefault("ra_layer", {})
        key = (-1 if cur is None else l, chunks)
        if key not in memo:
            self._derive(prob, l, chunks)
            # without the problem itself: the memo lives in it (no reference cycle, so a
            # decision's memos are freed as soon as it returns, not by the garbage collector)
            memo[key] = {k: v for k, v in self.__dict__.items() if k != "prob"}
        self.__dict__.update(memo[key])
        self.prob, self.l, self.A, self.K = prob, l, A, chunks

    def _derive(self, prob: Problem, l: int, chunks: int) -> None:
        self.prob, self.l, self.K = prob, l, chunks
        self.chunk_cols = -(-prob.dims.ffn_dim // chunks)
        self.chunk_b = self.chunk_cols * prob.sz.ffn_col_b
        cur = _cur_layer(prob, l)
        self.cur = cur
        n = len(prob.names)
        self.cur_heads = _counts(prob, cur.heads) if cur else np.zeros(n)
        self.cur_proj = prob.index.get(cur.proj) if cur else None
        self.cur_chunks = _counts(prob, [next(s.device for s in cur.ffn if s.col_start <= m < s.col_end)
                                         for m in _chunk_mids(prob.dims.ffn_dim, chunks)]) if cur else np.zeros(n)
        mig_head = _mig_in(prob, self.cur_heads, prob.sz.mig_head_b)
        mig_chunk = _mig_in(prob, self.cur_chunks, self.chunk_cols * prob.sz.mig_col_b)
        self.mig_head, self.mig_chunk = mig_head.tolist(), mig_chunk.tolist()
        self.mig_head_a, self.mig_chunk_a = mig_head, mig_chunk  # (the compiled passes')
        self.tab = tab = _tables(prob, chunks)
        al = tab.allowed_idx
        # a block's first copy on a device it does not hold yet pays the migration penalty
        self.pen0_head_al = np.where(self.cur_heads[al] > 0, 0.0, mig_head[al])
        self.pen0_chunk_al = np.where(self.cur_chunks[al] > 0, 0.0, mig_chunk[al])
        self.cur_heads_l, self.cur_chunks_l = self.cur_heads.tolist(), self.cur_chunks.tolist()

    def anchor_s(self, P: int) -> float:
        """The projection's share of a plan anchored on P: its move penalty + its compute."""
        return self.proj_pen(P) + self.prob.sz.proj_f / self.prob.C[P]

    def proj_pen(self, P: int) -> float:
        if self.cur_proj is None or self.cur_proj == P:
            return 0.0
        p = self.prob
        return (p.lat[self.cur_proj, P] + p.sz.mig_proj_b * p.spb[self.cur_proj, P]) / getattr(p, "H", p.N)


def _agg_candidates(ly: _Layer, P: int, r: list, exit_s: np.ndarray | None, k: int = 2) -> list[int]:
    """Aggregator devices to try for anchor P: the ``k`` cheapest with room for a chunk by
    (h from P + one chunk + the aggregator's exit transfer ``exit_s``), plus P itself."""
    p = ly.prob
    fc = ly.chunk_cols * p.sz.ffn_col_f / np.where(p.C > 0, p.C, np.nan)
    key = np.where(np.arange(len(fc)) == P, 0.0, p.lat[P] + p.sz.x_b * p.spb[P]) + fc
    key = key + (ly.cur_chunks <= 0) * np.array(ly.mig_chunk)
    if exit_s is not None:
        key = key + exit_s
    ok = p.allowed & (np.array(r) >= ly.chunk_b) & np.isfinite(key)
    idx = np.nonzero(ok)[0]
    if idx.size == 0:
        raise NoFit(f"L{ly.l}.ffn", ly.chunk_b)
    out = idx[np.argsort(key[idx], kind="stable")[:k]].tolist()
    if ok[P] and P not in out:
        out.append(P)
    return out


def _heads_paper(ly: _Layer, P: int, r: list) -> tuple[float, float, np.ndarray]:
    """Greedy heads under the paper model: exact increase of max-compute + summed transfers."""
    p = ly.prob
    hc = (p.sz.head_f / np.where(p.C > 0, p.C, np.nan)).tolist()
    xo = (p.sz.head_out_b * p.spb[:, P]).tolist()
    cur, mig, n = ly.cur_heads.tolist(), ly.mig_head, [0] * len(hc)
    allowed = np.nonzero(p.allowed)[0].tolist()
    maxc, xsum, pens = 0.0, 0.0, 0.0
    for g in range(p.dims.n_kv_heads):
        best, bj = np.inf, -1
        for j in allowed:
            if r[j] < p.sz.head_b:
                continue
            pen = 0.0 if n[j] < cur[j] else mig[j]
            d = max(0.0, (n[j] + 1) * hc[j] - maxc) + xo[j] + pen
            if d < best or (d == best and bj >= 0 and hc[j] < hc[bj]):
                best, bj = d, j
        if bj < 0:
            raise NoFit(f"L{ly.l}.H{g}", p.sz.head_b)
        pens += 0.0 if n[bj] < cur[bj] else mig[bj]
        n[bj] += 1
        r[bj] -= p.sz.head_b
        maxc, xsum = max(maxc, n[bj] * hc[bj]), xsum + xo[bj]
    return maxc + xsum, pens, {j: c for j, c in enumerate(n) if c > 0}


def _ffn_paper(ly: _Layer, P: int, r: list, agg_unused=None) -> tuple[float, float, np.ndarray, int]:
    p = ly.prob
    fc = (ly.chunk_cols * p.sz.ffn_col_f / np.where(p.C > 0, p.C, np.nan)).tolist()
    xh = (p.sz.x_b * p.spb[P]).tolist()
    cur, mig, n = ly.cur_chunks.tolist(), ly.mig_chunk, [0] * len(fc)
    allowed = np.nonzero(p.allowed)[0].tolist()
    maxc, xsum, pens, agg = 0.0, 0.0, 0.0, -1
    for _ in range(ly.K):
        cands = [(max(0.0, (n[j] + 1) * fc[j] - maxc) + (xh[j] if n[j] == 0 else 0.0)
                  + (0.0 if n[j] < cur[j] else mig[j]), j) for j in allowed if r[j] >= ly.chunk_b]
        if not cands:
            raise NoFit(f"L{ly.l}.ffn", ly.chunk_b)
        _, j = min(cands)
        agg = j if agg < 0 else agg
        pens += 0.0 if n[j] < cur[j] else mig[j]
        xsum += xh[j] if n[j] == 0 else 0.0
        n[j] += 1
        r[j] -= ly.chunk_b
        maxc = max(maxc, n[j] * fc[j])
    return maxc + xsum, pens, {j: c for j, c in enumerate(n) if c > 0}, agg


def _candidates(ly: _Layer, r: list, k: int) -> list[int]:
    """Anchor (projection) devices to try: the k cheapest by input transfer + layer compute."""
    p = ly.prob
    ok = p.allowed & (np.array(r) >= p.sz.proj_b)
    idx = np.nonzero(ok)[0]
    if idx.size == 0:
        raise NoFit(f"L{ly.l}.proj", p.sz.proj_b)
    if idx.size <= k:
        return idx.tolist()
    memo = p.memo.setdefault("ra_anchor_score", {})
    if ly.A not in memo:  # input transfer + the layer's compute, per device (once per input device)
        work = p.sz.proj_f + p.dims.n_kv_heads * p.sz.head_f
        memo[ly.A] = p.lat[ly.A] + p.sz.x_b * p.spb[ly.A] + work / np.where(p.C > 0, p.C, np.nan)
    score = memo[ly.A][idx]
    best = idx[np.argsort(score, kind="stable")[:k]].tolist()
    if ly.cur_proj is not None and ok[ly.cur_proj] and ly.cur_proj not in best:
        best.append(ly.cur_proj)
    return best


def _exit_s(p: Problem) -> np.ndarray:
    """Per device: the last layer's output from there to the source (``decode``; 0 on the source)."""
    return np.where(np.arange(len(p.names)) == p.src, 0.0, p.lat[:, p.src] + p.sz.x_b * p.spb[:, p.src])


def _try_anchor(ly: _Layer, P: int, resid: list, last: bool):
    """Best layer plan with the projection on P: (estimated time, residual, heads, chunks, agg).

    Both claim orders are tried (heads first / FFN chunks first: whichever block kind goes first
    gets the fast devices' memory), and for the FFN a few aggregators (``_agg_candidates``; under
    ``decode`` in the last layer its transfer to the source counts)."""
    p = ly.prob
    paper = p.cost_model == "paper"
    copy = list if paper else np.copy  # bytes left per device: a list (paper), an array (the compiled passes)
    r0 = list(resid) if paper else np.array(resid, dtype=float)
    r0[P] -= p.sz.proj_b
    exit_s = _exit_s(p) if last and not paper else None
    fixed = ly.anchor_s(P)
    best, err = None, None

    def consider(h, f, r):
        nonlocal best
        h_t, h_pen, nh = h
        f_t, f_pen, nf, agg = f
        total = h_t + f_t + h_pen + f_pen + fixed + (exit_s[agg] if exit_s is not None else 0.0)
        if best is None or total < best[0]:
            best = (total, r, nh, nf, agg)

    thorough = getattr(p, "thorough", False)
    if paper or not (last or thorough):  # the greedy's own pick (cheapest h + chunk)
        aggs = [None]
    else:
        aggs = _agg_candidates(ly, P, r0, exit_s)
    heads, ffn = (_heads_paper, _ffn_paper) if paper else (heads_compiled, ffn_compiled)
    # heads first; FFN chunks first only when memory changed a choice
    h = None
    try:
        rh = copy(r0)
        h = heads(ly, P, rh)
        for agg in aggs:
            r = copy(rh)
            try:
                f = ffn(ly, P, r, agg)
            except NoFit as exc:
                err = exc.with_traceback(None)  # no frame cycle
                continue
            consider(h, f, r)
    except NoFit as exc:
        err = exc.with_traceback(None)  # no frame cycle
    # (always when thorough or under ``paper``: one layer, cheap; else only when heads first failed)
    bound = best is None or thorough or paper
    if best is not None and not paper and not thorough:
        aggs = [best[4]]
    for agg in (aggs if bound else []):
        r = copy(r0)
        try:
            f = ffn(ly, P, r, agg)
            h = heads(ly, P, r)
        except NoFit as exc:
            err = exc.with_traceback(None)  # no frame cycle
            continue
        consider(h, f, r)
    if best is None:
        raise err  # type: ignore[misc]
    return best if paper else (best[0], best[1].tolist(), *best[2:])


def _plan_layer(ly: _Layer, resid: list, k: int, last: bool):
    """The layer's best anchor by ``_try_anchor``'s total (the first on ties): (bytes left, heads
    per device, anchor, FFN chunks per device, aggregator). Under ``decode``, for a layer other
    than the last and not ``thorough``, in one compiled call (``_plan_layer_compiled``; the same
    result), else (and where that one hands back) anchor by anchor."""
    anchors = _candidates(ly, resid, k)
    p = ly.prob
    if p.cost_model == "decode" and not last and not getattr(p, "thorough", False):
        out = _plan_layer_compiled(ly, resid, anchors)
        if out is not None:
            return out
    best, err = None, None
    for P in anchors:
        try:
            total, r, nh, nf, agg = _try_anchor(ly, P, resid, last)
        except NoFit as exc:
            err = exc.with_traceback(None)  # no frame cycle
            continue
        if best is None or total < best[0]:
            best = (total, r, nh, P, nf, agg)
    if best is None:
        raise err  # type: ignore[misc]
    return best[1:]


def _plan_layer_compiled(ly: _Layer, resid: list, anchors: list[int]):
    """``_plan_layer`` by ``decode_kernel.plan_layer``; None where it hands back (no anchor fits:
    the Python passes raise their error; or a NaN key)."""
    p, tab, A = ly.prob, ly.tab, ly.A
    fixed = np.array([ly.anchor_s(P) for P in anchors], dtype=float)
    n = len(p.names)
    r_out = np.empty(n)
    hc, ho, fc, fo = (np.empty(n, dtype=np.int64) for _ in range(4))
    tau_x, lat, head_inc, back, chunk_c = tab.arrays
    status, P, agg, n_h, n_f = DK.plan_layer(
        A, np.array(anchors, dtype=np.int64), fixed, np.array(resid, dtype=float), p.dims.n_kv_heads,
        float(p.sz.head_b), float(p.sz.proj_b), ly.K, float(ly.chunk_b), tau_x, lat, head_inc, back, chunk_c,
        ly.cur_heads, ly.mig_head_a, ly.cur_chunks, ly.mig_chunk_a, p.allowed, tab.reach_al, tab.head_tail_al,
        ly.pen0_head_al, tab.chunk_al, tab.back_al, ly.pen0_chunk_al, tab.allowed_idx, r_out, hc, ho, fc, fo)
    if status != DK.OK:
        return None
    nh = {j: int(hc[j]) for j in ho[:n_h].tolist()}
    nf = {j: int(fc[j]) for j in fo[:n_f].tolist()}
    return r_out.tolist(), nh, P, nf, agg


def _layer_placement(prob: Problem, ly: _Layer, nh, P: int, nf, agg: int) -> LayerPlacement:
    names, d = prob.names, prob.dims
    hc = {names[j]: int(c) for j, c in nh.items() if c > 0}  # pick order = the runtime's send order
    fcnt = {names[j]: int(c) for j, c in nf.items() if c > 0}
    heads = assign_heads(hc, ly.cur.heads if ly.cur else None, d.n_kv_heads)
    ffn = assign_ffn(fcnt, names[agg], d.ffn_dim, ly.K, ly.cur.ffn if ly.cur else None)
    return LayerPlacement(heads, names[P], ffn)


def _round(prob: Problem, chunks: int, k: int, share: bool, budget: np.ndarray) -> tuple[LayerPlacement, ...]:
    resid = budget.tolist()
    big = max(prob.sz.head_b, prob.sz.proj_b, -(-prob.dims.ffn_dim // chunks) * prob.sz.ffn_col_b)
    layers, A, L = [], prob.src, prob.dims.n_layers
    for l in range(L):
        ly = _Layer(prob, l, A, chunks)
        use = [min(x, x / (L - l) + big) for x in resid] if share else resid
        r_after, nh, P, nf, agg = _plan_layer(ly, use, k, last=l == L - 1)
        resid = [x - (u - a) for x, u, a in zip(resid, use, r_after)]
        layers.append(_layer_placement(prob, ly, nh, P, nf, agg))
        A = agg
    return tuple(layers)


def _layer_bytes(prob: Problem, lp: LayerPlacement) -> dict[int, float]:
    """Bytes per device index a kept layer takes at the memory horizon, as the greedy counts them."""
    out: dict[int, float] = {}
    for d in lp.heads:
        j = prob.index[d]
        out[j] = out.get(j, 0.0) + prob.sz.head_b
    j = prob.index[lp.proj]
    out[j] = out.get(j, 0.0) + prob.sz.proj_b
    for s in lp.ffn:
        j = prob.index[s.device]
        out[j] = out.get(j, 0.0) + (s.col_end - s.col_start) * prob.sz.ffn_col_b
    return out


def replan_layers(prob: Problem, chunks: int, k: int, layers: tuple[LayerPlacement, ...], which: set[int],
                  budget: np.ndarray, moved: np.ndarray | None = None) -> tuple[LayerPlacement, ...]:
    """``layers`` with the layers in ``which`` placed again by the greedy (anchors: the ``k``
    cheapest and the current proj; only the current proj when its device is not in ``moved``
    (a mask: devices whose own links or limits changed) and has room), in dataflow order, in the
    memory the other layers leave within ``budget``; each re-placed layer's input is the
    (possibly new) aggregator before it. Raises ``NoFit`` when a re-placed layer fits nowhere."""
    resid = budget.tolist()
    for l, lp in enumerate(layers):
        if l not in which:
            for j, nbytes in _layer_bytes(prob, lp).items():
                resid[j] -= nbytes
    out, A, L = list(layers), prob.src, prob.dims.n_layers
    for l in range(L):
        if l in which:
            ly = _Layer(prob, l, A, chunks)
            keep = moved is not None and not moved[ly.cur_proj] and resid[ly.cur_proj] >= prob.sz.proj_b
            resid, nh, P, nf, agg = _plan_layer(ly, resid, 0 if keep else k, last=l == L - 1)
            out[l] = _layer_placement(prob, ly, nh, P, nf, agg)
        A = prob.index[out[l].ffn[0].device]
    return tuple(out)
