"""The ``decode``-model MILP (the independent-transfer RELAXATION) and a local search under the
serialised model, used by ``exact.optimal`` outside the one-layer exact search (scope: ``exact``).

MILP: per layer l and allowed device j: head count h (int) with presence y, proj binary p, FFN chunk
count c (int) with presence z and aggregator binary a; stage times s_l (x ready on the layer's
input device), att_l (all head outputs and x on the proj device), pd_l = att_l + proj compute.
Big-M rows activate only for the chosen (input, head device, proj) and (proj, shard, aggregator)
triples; each big-M is the exact upper bound of its own term, so relaxed rows never bind.
Transfers are independent (``decode_cost(serial_nics=False)``), which bounds the serialised model
from below placement by placement, so without a migration term (and with ``K`` dividing
``ffn_dim``) HiGHS' dual bound is a certified lower bound on the serialised optimum over FFNs cut
into ``K`` chunks. The MILP's placement is not
optimal for the serialised model; ``improve`` then searches its neighbourhood under it.
"""
from __future__ import annotations

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.common import Problem, assign_ffn, assign_heads
from testbed.partition.cost.latency import decode_constants
from testbed.partition.exact.milp import Milp
from testbed.core.placement import LayerPlacement, Placement


class _Vars:
    def __init__(self, m: Milp, V: list[int], G: int, K: int):
        self.h = {j: m.var(0, G, integer=True) for j in V}
        self.y = {j: m.binary() for j in V}
        self.p = {j: m.binary() for j in V}
        self.c = {j: m.var(0, K, integer=True) for j in V}
        self.z = {j: m.binary() for j in V}
        self.a = {j: m.binary() for j in V}
        self.s, self.att, self.pd = m.var(0), m.var(0), m.var(0)
        for j in V:
            m.le({self.h[j]: 1, self.y[j]: -G}, 0)
            m.le({self.y[j]: 1, self.h[j]: -1}, 0)
            m.le({self.c[j]: 1, self.z[j]: -K}, 0)
            m.le({self.z[j]: 1, self.c[j]: -1}, 0)
            m.le({self.a[j]: 1, self.z[j]: -1}, 0)
        m.eq(dict.fromkeys(self.h.values(), 1.0), G)
        m.eq(dict.fromkeys(self.c.values(), 1.0), K)
        m.eq(dict.fromkeys(self.p.values(), 1.0), 1)
        m.eq(dict.fromkeys(self.a.values(), 1.0), 1)


def _attention(m: Milp, prob: Problem, V, v: _Vars, inputs: dict[int, int | None], k: dict, G: int):
    """att - s >= X(i,j) + h_j*(fh/C_j + o/B_jk) + lat_jk when input i, heads on j, proj on k."""
    X = prob.lat + k["x_bytes"] * prob.spb
    m.ge({v.att: 1, v.s: -1}, 0)
    for i, ind in inputs.items():
        on_i = {ind: 1.0} if ind is not None else {}
        n_on = len(on_i)
        for kk in V:
            big = X[i, kk]
            m.ge({v.att: 1, v.s: -1, v.p[kk]: -big, **{q: -big for q in on_i}}, X[i, kk] - big * (1 + n_on))
            for j in V:
                coef = k["head_flops"] / prob.C[j] + k["head_out_bytes"] * prob.spb[j, kk]
                rhs = X[i, j] + prob.lat[j, kk]
                big = rhs + G * coef
                terms = {v.att: 1, v.s: -1, v.h[j]: -coef, v.y[j]: -big, v.p[kk]: -big}
                for q in on_i:
                    terms[q] = -big
                m.ge(terms, rhs - big * (2 + n_on))


def _ffn(m: Milp, prob: Problem, V, v: _Vars, nxt: int, k: dict, K: int, fc: float):
    X = prob.lat + k["x_bytes"] * prob.spb
    m.eq({v.pd: 1, v.att: -1, **{v.p[j]: -k["proj_flops"] / prob.C[j] for j in V}}, 0)
    m.ge({nxt: 1, v.pd: -1}, 0)
    for kk in V:
        for r in V:
            big = X[kk, r]
            m.ge({nxt: 1, v.pd: -1, v.p[kk]: -big, v.a[r]: -big}, X[kk, r] - 2 * big)
            for j in V:
                coef = fc / prob.C[j]
                rhs = X[kk, j] + X[j, r]
                big = rhs + K * coef
                m.ge({nxt: 1, v.pd: -1, v.c[j]: -coef, v.p[kk]: -big, v.z[j]: -big, v.a[r]: -big}, rhs - 3 * big)


