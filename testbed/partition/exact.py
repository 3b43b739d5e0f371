"""The exact solver ``optimal`` (HiGHS MILP) and the paper-model head-count enumeration.

Scope (anything larger raises ``OutOfScope``, an ``InfeasiblePlan``):
- ``paper`` model (one layer; heads, proj and ONE FFN block as in the paper): MILP over integer
  head counts per device (heads are interchangeable), proj/FFN binaries, an epigraph variable for
  the max head compute, and linearised transfer terms; migration delay from ``snapshot.current``
  amortised over ``tokens_until_next_decision`` is IN the objective, exactly as ``migration``
  aggregates it (integer head flows per device pair, pair-active binaries, per-sender busy time,
  epigraph max). Any number of heads; up to ``max_devices`` (16) allowed devices.
- ``decode`` model: the whole multi-layer dataflow, exact for FFNs cut into ``ffn_chunks`` equal
  chunks (default 4, as RA; when ``ffn_dim`` is not a multiple the MILP uses the mean chunk width):
  per layer integer head counts and chunk counts per device, presence binaries, proj and aggregator
  binaries, start/finish times per stage with big-M constraints per (input device, head device,
  proj device) and (proj, shard, aggregator) triple. Limited to ``n_layers * devices**3 <= 256``
  (e.g. 2 layers x 5 devices, 9 x 3): the big-M
  formulation is weak and HiGHS slows down quickly beyond that. The decode MILP is exact for the
  independent-transfer relaxation of ``decode`` (``serial_nics=False``): it does not order one
  device's sends, so its objective is a LOWER bound of the serialised-NIC decode optimum, and its
  placement is reported (and compared) under the serialised model. Migration from ``snapshot.current``
  IS in the decode MILP objective, amortised over RA's horizon (``horizon_epochs`` x tokens per
  epoch): integer head / FFN-chunk flows per (layer, sender, receiver), proj moves, pair-active
  binaries, per-sender busy time, max over senders (``exact_decode._migration``). The solution is
  then compared, under the serialised model, with the current placement (if it still fits), RA's
  minimal ``repair`` of it (if not) and per-layer mixtures (``ra.choose_plan``).
``enumerate_paper`` cross-checks the paper MILP by exhausting head-count vectors (no migration).
"""
from __future__ import annotations

import numpy as np

from testbed.partition import blocks as B
from testbed.partition.common import Problem, assign_ffn, check_memory, evaluate
from testbed.partition.cost import decode_constants
from testbed.partition.errors import InfeasiblePlan, OutOfScope
from testbed.partition.milp import Milp
from testbed.placement import FfnShard, LayerPlacement, Placement

DECODE_LIMIT = 256


def _heads_from_flows(cur: tuple[str, ...] | None, counts: dict[str, int], flows: dict) -> tuple[str, ...]:
    """Heads tuple realising integer flows (i -> j: m) from the current heads; else by counts."""
    if cur is None:
        return tuple(d for d, n in counts.items() for _ in range(n))
    out = list(cur)
    for (i, j), m in flows.items():
        for g in [g for g, d in enumerate(cur) if d == i][:m]:
            if out[g] == i:
                out[g] = j
                m -= 1
    return tuple(out)


