"""The exact solver ``optimal`` and the paper-model head-count enumeration.

Scope (anything larger raises ``OutOfScope``, an ``InfeasiblePlan``):
- ``paper`` model (one layer; heads, proj and ONE FFN block as in the paper): MILP over integer
  head counts per device (heads are interchangeable), proj/FFN binaries, an epigraph variable for
  the max head compute, and linearised transfer terms; migration delay from ``snapshot.current``
  amortised over ``tokens_until_next_decision`` is IN the objective, exactly as ``migration``
  aggregates it (integer head flows per device pair, pair-active binaries, per-sender busy time,
  epigraph max). Any number of heads; up to ``max_devices`` (16) allowed devices.
- ``decode`` model, evaluated (and reported) with ``cost.decode_cost`` under SERIALISED NICs
  (a device's sends queue on its uplink in the runtime's order, fan-in queues on the receiver's
  downlink). What is exact and what is not:
  * ONE layer, no ``snapshot.current`` (every token-0 plan): EXACT. ``exact.serial`` searches
    head counts per device x proj device x the order of the ``x`` sends to the head devices x FFN
    chunk counts (``ffn_chunks`` equal chunks, default 4 as RA) x aggregator x shard send order,
    within the memory budgets at the next decision (``T + tokens_until_next_decision``, capped at
    the end of generation, ``snapshot.tokens_remaining``), through
    a decomposition that is exact for one layer, and certifies the result by evaluating with
    ``decode_cost`` every plan whose lower bound is below the best latency found. So ``optimal``'s
    latency is <= that of every placement that fits and whose FFN is cut at the chunk boundaries
    (when ``ffn_chunks`` divides ``ffn_dim``; otherwise shards are laid out in send order), to
    1e-9 relative; this includes every plan RA can produce. Scope: ``SERIAL_LIMIT`` (attention
    table: devices x head-count vectors x send orders; 5 devices x 32 heads = 7.1e6 entries,
    about 1-2 s). ``placement.meta``: ``latency_s``, ``latency_lower_bound_s`` (= the latency when
    ``latency_certified``), ``latency_gap``, ``checked`` (plans evaluated with ``decode_cost``).
  * ONE layer WITH a current placement: the objective is latency + migration delay / H
    (``horizon_epochs`` x tokens per epoch, as RA; the delay is ``migration``'s estimate of what
    the runtime ships, ``exact.decode.objective``). HEURISTIC for the migration part:
    the (up to 200) structures with the smallest latency bounds below the best objective are
    realised from scratch and keeping blocks in place, evaluated exactly, and the best is compared
    with the current placement / RA's minimal ``repair`` of it (``ra.choice.choose_plan``).
    ``latency_lower_bound_s`` is still a certified bound on the latency of any plan.
  * SEVERAL layers, no ``snapshot.current`` (every token-0 plan), ``ffn_chunks`` dividing
    ``ffn_dim``, head-count vectors per proj device <= ``CHAIN_LIMIT``: ``exact.chain``, EXACT
    when it certifies. The latency is a sum over layers given each layer's input device (the
    previous aggregator) and memory couples the layers: per-layer option tables (lower bounds of
    ``decode_cost``, at their best send orders), Lagrangian bounds (memory priced by the duals of
    a column-generation LP over the chain) that discard every option no plan faster than the
    incumbent uses, a branch over which devices serve as layer outputs, and per node a MILP
    (HiGHS, no layer positions, connectivity rows) over the options left. CERTIFIED optimal over
    the same plan space as the one-layer search (to 1e-9 relative) when every node closes;
    otherwise the best plan found (never worse than RA's, its start, when RA's lies in the space)
    with a proven ``latency_lower_bound_s`` (``latency_certified`` False, ``chain_stop`` says
    why). ``milp_max_nodes`` bounds each node's MILP; ``time_limit_s`` guards the whole search.
  * SEVERAL layers otherwise (a current placement, or beyond the chain's scope): NOT exact. The MILP of
    ``exact.decode`` solves the independent-transfer relaxation (``serial_nics=False``, a lower
    bound of the serialised model placement by placement) exactly for FFNs cut into ``ffn_chunks``
    chunks; without a current placement (and with ``ffn_chunks`` dividing ``ffn_dim``) its dual
    bound is reported as ``latency_lower_bound_s`` (certified); with one, migration is in the
    MILP objective (integer head / FFN-chunk flows, proj moves, per-sender busy time) and no bound
    is reported. The plan is the best, under the serialised objective, of a local search
    (``exact.decode.improve``) from the MILP's plan and from RA's plan (``best_seed`` says which),
    then ``ra.choice.choose_plan``: so it is not worse than RA's plan (when that fits) by construction; its
    distance to the optimum is at most ``latency_gap``. Limited to ``n_layers * devices**3 <=
    256`` (the big-M formulation is weak; HiGHS slows down beyond).
``enumerate_paper`` cross-checks the paper MILP by exhausting head-count vectors (no migration).
"""
from __future__ import annotations

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.common import Problem, assign_ffn, check_memory, evaluate
from testbed.partition.cost.latency import decode_constants
from testbed.core.errors import InfeasiblePlan, OutOfScope
from testbed.partition.exact.milp import Milp
from testbed.core.placement import FfnShard, LayerPlacement, Placement