def _current_counts(prob: Problem, K: int):
    """Per layer: head counts, FFN chunk counts (a chunk belongs to the shard holding its middle
    column, as RA counts them) and proj device of ``snapshot.current``; None when it does not apply."""
    cur, d = prob.snap.current, prob.dims
    if cur is None or len(cur.layers) != d.n_layers or not cur.devices() <= set(prob.names):
        return None
    mids = [(a + b) // 2 for a, b in B.ffn_chunk_bounds(d.ffn_dim, K)]
    out = []
    for lp in cur.layers:
        h = {}
        for dev in lp.heads:
            h[prob.index[dev]] = h.get(prob.index[dev], 0) + 1
        c = {}
        for m in mids:
            j = prob.index[next(s.device for s in lp.ffn if s.col_start <= m < s.col_end)]
            c[j] = c.get(j, 0) + 1
        out.append((h, c, prob.index[lp.proj]))
    return out


def _migration(m: Milp, prob: Problem, V, layers: list, K: int, cur: list) -> int:
    """Migration delay variable from ``snapshot.current`` as ``migration`` aggregates it: integer
    head / chunk flows per (layer, sender, receiver) with conservation against the current counts,
    proj moves, a pair-active binary paying the link latency once, per-sender busy time (sum over
    its receivers), and the delay as the max over senders."""
    d, T = prob.dims, prob.T
    hb = B.block_memory_bytes(d, "head", T)
    cb = B.ffn_bytes(d, -(-d.ffn_dim // K))
    pb = B.proj_bytes(d)
    if not prob.snap.weights_shipped:  # receivers copy weights from their own copy: only KV moves
        hb, cb, pb = B.head_kv_bytes(d, T), 0, 0
    G = d.n_kv_heads
    senders = sorted({j for h, c, P in cur for j in (*h, *c, P)})
    act, busy = {}, {i: {} for i in senders}
    for i in senders:
        for j in V:
            if i != j:
                act[i, j] = m.binary()
                busy[i][act[i, j]] = prob.lat[i, j]
    for l, (h, c, P) in enumerate(cur):
        v = layers[l]
        for cnt, var, nbytes, cap in ((h, v.h, hb, G), (c, v.c, cb, K)):
            inflow = {j: {} for j in V}
            outflow = {i: {} for i in senders}
            for i, n in cnt.items():
                for j in V:
                    if i == j:
                        continue
                    f = m.var(0, n, integer=True)
                    m.le({f: 1, act[i, j]: -n}, 0)
                    busy[i][f] = nbytes * prob.spb[i, j]
                    inflow[j][f] = 1
                    outflow[i][f] = 1
            for j in set(V) | set(cnt):  # count_j = cur_j - out_j + in_j
                terms = {var[j]: 1.0} if j in var else {}
                for f in outflow.get(j, {}):
                    terms[f] = terms.get(f, 0) + 1
                for f in inflow.get(j, {}):
                    terms[f] = terms.get(f, 0) - 1
                m.eq(terms, cnt.get(j, 0))
        for k in V:
            if k != P:
                m.le({v.p[k]: 1, act[P, k]: -1}, 0)
                busy[P][v.p[k]] = busy[P].get(v.p[k], 0) + pb * prob.spb[P, k]
    mig = m.var(0)
    for i in senders:
        m.ge({mig: 1, **{x: -w for x, w in busy[i].items()}}, 0)
    return mig


def decode_milp(prob: Problem, K: int, time_limit_s: float, horizon: float | None = None,
                max_nodes: int | None = None) -> Placement:
    """``horizon``: when given and ``snapshot.current`` applies, the objective adds the migration
    delay from it divided by ``horizon`` tokens. ``max_nodes``: the MILP's work budget
    (``Milp.solve``); its dual bound stays a bound when the budget stops it."""
    d, V, m = prob.dims, np.nonzero(prob.allowed)[0].tolist(), Milp()
    k = decode_constants(d, prob.T)
    fc = k["ffn_col_flops"] * d.ffn_dim / K
    chunk_b = -(-d.ffn_dim // K) * prob.sz.ffn_col_b
    layers = [_Vars(m, V, d.n_kv_heads, K) for _ in range(d.n_layers)]
    m.ub[layers[0].s] = 0.0
    for l, v in enumerate(layers):
        inputs = {prob.src: None} if l == 0 else {i: layers[l - 1].a[i] for i in V}
        _attention(m, prob, V, v, inputs, k, d.n_kv_heads)
        nxt = layers[l + 1].s if l + 1 < d.n_layers else m.var(0)
        _ffn(m, prob, V, v, nxt, k, K, fc)
    end = m.var(0, cost=1.0)
    X = prob.lat + k["x_bytes"] * prob.spb
    lm = k["lm_flops"] / prob.C[prob.src] if prob.C[prob.src] > 0 else 0.0  # a constant, kept for the bound
    for r in V:
        m.ge({end: 1, nxt: -1, layers[-1].a[r]: -X[r, prob.src]}, lm)
    for j in V:
        m.le({t: w for v in layers for t, w in ((v.h[j], prob.sz.head_b), (v.p[j], prob.sz.proj_b),
                                                 (v.c[j], chunk_b))}, prob.budget[j])
    cur = _current_counts(prob, K) if horizon else None
    if cur is not None:
        m.cost[_migration(m, prob, V, layers, K, cur)] = 1.0 / horizon
    x, obj = m.solve(time_limit_s, "optimal (decode MILP)", max_nodes)
    pl = _placement(prob, layers, x, V, K)
    # without a migration term the MILP's optimum is the relaxation's: a bound on the serialised one
    # (over FFNs cut into K chunks; with unequal chunks the MILP's mean width / ceil bytes are not exact)
    exact = cur is None and d.ffn_dim % K == 0
    pl.meta["relaxation_bound_s"] = m.dual_bound if exact else None
    pl.meta["milp_objective"] = obj
    pl.meta.update(milp_max_nodes=max_nodes, milp_node_limited=m.node_limited, milp_gap=m.gap)
    return pl


def _placement(prob: Problem, layers: list[_Vars], x: np.ndarray, V, K: int) -> Placement:
    names, d, cur = prob.names, prob.dims, prob.snap.current
    out = []
    for l, v in enumerate(layers):
        cl = cur.layers[l] if cur is not None and len(cur.layers) == d.n_layers else None
        hc = {names[j]: int(round(x[v.h[j]])) for j in V if x[v.h[j]] > 0.5}
        cc = {names[j]: int(round(x[v.c[j]])) for j in V if x[v.c[j]] > 0.5}
        P = names[next(j for j in V if x[v.p[j]] > 0.5)]
        agg = names[next(j for j in V if x[v.a[j]] > 0.5)]
        ffn = assign_ffn(cc, agg, d.ffn_dim, K, cl.ffn if cl else None)
        out.append(LayerPlacement(assign_heads(hc, cl.heads if cl else None, d.n_kv_heads), P, ffn))
    return Placement(prob.snap.source, tuple(out), meta={"algorithm": "optimal", "solver": "highs-milp"})


def objective(prob: Problem, pl: Placement, H: float, net) -> float:
    """``latency + migration delay / H`` (``ra.choice._objective``: the migration delay of what the runtime
    ships, ``migration``)."""
    from testbed.partition.ra.choice import _objective

    return _objective(prob, pl, H, net)[0]


def _fits(prob: Problem, pl: Placement) -> bool:
    from testbed.partition.cost.latency import placement_memory

    mem = placement_memory(pl, prob.snap, prob.dims, prob.T_mem)
    return all(mem.get(d.name, 0) <= d.mem_budget_bytes for d in prob.snap.devices)


def _neighbours(prob: Problem, pl: Placement):
    """One-block changes: a head group to another device, two groups of different devices swapped
    (changes the send order), the proj to another device, an FFN shard to another device, another
    shard made the aggregator (moved first)."""
    from testbed.core.placement import FfnShard

    names = prob.allowed_names()
    for l, lp in enumerate(pl.layers):
        def put(new_lp, l=l):
            return Placement(pl.source, pl.layers[:l] + (new_lp,) + pl.layers[l + 1:], meta=pl.meta)

        for g, dev in enumerate(lp.heads):
            for j in names:
                if j != dev:
                    yield put(LayerPlacement(lp.heads[:g] + (j,) + lp.heads[g + 1:], lp.proj, lp.ffn))
        for g in range(len(lp.heads)):
            for h in range(g + 1, len(lp.heads)):
                if lp.heads[g] != lp.heads[h]:
                    hs = list(lp.heads)
                    hs[g], hs[h] = hs[h], hs[g]
                    yield put(LayerPlacement(tuple(hs), lp.proj, lp.ffn))
        for j in names:
            if j != lp.proj:
                yield put(LayerPlacement(lp.heads, j, lp.ffn))
        for i, sh in enumerate(lp.ffn):
            for j in names:
                if j != sh.device:
                    ffn = lp.ffn[:i] + (FfnShard(j, sh.col_start, sh.col_end),) + lp.ffn[i + 1:]
                    yield put(LayerPlacement(lp.heads, lp.proj, ffn))
            if i > 0:
                yield put(LayerPlacement(lp.heads, lp.proj, (sh,) + lp.ffn[:i] + lp.ffn[i + 1:]))


def improve(prob: Problem, start: Placement, H: float, max_evals: int = 10_000) -> tuple[Placement, float, int]:
    """First-improvement local search on ``objective`` (serialised ``decode_cost`` + migration / H)
    from ``start`` over ``_neighbours`` that fit the memory horizon; stops at a local optimum or
    after ``max_evals`` objective evaluations (a deterministic budget: the plan does not depend on
    the machine's speed). Returns (placement, objective, evaluations)."""
    from testbed.partition.cost.latency import Net

    net = Net(prob.snap)
    best, best_obj = start, objective(prob, start, H, net)
    evals, improved = 1, True
    while improved and evals < max_evals:
        improved = False
        for cand in _neighbours(prob, best):
            if not _fits(prob, cand):
                continue
            obj = objective(prob, cand, H, net)
            evals += 1
            if obj < best_obj * (1 - 1e-12):
                best, best_obj, improved = cand, obj, True
                break
            if evals >= max_evals:
                break
    return best, best_obj, evals
