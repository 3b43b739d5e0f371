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

import heapq

import numpy as np

from testbed.partition import blocks as B
from testbed.partition.common import Problem, assign_ffn, assign_heads, check_memory, evaluate
from testbed.partition.errors import InfeasiblePlan
from testbed.partition.cost import Net, decode_cost
from testbed.partition.migration import migration_estimate
from testbed.partition.cost import placement_memory
from testbed.placement import FfnShard, LayerPlacement, Placement


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
    return cost.min(axis=0) / getattr(prob, "H", prob.N)


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
        return (p.lat[self.cur_proj, P] + p.sz.proj_b * p.spb[self.cur_proj, P]) / getattr(p, "H", p.N)


def _pop_fitting(heap: list, r: list, nbytes: float, block: str) -> int:
    while heap:
        _, j = heapq.heappop(heap)
        if r[j] >= nbytes:
            return j
    raise NoFit(block, nbytes)


def _lazy_pop(heap: list, key, r: list, nbytes: float, block: str) -> int:
    """Pop the device with the smallest CURRENT key that has room. Keys only grow as the round
    proceeds (the sender's uplink fills up), so a stale entry is re-keyed and pushed back."""
    while heap:
        k, j = heapq.heappop(heap)
        if r[j] < nbytes:
            continue
        now = key(j)
        if now > k + 1e-15 and heap and now > heap[0][0]:
            heapq.heappush(heap, (now, j))
            continue
        return j
    raise NoFit(block, nbytes)


def _heads_decode(ly: _Layer, P: int, r: list) -> tuple[float, float, np.ndarray]:
    """Greedy heads for anchor P: (attention-stage finish, penalties, counts per device).

    Mirrors the ``decode`` model's serialised fan-out: the input device A sends x to P first,
    then to each new head device in the order they are picked, so a device's x arrives after the
    uplink time of every earlier destination (head-output fan-in into P is not modelled here;
    the final plan comparison uses the full cost model)."""
    p, A = ly.prob, ly.A
    tauA = (p.sz.x_b * p.spb[A]).tolist()
    latA = p.lat[A].tolist()
    tail = p.lat[:, P].tolist()
    inc = (p.sz.head_f / np.where(p.C > 0, p.C, np.nan) + p.sz.head_out_b * p.spb[:, P]).tolist()
    cur, mig = ly.cur_heads.tolist(), ly.mig_head
    n = [0] * len(inc)
    up = [tauA[P] if P != A else 0.0]
    base: list = [None] * len(inc)
    base[P] = latA[P] + tauA[P] if P != A else 0.0
    base[A] = 0.0

    def arrival(j):
        return base[j] if base[j] is not None else up[0] + tauA[j] + latA[j]

    def key(j):
        return arrival(j) + tail[j] + (n[j] + 1) * inc[j] + (0.0 if n[j] < cur[j] else mig[j])

    al = np.nonzero(p.allowed)[0]
    arr = up[0] + p.sz.x_b * p.spb[A, al] + p.lat[A, al]
    arr[al == P], arr[al == A] = base[P], 0.0
    k0 = arr + p.lat[al, P] + np.array(inc)[al] + (ly.cur_heads[al] <= 0) * np.array(mig)[al]
    heap = list(zip(k0.tolist(), al.tolist()))
    heapq.heapify(heap)
    finish, pens, order = float(base[P]), 0.0, []
    for g in range(p.dims.n_kv_heads):
        j = _lazy_pop(heap, key, r, p.sz.head_b, f"L{ly.l}.H{g}")
        pens += 0.0 if n[j] < cur[j] else mig[j]
        if n[j] == 0:
            order.append(j)
        if base[j] is None:
            base[j] = up[0] + tauA[j] + latA[j]
            up[0] += tauA[j]
        n[j] += 1
        r[j] -= p.sz.head_b
        finish = max(finish, base[j] + tail[j] + n[j] * inc[j])
        heapq.heappush(heap, (key(j), j))
    return finish, pens, {j: n[j] for j in order}


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