DECODE_LIMIT = 256
CHAIN_LIMIT = 400_000  # several layers at token 0: head-count vectors per proj device (8 devices x
# 12 groups: 50,388; ``exact.chain``)
SERIAL_LIMIT = (10_000_000, 200_000)  # one-layer exact search: attention-table entries (5 devices x
# 32 heads: 7.1e6, ~60 MB), FFN choices simulated (5 devices, 4 chunks: 5 x 365)


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
                    busy[i][flow[i, j]] = sz.mig_head_b * prob.spb[i, j]
    for j in devs:  # conservation: n_j = cur_j - out + in
        terms = {nv[j]: 1} if j in nv else {}
        for (a, b), v in flow.items():
            if b == j:
                terms[v] = terms.get(v, 0) - 1
            if a == j:
                terms[v] = terms.get(v, 0) + 1
        m.eq(terms, cur_cnt.get(j, 0))
    for src, var, nbytes in ((cp, pv, sz.mig_proj_b), (cf, fv, prob.dims.ffn_dim * sz.mig_col_b)):
        for k in V:
            if k != src:
                m.le({var[k]: 1, act[src, k]: -1}, 0)
                busy[src][var[k]] = busy[src].get(var[k], 0) + nbytes * prob.spb[src, k]
    mig = m.var(0)
    for i in devs:
        m.ge({mig: 1, **{v: -c for v, c in busy[i].items()}}, 0)
    return mig, flow


def _paper_milp(prob: Problem, time_limit_s: float, max_nodes: int | None = None):
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
    x, _ = m.solve(time_limit_s, "optimal (paper MILP)", max_nodes)
    pick = lambda d: next(j for j in V if x[d[j]] > 0.5)  # noqa: E731
    counts = {prob.names[j]: int(round(x[nv[j]])) for j in V}
    flows = {(prob.names[i], prob.names[j]): int(round(x[v])) for (i, j), v in flow.items() if x[v] > 0.5}
    heads = _heads_from_flows(cur.layers[0].heads if flow else None, counts, flows)
    F = prob.dims.ffn_dim
    layer = LayerPlacement(heads, prob.names[pick(pv)], (FfnShard(prob.names[pick(fv)], 0, F),))
    return Placement(prob.snap.source, (layer,), meta={"algorithm": "optimal", "solver": "highs-milp",
                                                       **_budget_meta(m, max_nodes)})


def _budget_meta(m: Milp, max_nodes: int | None) -> dict:
    """What the MILP's work budget did: its node limit, whether it stopped there, the gap then."""
    return {"milp_max_nodes": max_nodes, "milp_node_limited": m.node_limited, "milp_gap": m.gap}


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


