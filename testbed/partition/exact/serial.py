"""Exact one-layer search under the SERIALISED ``decode`` model (``cost.decode_cost``, serial NICs).

What is searched (the plan space ``S``): one decoder layer; per allowed device a head count
``n_j`` (sum = KV groups), the proj device ``P``, the order in which the input device sends ``x``
to the head devices (``P`` is always first: ``decode_cost`` follows the runtime's send order, so
the order of first appearance in ``heads`` changes the latency), the FFN cut at the ``K`` chunk
boundaries (``blocks.ffn_chunk_bounds``) with per-device chunk counts, the aggregator and the
order of the other shard devices (their send order). Shards are laid out contiguously in send
order. ``decode_cost`` depends on a placement only through these choices, so when ``K`` divides
``ffn_dim`` every placement whose shards are unions of the ``K`` chunks has the latency of some
member of ``S``.

Decomposition (exact for one layer): by the proj's finish time ``pd`` every uplink is free (the
input device's ``x`` sends and the head outputs all end before the last head output is received),
so ``latency = att(n, order | P) + proj(P) + tail(P, FFN)`` where ``att`` is the attention phase
with the source's serialised ``x`` broadcast and the serialised fan-in at ``P``, and ``tail`` the
FFN phase, the partials' fan-in at the aggregator, ``x`` to the source and the LM head. Memory
couples the two: per (``P``, FFN column vector) the head counts are capped by what is left.
``att`` is tabulated with numpy for every (head-count vector, send order) and ``tail`` simulated
for every FFN choice.

Ties: ``decode_cost`` receives fan-in messages in arrival order with ties broken by send order,
and rounding makes near-ties fragile, so the tables hold a LOWER BOUND: a message's queueing
counts only the messages arriving more than ``EPS`` later (``fin >= max_i R_i + sum_{R_k > R_i +
EPS} tau_k``; equal to ``decode_cost`` without near-ties). The bound's minimiser is evaluated with
``decode_cost``; then every member of ``S`` whose bound is below that latency (minus ``REL_TOL``
relative) is evaluated with ``decode_cost`` too, keeping the best. When that list is exhausted the
plan is CERTIFIED optimal over ``S`` to ``REL_TOL`` (1e-9) relative; if it exceeds ``max_checks``
the plan is the best found and the bound is the smallest unchecked bound (``certified`` False).
Without a current placement this is the whole of ``optimal``'s token-0 objective.

With ``snapshot.current`` the objective is latency + migration delay / H, the migration delay
being ``migration``'s estimate of what the runtime ships (``exact.decode.objective``).
That part is NOT exact: the structures with the smallest latency bounds (up to ``max_candidates``,
only those whose bound is below the best objective so far) are realised both from scratch and
keeping blocks where they are (``assign_heads``/``assign_ffn``), evaluated exactly, and the best
is compared with the current placement / its repair by ``ra.choice.choose_plan``. The latency bound is
still valid (migration >= 0).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.common import Problem, assign_ffn, assign_heads
from testbed.partition.cost.latency import Net, decode_constants, decode_cost
from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import FfnShard, LayerPlacement, Placement

EPS = 1e-12  # seconds: arrivals closer than this are treated as possibly tied
REL_TOL = 1e-9
INF = float("inf")


@lru_cache(maxsize=4096)
def _comps(total: int, caps: tuple[int, ...]) -> np.ndarray:
    """All non-negative integer rows of length len(caps), summing to ``total``, row <= caps."""
    if len(caps) == 1:
        return np.array([[total]]) if total <= caps[0] else np.zeros((0, 1), dtype=int)
    parts = []
    for k in range(min(total, caps[0]) + 1):
        sub = _comps(total - k, caps[1:])
        if len(sub):
            parts.append(np.hstack([np.full((len(sub), 1), k), sub]))
    return np.vstack(parts) if parts else np.zeros((0, len(caps)), dtype=int)


def search_size(n_devices: int, n_groups: int, chunks: int) -> tuple[int, int]:
    """(attention-table entries: proj devices x head-count vectors x send orders, FFN choices
    simulated: proj devices x chunk counts x aggregator x shard orders), before memory pruning."""
    from math import comb, factorial

    m = max(1, n_devices)
    att = m * comb(n_groups + m - 1, m - 1) * factorial(m - 1)
    ffn = m * sum(comb(m, s) * comb(chunks - 1, s - 1) * factorial(s) for s in range(1, min(m, chunks) + 1))
    return att, ffn


def _fan_in_lb(R: list[np.ndarray], tau: list[np.ndarray]) -> np.ndarray:
    """Lower bound of the serialised fan-in's finish, per row: ``max_i R_i + sum of tau_k over the
    messages k arriving more than EPS after i`` (``R = -inf``, ``tau = 0``: no message)."""
    out = np.full(np.shape(R[0]), -INF)
    for i, Ri in enumerate(R):
        acc = Ri.copy()
        lim = Ri + EPS
        for k, (Rk, tk) in enumerate(zip(R, tau)):
            if k != i:
                acc += np.where(Rk > lim, tk, 0.0)
        np.maximum(out, acc, out=out)
    return out


@dataclass
class _Ffn:
    tail: float  # seconds from the proj's finish to the end of the LM head (lower bound)
    seq: tuple[int, ...]  # positions in V, aggregator first (the send order)
    chunks: tuple[int, ...]  # chunks per position in seq


@dataclass
class Result:
    placement: Placement
    latency_s: float  # decode_cost of the placement
    lower_bound_s: float  # no member of the space is faster than this
    certified: bool
    checked: int  # placements evaluated with decode_cost


class SerialLayerSearch:
    """Tables for one single-layer problem; ``solve()`` -> ``Result`` (see the module docstring)."""

    def __init__(self, prob: Problem, K: int):
        d = prob.dims
        if d.n_layers != 1:
            raise InfeasiblePlan(f"serial search: one layer only, got {d.n_layers}")
        self.prob, self.K, self.G = prob, K, d.n_kv_heads
        self.V = [int(j) for j in np.nonzero(prob.allowed)[0]]
        self.k = decode_constants(d, prob.T)
        self.bounds = B.ffn_chunk_bounds(d.ffn_dim, K)
        self.hb = int(B.block_memory_bytes(d, "head", prob.T_mem))
        self.pb = int(B.proj_bytes(d))
        self.budget = [int(np.floor(prob.budget[j])) for j in self.V]
        caps = tuple(max(0, min(self.G, b // self.hb)) if b >= 0 else 0 for b in self.budget)
        self.N = _comps(self.G, caps)  # (R, m) head counts over V
        if len(self.N) == 0:
            raise InfeasiblePlan(f"serial search: no device set holds the {self.G} head groups "
                                 f"({self.hb} bytes each) within the memory budgets")
        self.perms = {}  # P position -> list of orders (positions in V, without P)
        self.att = {}  # P position -> (R, n_perms) lower bounds of att
        self.ffn = {}  # P position -> {cols vector: [_Ffn sorted by tail]}
        self._entries = None
        for iP in range(len(self.V)):
            self._attention(iP)
            self._ffn(iP)

    # ------------------------------------------------------------------ attention phase tables
    def _attention(self, iP: int) -> None:
        with np.errstate(invalid="ignore"):  # 0 bytes x an unusable link (inf s/B): masked below
            self._attention_table(iP)

    def _attention_table(self, iP: int) -> None:
        p, V, k = self.prob, self.V, self.k
        s, P, m = p.src, V[iP], len(V)
        N = self.N.T  # (m, R): one contiguous row per device
        present = N > 0
        comp = [(N[i] * k["head_flops"]) / p.C[V[i]] for i in range(m)]
        msgs = [i for i in range(m) if V[i] != P]
        tauP = {i: np.where(present[i], (N[i] * k["head_out_bytes"]) * p.spb[V[i], P], 0.0) for i in msgs}
        tau_s = [k["x_bytes"] * p.spb[s, j] if j != s else 0.0 for j in V]
        lat_s = [p.lat[s, j] if j != s else 0.0 for j in V]
        perms = list(itertools.permutations(msgs))
        out = np.empty((N.shape[1], len(perms)))
        upP = tau_s[iP] if P != s else 0.0
        AP = upP + lat_s[iP] if P != s else 0.0  # x reaches the proj first
        base = np.maximum(AP, np.where(present[iP], AP + comp[iP], -INF))
        for c, perm in enumerate(perms):
            up = np.full(N.shape[1], upP)
            A = {}
            for i in perm:
                if V[i] == s:
                    A[i] = 0.0  # x to itself: free, no uplink
                    continue
                up = np.where(present[i], up + tau_s[i], up)
                A[i] = up + lat_s[i]
            R, tau = [], []
            for i in perm:
                start = A[i] + comp[i]
                if V[i] == s:
                    start = np.maximum(start, up)  # the source's uplink after all its x sends
                R.append(np.where(present[i], start + tauP[i] + p.lat[V[i], P], -INF))
                tau.append(tauP[i])
            out[:, c] = np.maximum(base, _fan_in_lb(R, tau)) if R else base
        self.perms[iP], self.att[iP] = perms, out

    # ------------------------------------------------------------------ FFN phase
    def _tail(self, P: int, seq: list[int], cols: list[int]) -> float:
        """Seconds from the proj's finish (every uplink free) to the LM head's end, mirroring
        ``cost._decode_layer``'s FFN loop and the final send; fan-in as a lower bound."""
        p, k, V = self.prob, self.k, self.V
        up: dict[int, float] = {}
        xb = k["x_bytes"]

        def send(a: int, b: int, t: float) -> float:
            if a == b:
                return t
            start = max(t, up.get(a, t))
            up[a] = start + xb * p.spb[a, b]
            return up[a] + p.lat[a, b]

        agg = V[seq[0]]
        out, R, tau = 0.0, [], []
        for pos, c in zip(seq, cols):
            dev = V[pos]
            done = send(P, dev, 0.0) + (c * k["ffn_col_flops"]) / p.C[dev]
            if dev == agg:
                out = done
                continue
            R.append(send(dev, agg, done))
            tau.append(xb * p.spb[dev, agg])
        if R:
            out = max(out, float(_fan_in_lb([np.array([r]) for r in R], [np.array([t]) for t in tau])[0]))
        src = p.src
        fin = send(agg, src, out)
        return fin + k["lm_flops"] / p.C[src] if p.C[src] > 0 else INF

    def _ffn(self, iP: int) -> None:
        m, K, P = len(self.V), self.K, self.V[iP]
        groups: dict[tuple[int, ...], list[_Ffn]] = {}
        for c in _comps(K, (K,) * m):
            supp = [i for i in range(m) if c[i] > 0]
            for agg in supp:
                for rest in itertools.permutations([i for i in supp if i != agg]):
                    seq = (agg, *rest)
                    cols, pos = [], 0
                    for i in seq:
                        cols.append(self.bounds[pos + c[i] - 1][1] - self.bounds[pos][0])
                        pos += c[i]
                    vec = [0] * m
                    for i, w in zip(seq, cols):
                        vec[i] = w
                    t = self._tail(P, list(seq), cols)
                    groups.setdefault(tuple(vec), []).append(_Ffn(t, seq, tuple(int(c[i]) for i in seq)))
        for lst in groups.values():
            lst.sort(key=lambda f: f.tail)
        self.ffn[iP] = groups

    # ------------------------------------------------------------------ combination
    def _caps(self, iP: int, vec: tuple[int, ...]) -> np.ndarray | None:
        """Max head groups per device once the proj (on V[iP]) and FFN columns ``vec`` are placed."""
        caps = []
        for i, b in enumerate(self.budget):
            need = (self.pb if i == iP else 0) + (B.ffn_bytes(self.prob.dims, vec[i]) if vec[i] else 0)
            rem = b - need
            if rem < 0 and need > 0:
                return None
            caps.append(max(0, rem // self.hb) if rem >= 0 else 0)
        return np.array(caps)

    def entries(self):
        """(bound of the best member, iP, cols vector, row mask, per-row best att, base) per
        feasible (proj, FFN column vector), base = proj compute + the FFN choice's tail."""
        if self._entries is not None:
            return self._entries
        out = []  # (bound, iP, vec, mask, best_att, proj, best att within the caps)
        for iP in range(len(self.V)):
            best_att = self.att[iP].min(axis=1)
            proj = self.k["proj_flops"] / self.prob.C[self.V[iP]]
            for vec, lst in self.ffn[iP].items():
                caps = self._caps(iP, vec)
                if caps is None:
                    continue
                mask = (self.N <= caps).all(axis=1)
                if not mask.any():
                    continue
                a = float(best_att[mask].min())
                out.append((a + proj + lst[0].tail, iP, vec, mask, best_att, proj, a))
        out.sort(key=lambda e: e[0])
        self._entries = out
        return out

    def placement(self, iP: int, row: int, perm_i: int, f: _Ffn, near: Placement | None = None,
                  meta: dict | None = None) -> Placement:
        """Realise a member of the space: from scratch (exact send orders) or, with ``near``,
        keeping blocks where they are in ``near`` (orders may change)."""
        names, V, n = self.prob.names, self.V, self.N[row]
        order = [iP, *self.perms[iP][perm_i]]
        counts = {names[V[i]]: int(n[i]) for i in order if n[i] > 0}
        ccounts = {names[V[i]]: c for i, c in zip(f.seq, f.chunks)}
        agg = names[V[f.seq[0]]]
        if near is not None:
            lp0 = near.layers[0]
            heads = assign_heads(counts, lp0.heads, self.G)
            ffn = assign_ffn(ccounts, agg, self.prob.dims.ffn_dim, self.K, lp0.ffn)
        else:
            heads = tuple(d for d, c in counts.items() for _ in range(c))
            shards, pos = [], 0
            for i, c in zip(f.seq, f.chunks):
                shards.append(FfnShard(names[V[i]], self.bounds[pos][0], self.bounds[pos + c - 1][1]))
                pos += c
            ffn = tuple(shards)
        return Placement(self.prob.snap.source, (LayerPlacement(heads, names[V[iP]], ffn),), meta=dict(meta or {}))

    def solve(self, max_checks: int = 20000) -> Result:
        """Certified latency optimum over the space (see the module docstring)."""
        p, net = self.prob, Net(self.prob.snap)
        ents = self.entries()
        if not ents:
            raise InfeasiblePlan("serial search: no (proj, FFN split, head counts) combination fits the "
                                 "memory budgets")
        lb0, iP, vec, mask, best_att, proj, _ = ents[0]
        rows = np.nonzero(mask)[0]
        row = int(rows[np.argmin(best_att[rows])])
        f = self.ffn[iP][vec][0]
        pl = self.placement(iP, row, int(np.argmin(self.att[iP][row])), f)
        best = decode_cost(pl, p.snap, p.dims, net=net).token_latency_s
        assert lb0 <= best * (1 + REL_TOL), (lb0, best)
        checked, certified, unchecked_lb = 1, True, INF
        for lb, iP, vec, mask, best_att, proj, a in ents:
            thr = best * (1 - REL_TOL)
            if lb >= thr:
                break
            for f in self.ffn[iP][vec]:  # sorted by tail
                base = proj + f.tail
                if a + base >= thr:
                    break
                rows, cols = np.nonzero((self.att[iP] + base < thr) & mask[:, None])
                vals = self.att[iP][rows, cols] + base
                order = np.argsort(vals, kind="stable")
                room = max(0, max_checks - checked)
                if len(order) > room:  # the rest stays unchecked: their bounds bound the optimum
                    certified = False
                    unchecked_lb = min(unchecked_lb, float(vals[order[room]]))
                    order = order[:room]
                for i in order:
                    if vals[i] >= best * (1 - REL_TOL):
                        break
                    q = self.placement(iP, int(rows[i]), int(cols[i]), f)
                    t = decode_cost(q, p.snap, p.dims, net=net).token_latency_s
                    checked += 1
                    assert vals[i] <= t * (1 + REL_TOL), (vals[i], t)
                    if t < best:
                        best, pl = t, q
        bound = best if certified else min(best, unchecked_lb)
        return Result(pl, best, bound, certified, checked)


def with_migration(S: SerialLayerSearch, r: Result, H: float, max_candidates: int = 200) -> tuple[Placement, int]:
    """Best ``latency + migration delay / H`` from ``snapshot.current`` among realisations of the
    structures with the smallest latency bounds (heuristic, see the module docstring). Structures
    whose latency bound alone reaches the best objective so far are skipped (migration >= 0).
    Returns (placement, evaluations)."""
    from testbed.partition.exact.decode import objective
    from testbed.partition.ra.choice import _usable

    p, cur = S.prob, S.prob.snap.current
    net = Net(p.snap)
    best, best_obj = r.placement, objective(p, r.placement, H, net)
    if _usable(p, cur):
        best_obj = min(best_obj, objective(p, cur, H, net))  # choose_plan keeps it if better
    vals, keys = [], []
    for lb, iP, vec, mask, best_att, proj, a in S.entries():
        if lb >= best_obj:
            break
        tot = best_att + proj + S.ffn[iP][vec][0].tail
        rows = np.nonzero(mask & (tot < best_obj))[0]
        vals.append(tot[rows])
        keys.extend((iP, vec, int(row)) for row in rows)
    evals = 1
    if not keys:
        return best, evals
    vals = np.concatenate(vals)
    pick = np.argsort(vals, kind="stable")[:max_candidates]
    for idx in pick:
        if vals[idx] >= best_obj:
            break
        iP, vec, row = keys[idx]
        f, perm_i = S.ffn[iP][vec][0], int(np.argmin(S.att[iP][row]))
        for near in (None, cur):
            pl = S.placement(iP, row, perm_i, f, near=near, meta=r.placement.meta)
            if not _usable(p, pl):
                continue
            obj = objective(p, pl, H, net)
            evals += 1
            if obj < best_obj:
                best, best_obj = pl, obj
    return best, evals