def _paper_migration(m: Milp, prob: Problem, V: list[int], nv: dict, pv: dict, fv: dict, cur: Placement):
    """Add head flows and per-sender busy time; return the migration-delay variable."""
    names, G, sz = prob.names, prob.dims.n_kv_heads, prob.sz
    lp = cur.layers[0]
    cur_cnt = {prob.index[d]: lp.heads.count(d) for d in set(lp.heads)}
    cp, cf = prob.index[lp.proj], prob.index[lp.ffn[0].device]
    fb = prob.dims.ffn_dim * sz.ffn_col_b
    devs = sorted(set(V) | set(cur_cnt))
    flow, act, busy = {}, {}, {i: {} for i in devs}
    for i in devs:
        for j in V:
            if i != j:
                act[i, j] = m.binary()
                busy[i][act[i, j]] = prob.lat[i, j]
                if cur_cnt.get(i):
                    flow[i, j] = m.var(0, G, integer=True)
                    m.le({flow[i, j]: 1, act[i, j]: -G}, 0)
                    busy[i][flow[i, j]] = sz.head_b * prob.spb[i, j]
    for j in devs:  # conservation: n_j = cur_j - out + in
        terms = {nv[j]: 1} if j in nv else {}
        for (a, b), v in flow.items():
            if b == j:
                terms[v] = terms.get(v, 0) - 1
            if a == j:
                terms[v] = terms.get(v, 0) + 1
        m.eq(terms, cur_cnt.get(j, 0))
    for src, var, nbytes in ((cp, pv, sz.proj_b), (cf, fv, fb)):
        for k in V:
            if k != src:
                m.le({var[k]: 1, act[src, k]: -1}, 0)
                busy[src][var[k]] = busy[src].get(var[k], 0) + nbytes * prob.spb[src, k]
    mig = m.var(0)
    for i in devs:
        m.ge({mig: 1, **{v: -c for v, c in busy[i].items()}}, 0)
    return mig, flow


def _paper_milp(prob: Problem, time_limit_s: float):
    sz, G, V = prob.sz, prob.dims.n_kv_heads, np.nonzero(prob.allowed)[0].tolist()
    fb, m = prob.dims.ffn_dim * sz.ffn_col_b, Milp()
    z = m.var(0, cost=1.0)
    nv = {j: m.var(0, G, integer=True) for j in V}
    pv = {j: m.binary(sz.proj_f / prob.C[j]) for j in V}
    fv = {j: m.binary(sz.ffn_col_f * prob.dims.ffn_dim / prob.C[j]) for j in V}
    m.eq(dict.fromkeys(nv.values(), 1.0), G)
    m.eq(dict.fromkeys(pv.values(), 1.0), 1)
    m.eq(dict.fromkeys(fv.values(), 1.0), 1)
    for j in V:
        m.ge({z: 1, nv[j]: -sz.head_f / prob.C[j]}, 0)
        m.le({nv[j]: sz.head_b, pv[j]: sz.proj_b, fv[j]: fb}, prob.budget[j])
        for k in V:
            if j != k:
                c = sz.head_out_b * prob.spb[j, k]
                w = m.var(0, cost=1.0)  # = n_j * c when proj on k
                m.ge({w: 1, nv[j]: -c, pv[k]: -G * c}, -G * c)
                u = m.var(0, cost=sz.x_b * prob.spb[j, k])  # proj on j and FFN on k
                m.ge({u: 1, pv[j]: -1, fv[k]: -1}, -1)
    cur, flow = prob.snap.current, {}
    if cur is not None and len(cur.layers) == 1 and cur.devices() <= set(prob.names):
        mig, flow = _paper_migration(m, prob, V, nv, pv, fv, cur)
        m.cost[mig] = 1.0 / prob.N
    x, _ = m.solve(time_limit_s, "optimal (paper MILP)")
    pick = lambda d: next(j for j in V if x[d[j]] > 0.5)  # noqa: E731
    counts = {prob.names[j]: int(round(x[nv[j]])) for j in V}
    flows = {(prob.names[i], prob.names[j]): int(round(x[v])) for (i, j), v in flow.items() if x[v] > 0.5}
    heads = _heads_from_flows(cur.layers[0].heads if flow else None, counts, flows)
    F = prob.dims.ffn_dim
    layer = LayerPlacement(heads, prob.names[pick(pv)], (FfnShard(prob.names[pick(fv)], 0, F),))
    return Placement(prob.snap.source, (layer,), meta={"algorithm": "optimal", "solver": "highs-milp"})