def _ffn_decode(ly: _Layer, P: int, r: list, agg: int | None = None) -> tuple[float, float, np.ndarray, int]:
    """Greedy FFN chunks after the projection on P: (stage time, penalties, counts, aggregator).

    P sends h to the aggregator first, then to each new shard device in pick order (serialised on
    P's uplink, as in the ``decode`` model). ``agg``: the aggregator (default: the cheapest)."""
    p = ly.prob
    tauP = (p.sz.x_b * p.spb[P]).tolist()
    latP = p.lat[P].tolist()
    fc = (ly.chunk_cols * p.sz.ffn_col_f / np.where(p.C > 0, p.C, np.nan)).tolist()
    cur, mig = ly.cur_chunks.tolist(), ly.mig_chunk
    n = [0] * len(fc)
    pen = lambda j: 0.0 if n[j] < cur[j] else mig[j]  # noqa: E731
    allowed = np.nonzero(p.allowed)[0].tolist()
    if agg is None:
        heap = [(tauP[j] + latP[j] + fc[j] + pen(j), j) for j in allowed]
        heapq.heapify(heap)
        agg = _pop_fitting(heap, r, ly.chunk_b, f"L{ly.l}.ffn")
    elif r[agg] < ly.chunk_b:
        raise NoFit(f"L{ly.l}.ffn", ly.chunk_b)
    back = (p.lat[:, agg] + p.sz.x_b * p.spb[:, agg]).tolist()
    base: list = [None] * len(fc)
    base[agg] = tauP[agg] + latP[agg] if agg != P else 0.0
    up = [tauP[agg] if agg != P else 0.0]
    pens, finish, order = pen(agg), base[agg] + fc[agg], [agg]
    n[agg], r[agg] = 1, r[agg] - ly.chunk_b

    def key(j):
        b = base[j] if base[j] is not None else up[0] + tauP[j] + latP[j]
        return b + (n[j] + 1) * fc[j] + back[j] + pen(j)

    al = np.array(allowed, dtype=int)
    arr = up[0] + np.array(tauP)[al] + np.array(latP)[al]
    arr[al == agg] = base[agg]
    cnt = np.zeros(len(al))
    cnt[al == agg] = 1
    k0 = (arr + (cnt + 1) * np.array(fc)[al] + np.array(back)[al]
          + np.where(cnt < ly.cur_chunks[al], 0.0, np.array(mig)[al]))
    heap = list(zip(k0.tolist(), al.tolist()))
    heapq.heapify(heap)
    for _ in range(ly.K - 1):
        j = _lazy_pop(heap, key, r, ly.chunk_b, f"L{ly.l}.ffn")
        pens += pen(j)
        if base[j] is None:
            base[j] = up[0] + tauP[j] + latP[j]
            up[0] += tauP[j]
            order.append(j)
        n[j] += 1
        r[j] -= ly.chunk_b
        finish = max(finish, base[j] + n[j] * fc[j] + back[j])
        heapq.heappush(heap, (key(j), j))
    return finish, pens, {j: n[j] for j in order}, agg


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
    work = p.sz.proj_f + p.dims.n_kv_heads * p.sz.head_f
    score = (p.lat[ly.A] + p.sz.x_b * p.spb[ly.A] + work / np.where(p.C > 0, p.C, np.nan))[idx]
    best = idx[np.argsort(score, kind="stable")[:k]].tolist()
    if ly.cur_proj is not None and ok[ly.cur_proj] and ly.cur_proj not in best:
        best.append(ly.cur_proj)
    return best


def _try_anchor(ly: _Layer, P: int, resid: list, last: bool):
    """Best layer plan with the projection on P: (estimated time, residual, heads, chunks, agg).

    Both claim orders are tried (heads first / FFN chunks first: whichever block kind goes first
    gets the fast devices' memory), and for the FFN a few aggregators (``_agg_candidates``; under
    ``decode`` in the last layer its transfer to the source counts)."""
    p = ly.prob
    r0 = list(resid)
    r0[P] -= p.sz.proj_b
    paper = p.cost_model == "paper"
    exit_s = None
    if last and not paper:
        exit_s = np.where(np.arange(len(p.names)) == p.src, 0.0, p.lat[:, p.src] + p.sz.x_b * p.spb[:, p.src])
    fixed = ly.proj_pen(P) + p.sz.proj_f / p.C[P]
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
    heads, ffn = (_heads_paper, _ffn_paper) if paper else (_heads_decode, _ffn_decode)
    # heads first; FFN chunks first only when memory changed a choice
    h = None
    try:
        rh = list(r0)
        h = heads(ly, P, rh)
        for agg in aggs:
            r = list(rh)
            try:
                f = ffn(ly, P, r, agg)
            except NoFit as exc:
                err = exc
                continue
            consider(h, f, r)
    except NoFit as exc:
        err = exc
    # (always when thorough or under ``paper``: one layer, cheap; else only when heads first failed)
    bound = best is None or thorough or paper
    if best is not None and not paper and not thorough:
        aggs = [best[4]]
    for agg in (aggs if bound else []):
        r = list(r0)
        try:
            f = ffn(ly, P, r, agg)
            h = heads(ly, P, r)
        except NoFit as exc:
            err = exc
            continue
        consider(h, f, r)
    if best is None:
        raise err  # type: ignore[misc]
    return best


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