def _serial_one_layer(prob: Problem, K: int) -> Placement:
    """One layer: the exact search under the serialised decode model (``exact.serial``)."""
    from testbed.partition.exact.serial import SerialLayerSearch, with_migration
    from testbed.partition.ra.choice import choose_plan

    S = SerialLayerSearch(prob, K)
    r = S.solve()
    cur = prob.snap.current
    mig = cur is not None and len(cur.layers) == 1 and cur.source == prob.snap.source
    meta = {"algorithm": "optimal", "solver": "serial-enumeration", "ffn_chunks": K,
            # the latency-optimal plan's latency and a lower bound of every plan's latency
            "latency_s": r.latency_s, "latency_lower_bound_s": r.lower_bound_s,
            "latency_gap": 0.0 if r.certified else (r.latency_s / r.lower_bound_s - 1 if r.lower_bound_s > 0
                                                    else None),
            "latency_certified": r.certified, "checked": r.checked,
            "objective": "latency + migration / H (heuristic)" if mig else "latency (exact)"}
    if not mig:
        return Placement(r.placement.source, r.placement.layers, meta=meta)
    best, evals = with_migration(S, r, prob.H)
    meta["migration_evaluations"] = evals
    return choose_plan(prob, Placement(best.source, best.layers, meta=meta), prob.H)


def _chain(prob: Problem, K: int, snapshot, dims, time_limit_s: float, milp_max_nodes: int) -> Placement:
    """Several layers at token 0: ``exact.chain`` from RA's plan (certified optimum, or the best
    plan found and a proven lower bound)."""
    from testbed.partition.exact.chain import ChainSearch
    from testbed.partition.ra.planner import resource_aware

    try:
        ra = resource_aware(snapshot, dims, "decode", ffn_chunks=K)
    except InfeasiblePlan:
        ra = None
    r = ChainSearch(prob, K).solve(ra, max_nodes=milp_max_nodes, time_limit_s=time_limit_s)
    meta = {"algorithm": "optimal", "solver": "chain-lagrangian+highs-milp", "ffn_chunks": K,
            "latency_s": r.latency_s, "latency_lower_bound_s": r.lower_bound_s,
            "latency_gap": 0.0 if r.certified else (r.latency_s / r.lower_bound_s - 1 if r.lower_bound_s > 0
                                                    else None),
            "latency_certified": r.certified,
            "objective": "latency (exact)" if r.certified else "latency (bounded)", **r.meta}
    return Placement(r.placement.source, r.placement.layers, meta=meta)