def _compositions(total: int, parts: int) -> np.ndarray:
    """All non-negative integer vectors of length ``parts`` summing to ``total`` (rows)."""
    if parts == 1:
        return np.array([[total]])
    rows = [np.hstack([np.full((len(sub), 1), k), sub])
            for k in range(total + 1) for sub in [_compositions(total - k, parts - 1)]]
    return np.vstack(rows)


def enumerate_paper(snapshot, dims) -> tuple[Placement, float]:
    """Exact search over head counts x proj device x FFN device under the paper model (no migration)."""
    prob = Problem(snapshot, dims, "paper")
    sz, V = prob.sz, np.nonzero(prob.allowed)[0]
    N = _compositions(dims.n_kv_heads, len(V)).astype(float)  # (R, n)
    C, fb = prob.C[V], dims.ffn_dim * sz.ffn_col_b
    head_c = (N * (sz.head_f / C)).max(axis=1)
    best, best_t = None, np.inf
    for a, P in enumerate(V):
        xo = sz.head_out_b * prob.spb[V, P]
        base = head_c + N @ xo + sz.proj_f / prob.C[P]
        for b, Fd in enumerate(V):
            mem = N * sz.head_b
            mem[:, a] += sz.proj_b
            mem[:, b] += fb
            ok = (mem <= prob.budget[V]).all(axis=1)
            t = base + sz.ffn_col_f * dims.ffn_dim / prob.C[Fd] + (sz.x_b * prob.spb[P, Fd] if P != Fd else 0.0)
            t = np.where(ok, t, np.inf)
            r = int(np.argmin(t))
            if t[r] < best_t:
                best, best_t = (N[r], P, Fd), float(t[r])
    if best is None:
        raise InfeasiblePlan("enumeration: no head-count vector satisfies the memory limits")
    counts, P, Fd = best
    heads = tuple(prob.names[V[i]] for i, c in enumerate(counts) for _ in range(int(c)))
    layer = LayerPlacement(heads, prob.names[P], (FfnShard(prob.names[Fd], 0, dims.ffn_dim),))
    return Placement(snapshot.source, (layer,), meta={"algorithm": "enumerate"}), best_t


def optimal(snapshot, dims, cost_model: str = "decode", ffn_chunks: int | None = None,
            time_limit_s: float = 60.0, max_devices: int = 16, horizon_epochs: int = 4,
            horizon_tokens: int | None = None) -> Placement:
    """Exact minimum of the chosen cost model (scope in the module docstring).

    Under ``decode`` the migration delay from ``snapshot.current`` is amortised over
    ``horizon_tokens`` (default ``horizon_epochs`` x tokens per epoch, as RA) in the MILP objective,
    and the solution is then compared (latency + migration delay / H under the serialised model)
    with the current placement if it still fits, else with RA's minimal ``repair`` of it, and with
    per-layer mixtures (``ra.choose_plan``)."""
    from testbed.partition.exact_decode import decode_milp
    from testbed.partition.ra import choose_plan

    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    n = int(prob.allowed.sum())
    if cost_model == "paper":
        if dims.n_layers != 1 or n > max_devices:
            raise OutOfScope(f"optimal/paper: needs 1 layer and <= {max_devices} devices; got "
                             f"{dims.n_layers} layers, {n} devices")
        return _paper_milp(prob, time_limit_s)
    if dims.n_layers * n ** 3 > DECODE_LIMIT:
        raise OutOfScope(f"optimal/decode: n_layers * devices^3 = {dims.n_layers} * {n}^3 = "
                         f"{dims.n_layers * n ** 3} exceeds the MILP scope limit {DECODE_LIMIT}")
    K = max(1, min(ffn_chunks or 4, dims.ffn_dim))
    H = float(horizon_tokens if horizon_tokens is not None else prob.N * max(1, horizon_epochs))
    prob.H = max(1.0, H)
    new = decode_milp(prob, K, time_limit_s, horizon=prob.H)
    return choose_plan(prob, new, prob.H)
