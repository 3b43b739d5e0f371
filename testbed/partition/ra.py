"""The resource-aware (RA) myopic head-level partitioner (paper-notes "RA algorithm", steps 1-5).

One round (one decision epoch), given a snapshot:
 1. Residual memory per device = budget - embedding/LM head (source) ; every block is sized at the
    memory horizon ``T + tokens_until_next_decision`` (KV growth until the next decision).
 2. Layers are walked in dataflow order (all layers have equal demand); inside a layer the blocks go
    largest-demand first (FFN chunks or heads, whichever is bigger); the projection is the layer's
    anchor: a few candidate devices are tried (``proj_candidates``: the cheapest by input transfer +
    compute, plus its current device) and the best resulting layer is kept.
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

import heapq

import numpy as np

from testbed.partition import blocks as B
from testbed.partition.common import Problem, assign_ffn, assign_heads, check_memory, evaluate
from testbed.partition.errors import InfeasiblePlan
from testbed.partition.migration import migration_delay
from testbed.placement import LayerPlacement, Placement


class NoFit(Exception):
    def __init__(self, block: str, nbytes: float):
        super().__init__(block)
        self.block, self.nbytes = block, nbytes


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
    cost = prob.lat[holders] + nbytes * prob.spb[holders]
    return cost.min(axis=0) / prob.N


def _counts(prob: Problem, devices) -> np.ndarray:
    c = np.zeros(len(prob.names))
    for d in devices:
        c[prob.index[d]] += 1
    return c


class _Layer:
    """Inputs for planning one layer: input device, anchor, residual memory and hysteresis data."""

    def __init__(self, prob: Problem, l: int, A: int, chunks: int):
        self.prob, self.l, self.A, self.K = prob, l, A, chunks
        self.chunk_cols = -(-prob.dims.ffn_dim // chunks)
        self.chunk_b = self.chunk_cols * prob.sz.ffn_col_b
        cur = _cur_layer(prob, l)
        self.cur = cur
        n = len(prob.names)
        self.cur_heads = _counts(prob, cur.heads) if cur else np.zeros(n)
        self.cur_proj = prob.index.get(cur.proj) if cur else None
        mids = [(a + b) // 2 for a, b in B.ffn_chunk_bounds(prob.dims.ffn_dim, chunks)]
        self.cur_chunks = _counts(prob, [next(s.device for s in cur.ffn if s.col_start <= m < s.col_end)
                                         for m in mids]) if cur else np.zeros(n)
        self.mig_head = _mig_in(prob, self.cur_heads, prob.sz.head_b).tolist()
        self.mig_chunk = _mig_in(prob, self.cur_chunks, self.chunk_b).tolist()

    def proj_pen(self, P: int) -> float:
        if self.cur_proj is None or self.cur_proj == P:
            return 0.0
        p = self.prob
        return (p.lat[self.cur_proj, P] + p.sz.proj_b * p.spb[self.cur_proj, P]) / p.N


def _pop_fitting(heap: list, r: list, nbytes: float, block: str) -> int:
    while heap:
        _, j = heapq.heappop(heap)
        if r[j] >= nbytes:
            return j
    raise NoFit(block, nbytes)


def _heads_decode(ly: _Layer, P: int, r: list) -> tuple[float, float, np.ndarray]:
    """Greedy heads for anchor P: (attention-stage finish, penalties, counts per device)."""
    p = ly.prob
    xA = p.lat[ly.A] + p.sz.x_b * p.spb[ly.A]
    base = (xA + p.lat[:, P]).tolist()
    inc = (p.sz.head_f / np.where(p.C > 0, p.C, np.nan) + p.sz.head_out_b * p.spb[:, P]).tolist()
    cur, mig, n = ly.cur_heads.tolist(), ly.mig_head, [0] * len(base)
    pen = lambda j: 0.0 if n[j] < cur[j] else mig[j]  # noqa: E731
    heap = [(base[j] + inc[j] + pen(j), j) for j in np.nonzero(p.allowed)[0].tolist()]
    heapq.heapify(heap)
    finish, pens = float(xA[P]), 0.0
    for g in range(p.dims.n_kv_heads):
        j = _pop_fitting(heap, r, p.sz.head_b, f"L{ly.l}.H{g}")
        pens += pen(j)
        n[j] += 1
        r[j] -= p.sz.head_b
        finish = max(finish, base[j] + n[j] * inc[j])
        heapq.heappush(heap, (base[j] + (n[j] + 1) * inc[j] + pen(j), j))
    return finish, pens, np.array(n)


def _ffn_decode(ly: _Layer, P: int, r: list) -> tuple[float, float, np.ndarray, int]:
    """Greedy FFN chunks after the projection on P: (stage time, penalties, counts, aggregator)."""
    p = ly.prob
    xP = (p.lat[P] + p.sz.x_b * p.spb[P]).tolist()
    fc = (ly.chunk_cols * p.sz.ffn_col_f / np.where(p.C > 0, p.C, np.nan)).tolist()
    cur, mig, n = ly.cur_chunks.tolist(), ly.mig_chunk, [0] * len(xP)
    pen = lambda j: 0.0 if n[j] < cur[j] else mig[j]  # noqa: E731
    allowed = np.nonzero(p.allowed)[0].tolist()
    heap = [(xP[j] + fc[j] + pen(j), j) for j in allowed]
    heapq.heapify(heap)
    agg = _pop_fitting(heap, r, ly.chunk_b, f"L{ly.l}.ffn")
    back = (p.lat[:, agg] + p.sz.x_b * p.spb[:, agg]).tolist()
    pens, finish = pen(agg), xP[agg] + fc[agg]
    n[agg], r[agg] = 1, r[agg] - ly.chunk_b
    heap = [(xP[j] + (n[j] + 1) * fc[j] + back[j] + pen(j), j) for j in allowed]
    heapq.heapify(heap)
    for _ in range(ly.K - 1):
        j = _pop_fitting(heap, r, ly.chunk_b, f"L{ly.l}.ffn")
        pens += pen(j)
        n[j] += 1
        r[j] -= ly.chunk_b
        finish = max(finish, xP[j] + n[j] * fc[j] + back[j])
        heapq.heappush(heap, (xP[j] + (n[j] + 1) * fc[j] + back[j] + pen(j), j))
    return finish, pens, np.array(n), agg


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
    return maxc + xsum, pens, np.array(n)


def _ffn_paper(ly: _Layer, P: int, r: list) -> tuple[float, float, np.ndarray, int]:
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
    return maxc + xsum, pens, np.array(n), agg


def _candidates(ly: _Layer, r: list, k: int) -> list[int]:
    """Anchor (projection) devices to try: the k cheapest by input transfer + layer compute."""
    p = ly.prob
    ok = p.allowed & (np.array(r) >= p.sz.proj_b)
    idx = np.nonzero(ok)[0]
    if idx.size == 0:
        raise NoFit(f"L{ly.l}.proj", p.sz.proj_b)
    if idx.size <= k:
        return idx.tolist()
    work = p.sz.proj_f + p.dims.n_kv_heads * p.sz.head_f
    score = (p.lat[ly.A] + p.sz.x_b * p.spb[ly.A] + work / np.where(p.C > 0, p.C, np.nan))[idx]
    best = idx[np.argsort(score, kind="stable")[:k]].tolist()
    if ly.cur_proj is not None and ok[ly.cur_proj] and ly.cur_proj not in best:
        best.append(ly.cur_proj)
    return best


def _try_anchor(ly: _Layer, P: int, resid: list, last: bool):
    p = ly.prob
    r = list(resid)
    r[P] -= p.sz.proj_b
    paper = p.cost_model == "paper"
    heads, ffn = (_heads_paper, _ffn_paper) if paper else (_heads_decode, _ffn_decode)
    if ly.chunk_b >= p.sz.head_b:  # largest demand first (memory order)
        f_t, f_pen, nf, agg = ffn(ly, P, r)
        h_t, h_pen, nh = heads(ly, P, r)
    else:
        h_t, h_pen, nh = heads(ly, P, r)
        f_t, f_pen, nf, agg = ffn(ly, P, r)
    total = h_t + p.sz.proj_f / p.C[P] + f_t + h_pen + f_pen + ly.proj_pen(P)
    if last and not paper:
        total += p.lat[agg, p.src] + p.sz.x_b * p.spb[agg, p.src]
    return total, r, nh, nf, agg


def _plan_layer(ly: _Layer, resid: list, k: int, last: bool):
    best, err = None, None
    for P in _candidates(ly, resid, k):
        try:
            total, r, nh, nf, agg = _try_anchor(ly, P, resid, last)
        except NoFit as exc:
            err = exc
            continue
        if best is None or total < best[0]:
            best = (total, r, nh, P, nf, agg)
    if best is None:
        raise err  # type: ignore[misc]
    return best[1:]


def _layer_placement(prob: Problem, ly: _Layer, nh, P: int, nf, agg: int) -> LayerPlacement:
    names, d = prob.names, prob.dims
    hc = {names[j]: int(c) for j, c in enumerate(nh) if c > 0}
    fcnt = {names[j]: int(c) for j, c in enumerate(nf) if c > 0}
    heads = assign_heads(hc, ly.cur.heads if ly.cur else None, d.n_kv_heads)
    ffn = assign_ffn(fcnt, names[agg], d.ffn_dim, ly.K, ly.cur.ffn if ly.cur else None)
    return LayerPlacement(heads, names[P], ffn)


def _round(prob: Problem, chunks: int, k: int, share: bool) -> tuple[LayerPlacement, ...]:
    resid = prob.budget.tolist()
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


def _keep_current(prob: Problem, new: Placement) -> Placement:
    """Step 5: keep the current placement unless the new one beats it by the amortised migration."""
    snap, cur = prob.snap, prob.snap.current
    if cur is None or len(cur.layers) != prob.dims.n_layers or cur.source != new.source:
        return new
    if any(not prob.allowed[prob.index[d]] for d in cur.devices() - {cur.source} if d in prob.index):
        return new
    if not cur.devices() <= set(prob.names):
        return new
    try:
        check_memory(cur, snap, prob.dims, prob.cost_model, prob.T + snap.tokens_until_next_decision)
    except InfeasiblePlan:
        return new
    c_cur = evaluate(cur, snap, prob.dims, prob.cost_model).token_latency_s
    c_new = evaluate(new, snap, prob.dims, prob.cost_model).token_latency_s
    mig = migration_delay(cur, new, snap, prob.dims, cost_model=prob.cost_model)
    return cur if c_cur <= c_new + mig / prob.N else new


def resource_aware(snapshot, dims, cost_model: str = "decode", ffn_chunks: int | None = None,
                   proj_candidates: int = 4, headroom_epochs: int = 4) -> Placement:
    """One RA decision. ``ffn_chunks``: FFN blocks per layer (default 1 under ``paper``, as in the
    paper; 4 under ``decode``). ``proj_candidates``: anchors tried per layer. ``headroom_epochs``:
    NEW placements leave room for this many epochs of KV growth (a placement packed to the brim is
    evicted by KV growth at the next decision, forcing migrations); the current placement is kept
    as long as it fits the next epoch. If the headroom does not fit, one epoch is used."""
    from testbed.partition.baselines import first_fit

    N = max(1, snapshot.tokens_until_next_decision)
    prob = Problem(snapshot, dims, cost_model, mem_tokens=N * max(1, headroom_epochs))
    try:
        prob.check_totals()
    except InfeasiblePlan:
        prob = Problem(snapshot, dims, cost_model)
        prob.check_totals()
    K = max(1, min(ffn_chunks or (1 if cost_model == "paper" else 4), dims.ffn_dim))
    layers = None
    for share in (False, True):
        try:
            layers = _round(prob, K, proj_candidates, share)
            break
        except NoFit as exc:
            last_err = exc
    if layers is None:
        try:
            return first_fit(snapshot, dims, cost_model)
        except InfeasiblePlan:
            raise prob.no_fit(last_err.block, last_err.nbytes, prob.budget) from None
    new = Placement(snapshot.source, layers, meta={"algorithm": "resource_aware", "ffn_chunks": K})
    return _keep_current(prob, new)