def _relaxed(prob: Problem, K: int, time_limit_s: float, local_search_evals: int, snapshot, dims,
             milp_max_nodes: int | None = None) -> Placement:
    """Several layers: the relaxation MILP (lower bound when no current placement applies), then a
    local search under the serialised model from its plan and from RA's, best kept (heuristic)."""
    from testbed.partition.exact.decode import decode_milp, improve
    from testbed.partition.ra.planner import resource_aware
    from testbed.partition.ra.choice import _objective, _usable, choose_plan
    from testbed.partition.cost.latency import Net

    milp = decode_milp(prob, K, time_limit_s, horizon=prob.H, max_nodes=milp_max_nodes)
    bound = milp.meta.get("relaxation_bound_s")
    seeds = [("milp-relaxation", milp)]
    try:
        ra = resource_aware(snapshot, dims, "decode", ffn_chunks=K)
        if _usable(prob, ra):
            seeds.append(("resource_aware", ra))
    except InfeasiblePlan:
        pass
    net, found = Net(prob.snap), []
    for name, pl in seeds:
        pl2, obj, _ = improve(prob, pl, prob.H, max(1, local_search_evals // len(seeds)))
        found.append((obj, name, pl2))
    obj, name, best = min(found, key=lambda f: f[0])
    lat = _objective(prob, best, prob.H, net)[1]
    meta = {"algorithm": "optimal", "solver": "highs-milp-relaxation+local-search", "ffn_chunks": K,
            "latency_s": lat, "latency_lower_bound_s": bound, "latency_certified": False,
            "latency_gap": (lat / bound - 1) if bound else None, "best_seed": name,
            **{k: milp.meta[k] for k in ("milp_max_nodes", "milp_node_limited", "milp_gap")},
            "objective": "latency + migration / H (heuristic)" if prob.snap.current is not None
            else "latency (heuristic, bounded)"}
    return choose_plan(prob, Placement(best.source, best.layers, meta=meta), prob.H)


def optimal(snapshot, dims, cost_model: str = "decode", ffn_chunks: int | None = None,
            time_limit_s: float = 60.0, max_devices: int = 16, horizon_epochs: int = 4,
            horizon_tokens: int | None = None, local_search_evals: int = 20_000,
            milp_max_nodes: int = 200_000, level_tol: float = 0.0) -> Placement:
    """Minimum of the chosen cost model (scope and what is exact: the module docstring).

    Under ``decode`` the migration delay from ``snapshot.current`` is amortised over
    ``horizon_tokens`` (default ``horizon_epochs`` x tokens per epoch, as RA), and the result is
    compared (latency + migration delay / H under the serialised model) with the current placement
    if it still fits, else with RA's minimal ``repair`` of it, and with per-layer mixtures
    (``ra.choice.choose_plan``). ``placement.meta`` records the plan's latency, the lower bound and
    whether the latency is certified optimal. Budgets are work counts (``local_search_evals``
    plan evaluations, ``milp_max_nodes`` branch-and-bound nodes, the exact search's
    ``SERIAL_LIMIT``), so the plan does not depend on the machine's speed or load;
    ``time_limit_s`` only guards the MILP (reaching it is a failure).
    Memory policy: its memory horizon is the next decision (capped at the end of the run).
    ``level_tol > 0`` (default 0: the plan is the latency optimum the certificate describes) adds
    RA's step 6 (``ra.leveling``): the largest peak lowered by head / FFN-chunk moves within
    ``1 + level_tol`` of the plan's objective; ``meta`` keeps the certificate of the plan BEFORE
    leveling and says ``leveling_moves``."""
    pl = _optimal(snapshot, dims, cost_model, ffn_chunks, time_limit_s, max_devices, horizon_epochs,
                  horizon_tokens, local_search_evals, milp_max_nodes)
    if level_tol <= 0:
        return pl
    from testbed.partition.ra.leveling import level_plan

    prob = Problem(snapshot, dims, cost_model)
    N = prob.N
    prob.H = max(1.0, snapshot.amortisation_tokens(horizon_tokens if horizon_tokens is not None
                                                   else N * max(1, horizon_epochs)))
    K = max(1, min(ffn_chunks or (1 if cost_model == "paper" else 4), dims.ffn_dim))
    return level_plan(prob, pl, level_tol, K, 2000)


def _optimal(snapshot, dims, cost_model: str, ffn_chunks: int | None, time_limit_s: float, max_devices: int,
             horizon_epochs: int, horizon_tokens: int | None, local_search_evals: int,
             milp_max_nodes: int) -> Placement:
    """``optimal`` without the leveling step."""
    from testbed.partition.exact.options import chain_size
    from testbed.partition.exact.serial import search_size

    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    n = int(prob.allowed.sum())
    if cost_model == "paper":
        if dims.n_layers != 1 or n > max_devices:
            raise OutOfScope(f"optimal/paper: needs 1 layer and <= {max_devices} devices; got "
                             f"{dims.n_layers} layers, {n} devices")
        return _paper_milp(prob, time_limit_s, milp_max_nodes)
    K = max(1, min(ffn_chunks or 4, dims.ffn_dim))
    H = snapshot.amortisation_tokens(horizon_tokens if horizon_tokens is not None else prob.N * max(1, horizon_epochs))
    prob.H = max(1.0, H)
    size = search_size(n, dims.n_kv_heads, K)
    if dims.n_layers == 1 and all(a <= b for a, b in zip(size, SERIAL_LIMIT)):
        return _serial_one_layer(prob, K)
    if dims.n_layers > 1 and snapshot.current is None and dims.ffn_dim % K == 0 \
            and chain_size(n, dims.n_kv_heads) <= CHAIN_LIMIT:
        return _chain(prob, K, snapshot, dims, time_limit_s, milp_max_nodes)
    if dims.n_layers * n ** 3 > DECODE_LIMIT:
        raise OutOfScope(f"optimal/decode: n_layers * devices^3 = {dims.n_layers} * {n}^3 = "
                         f"{dims.n_layers * n ** 3} exceeds the MILP scope limit {DECODE_LIMIT}"
                         + (f" (one layer: the exact search would have {size[0]} table entries and "
                            f"{size[1]} FFN choices, limits {SERIAL_LIMIT})" if dims.n_layers == 1 else ""))
    return _relaxed(prob, K, time_limit_s, local_search_evals, snapshot, dims, milp_max_nodes)
