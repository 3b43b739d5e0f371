"""Exact optimum of the SERIALISED ``decode`` model over SEVERAL layers at token 0 (no current
placement): a branch and bound over which devices serve as layer outputs, with Lagrangian bounds
from column generation and, per node, a MILP (HiGHS) over the options its bound leaves.

Why it decomposes (``cost.latency``): ``decode_cost`` is the sum over layers of each layer's cost
computed from a start at 0 given its input device (``_layer_delta``: every message a layer sends
is awaited before its output exists, so every uplink is free again when the next layer starts),
plus the final send to the source and the LM head. Within a layer, by the proj's finish every
uplink is free too (``exact.serial``), so

    layer(A) = att(A, P, n, order) + proj(P) + ffn(P, c, shard order)

with ``A`` the layer's input device (the source, or the previous layer's aggregator), ``P`` the
proj device, ``n`` the head groups per device, ``order`` the ``x`` send order to the head devices,
``c`` the FFN chunks per device (``K`` equal chunks, one contiguous shard per device) and the shard
order (aggregator first: the layer's output device). What couples the layers: layer ``l + 1``'s
input is layer ``l``'s aggregator, and each device's memory holds its blocks of ALL layers (heads
at the memory horizon, proj, FFN shards). No migration term (token 0), so nothing else does.

The plan space ``S`` is ``exact.serial``'s, per layer: any head counts and send order, any proj,
the FFN cut at the ``K`` chunk boundaries (``K`` must divide ``ffn_dim``). Within one memory
vector only the fastest order matters, so an ATTENTION OPTION is (``A``, ``P``, ``n``) at its best
send order and an FFN OPTION (``P``, ``c``, aggregator) at its best shard order
(``exact.options``: their costs are LOWER BOUNDS of ``decode_cost``, exact without near-ties).

The search:
1. Column generation on the chain's LP (``master``: one attention and one FFN option per layer
   position, chained, memory rows) from RA's plan; pricing is exact over every option (per
   (input, proj) group the best priced head-count row, per (proj, aggregator) the best priced FFN
   option). Its duals price memory (``lam``) in a LAGRANGIAN bound (``priced``): the least priced
   chain over the L layers (a shortest path with per-layer minima over ALL options, their
   attention costs floored by ``attention_floor``) + sum(mu) - lam . budget, a lower bound on every
   plan that fits, for any prices >= 0.
2. Options left (``survivors``): an option whose least priced chain through it exceeds the
   incumbent ``U`` is in no plan faster than ``U``.
3. Those options as a MILP without layer positions (``count_milp``: layers are identical, so a
   plan is a multiset of options walked from the source; per option a count, flow balance per
   device and per proj, memory rows), solved by HiGHS to ``MIP_REL_GAP`` (and no absolute gap)
   below the cutoff ``U``, with connectivity rows added while its solution is not one chain
   (``walk``: an Euler walk from the source gives the layers' order). Its optimum is the node's:
   the best plan found updates ``U``, and the node is CLOSED (nothing in it below ``U``).
4. The LP relaxes memory across a convex mix of chains each staying on one fast device, which a
   single chain cannot do (it must hop); when too many options are left (> ``max_options``) the
   node BRANCHES on a device ``v`` (``Node``): ``v`` is some layer's output, so some layer brings
   its data into ``v`` from elsewhere (a row >= 1, priced by ``mu``), or ``v`` is no layer's output.
   Every plan lies in exactly one child; each child's bound only grows.
The result is CERTIFIED when every node is closed: no plan of ``S`` is faster than the plan found
by more than ``REL_TOL`` + ``MIP_REL_GAP``. A node left open (its MILP stopped at ``max_nodes`` or
the guard, no device left to branch on, ``max_tree`` nodes) keeps its bound: the result's lower
bound is the least of them (``latency_gap`` in ``optimal``), and ``chain_stop`` says why.

Budgets are work counts (``max_rounds`` of column generation per node, ``max_options`` options per
node MILP, ``max_nodes`` branch-and-bound nodes per MILP, ``max_tree`` search nodes); the time
limit only guards (nodes not reached stay open).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import FfnShard, LayerPlacement, Placement
from testbed.partition.common import Problem
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import decode_cost
from testbed.partition.exact.milp import Milp
from testbed.partition.exact.options import LayerTables, best_orders, ffn_options, head_rows

INF = float("inf")
REL_TOL = 1e-9  # relative slack for float noise between the tables and decode_cost
MIP_REL_GAP = 1e-9  # the MILPs' optimality: relative gap, and no absolute one (HiGHS' default
MIP_ABS_GAP = 0.0  # 1e-6 would stop 0.3 us above the optimum of a 17 ms objective)
OBJ_SCALE = 1e3  # the MILPs' objective in milliseconds (HiGHS' tolerances are absolute)


# --------------------------------------------------------------------------------------- bounds
@dataclass
class ChainBounds:
    """Shortest paths over the chain of layers for one per-layer table ``layer[A, r]`` (least
    cost of a layer from input A to output on r): ``fwd[l][A]`` the least cost until layer
    ``l``'s input is on A (layer 0's input is the source), ``bwd[l][A]`` the least cost from
    layer ``l``'s input on A to the end (``bwd[L]``: the final send and the LM head)."""

    fwd: np.ndarray  # (L + 1, n_all)
    bwd: np.ndarray  # (L + 1, n_all)
    total: float  # the least cost of the whole chain (from the source)


def chain_bounds(layer: np.ndarray, src: int, final: np.ndarray, L: int) -> ChainBounds:
    n_all = layer.shape[0]
    fwd = np.full((L + 1, n_all), INF)
    fwd[0, src] = 0.0
    for l in range(L):
        fwd[l + 1] = (fwd[l][:, None] + layer).min(axis=0)
    bwd = np.full((L + 1, n_all), INF)
    bwd[L] = final
    for l in range(L - 1, -1, -1):
        bwd[l] = (layer + bwd[l + 1][None, :]).min(axis=1)
    return ChainBounds(fwd, bwd, float(bwd[0, src]))


def layer_table(att: np.ndarray, ffn: np.ndarray) -> np.ndarray:
    """``att[A, iP]`` (input A to the proj's finish) and ``ffn[iP, r]`` (to the output on r):
    the least cost of one layer from A to r over the proj's position."""
    return (att[:, :, None] + ffn[None, :, :]).min(axis=1)


# --------------------------------------------------------------------------------------- search
@dataclass
class ChainResult:
    placement: Placement
    latency_s: float  # decode_cost of the placement
    lower_bound_s: float  # no plan of the space is faster than this
    certified: bool
    meta: dict


@dataclass(frozen=True)
class Column:
    """A master column: layer l, and either an attention option (A, iP, head-count row) or an
    FFN option (index ``f``)."""

    l: int
    A: int = -1
    iP: int = -1
    row: int = -1
    f: int = -1


@dataclass
class MilpOutcome:
    """A node MILP's answer: its best solution (None: none below the cutoff or none found), a
    proven lower bound on its solutions (capped at the cutoff), whether its search finished."""

    cols: list | None
    bound: float
    complete: bool


@dataclass(frozen=True)
class Node:
    """A branch of the search over which devices serve as some layer's output (aggregator):
    ``entered`` devices are, so some layer brings its output there from another device (the chain
    starts on the source, so the first layer ending on one of them comes from elsewhere);
    ``unused`` devices are no layer's output. Every plan lies in exactly one leaf."""

    entered: frozenset = frozenset()
    unused: frozenset = frozenset()


class ChainSearch:
    """The search of the module docstring for one problem: ``solve()`` -> ``ChainResult``."""

    def __init__(self, prob: Problem, K: int):
        self.prob, self.K, self.L = prob, K, prob.dims.n_layers
        T = self.T = LayerTables(prob, K)
        self.n_all = len(prob.names)
        self.inputs = [T.src] + [v for v in T.V if v != T.src]
        self.rows = {iP: head_rows(T, iP) for iP in range(T.m)}
        self.floor = {(A, iP): T.attention_floor(A, iP, self.rows[iP])
                      for A in self.inputs for iP in range(T.m)}
        self.exact: dict = {}  # (A, iP) -> {row: (att, order)}
        fo = self.fo = ffn_options(T)
        self.f_P = np.array(fo.P, dtype=int)
        self.f_agg = np.array([T.V[s[0]] for s in fo.seq], dtype=int)
        self.f_cost = np.array(fo.cost)
        self.f_mem = np.array([[T.ffn_b[c] for c in cs] for cs in fo.chunks], dtype=float).reshape(-1, T.m)
        self.evaluated = 0  # attention options evaluated over their send orders

    # -------------------------------------------------------------- option costs
    def att_exact(self, A: int, iP: int, rows: np.ndarray) -> np.ndarray:
        """Attention phase (min over send orders) of head-count rows ``rows`` of (A, iP), cached."""
        memo = self.exact.setdefault((A, iP), {})
        todo = np.array([r for r in dict.fromkeys(int(r) for r in rows) if r not in memo], dtype=int)
        if len(todo):
            vals, orders = best_orders(self.T, A, iP, self.rows[iP][todo])
            self.evaluated += len(todo)
            for r, v, o in zip(todo, vals, orders):
                memo[int(r)] = (float(v), o)
        return np.array([memo[int(r)][0] for r in rows])

    def att_mem(self, iP: int, rows: np.ndarray) -> np.ndarray:
        T = self.T
        mem = self.rows[iP][rows].astype(float) * T.head_b
        mem[:, iP] += T.proj_b
        return mem

    # -------------------------------------------------------------- Lagrangian bound
    def priced(self, lam: np.ndarray, mu: dict | None = None, node: Node = Node()):
        """Memory priced at ``lam`` (seconds per byte, per position in V) and each ``entered``
        device's row at ``mu`` (>= 0): per (A, iP) the least attention floor + proj + priced
        bytes and its row, per (iP, r) the least priced FFN option (none into ``unused``
        devices), the chain's bounds, and ``value`` = the chain's least priced cost + sum(mu) -
        lam . budget, a lower bound on every plan of the node that fits."""
        T, mu = self.T, mu or {}
        att = np.full((self.n_all, T.m), INF)
        arg = {}
        for iP in range(T.m):
            hm = self.rows[iP] @ (lam * T.head_b) + T.proj_t[iP] + lam[iP] * T.proj_b
            for A in self.inputs:
                v = self.floor[A, iP] + hm
                r = int(np.argmin(v))
                att[A, iP], arg[A, iP] = v[r] + self.att_adjust(A, iP, mu, node), r
        fp = self.f_cost + self.f_mem @ lam + self.ffn_adjust(mu, node)
        ffn = np.full((T.m, self.n_all), INF)
        np.minimum.at(ffn, (self.f_P, self.f_agg), fp)
        cb = chain_bounds(layer_table(att, ffn), T.src, T.final, self.L)
        return att, arg, ffn, fp, cb, cb.total + sum(mu.values()) - float(lam @ T.budget)

    def att_adjust(self, A: int, iP: int, mu: dict, node: Node) -> float:
        """The attention option's share of the node's rows: -mu[v] when it enters an ``entered``
        device v (the proj on v, the input elsewhere), +inf from an ``unused`` device."""
        v = self.T.V[iP]
        if A in node.unused:
            return INF
        return -mu.get(v, 0.0) if A != v else 0.0

    def ffn_adjust(self, mu: dict, node: Node) -> np.ndarray:
        """Per FFN option: -mu[r] when it enters an ``entered`` aggregator r (the proj elsewhere),
        +inf into an ``unused`` one."""
        out = np.zeros(len(self.f_P))
        PV = np.array(self.T.V)[self.f_P]
        for r, v in mu.items():
            out[(self.f_agg == r) & (PV != r)] -= v
        for r in node.unused:
            out[self.f_agg == r] = INF
        return out

    def enters(self, c: Column) -> int | None:
        """The device a column brings a layer's data into from elsewhere, if any (attention: the
        proj's, from the input; FFN: the aggregator, from the proj)."""
        if c.f < 0:
            v = self.T.V[c.iP]
            return v if c.A != v else None
        r = int(self.f_agg[c.f])
        return r if self.T.V[self.f_P[c.f]] != r else None

    def allowed_in(self, c: Column, node: Node) -> bool:
        return (c.A not in node.unused) if c.f < 0 else (int(self.f_agg[c.f]) not in node.unused)

    def layers_with_input(self, A: int) -> list[int]:
        """Layers whose input may be on A: layer 0's is the source, the others' an aggregator."""
        return ([0] if A == self.T.src else []) + (list(range(1, self.L)) if A in self.T.V else [])

    # -------------------------------------------------------------- plans <-> columns
    def columns_of(self, pl: Placement) -> list[Column] | None:
        """The columns of a plan of the space (None when it is not in it: a block off the allowed
        devices, a shard not made of whole chunks, head counts beyond the caps)."""
        T, index = self.T, self.prob.index
        pos = {j: i for i, j in enumerate(T.V)}
        if not hasattr(self, "_row_index"):
            self._row_index = {iP: {tuple(r): k for k, r in enumerate(self.rows[iP])} for iP in range(T.m)}
            self._ffn_index = {(P, c, s[0]): f for f, (P, c, s) in
                               enumerate(zip(self.fo.P, self.fo.chunks, self.fo.seq))}
        out, A = [], T.src
        for l, lp in enumerate(pl.layers):
            n, c = [0] * T.m, [0] * T.m
            try:
                iP = pos[index[lp.proj]]
                for dev in lp.heads:
                    n[pos[index[dev]]] += 1
                for s in lp.ffn:
                    w = s.col_end - s.col_start
                    if w % T.width:
                        return None
                    c[pos[index[s.device]]] += w // T.width
                agg = pos[index[lp.ffn[0].device]]
            except KeyError:
                return None
            row = self._row_index[iP].get(tuple(n))
            f = self._ffn_index.get((iP, tuple(c), agg))
            if row is None or f is None:
                return None
            out += [Column(l, A=A, iP=iP, row=row), Column(l, f=f)]
            A = T.V[agg]
        return out

    def placement(self, cols: list[Column], meta: dict | None = None) -> Placement:
        """Realise one attention and one FFN column per layer (send orders from the tables)."""
        T, names = self.T, self.prob.names
        bounds = B.ffn_chunk_bounds(self.prob.dims.ffn_dim, self.K)
        att = {c.l: c for c in cols if c.f < 0}
        ffn = {c.l: c for c in cols if c.f >= 0}
        layers = []
        for l in range(self.L):
            a, f = att[l], ffn[l].f
            self.att_exact(a.A, a.iP, np.array([a.row]))
            order = self.exact[a.A, a.iP][a.row][1]
            n = self.rows[a.iP][a.row]
            heads = [names[T.V[a.iP]]] * int(n[a.iP])
            for i in order:
                heads += [names[T.V[i]]] * int(n[i])
            shards, p = [], 0
            for i in self.fo.seq[f]:
                k = self.fo.chunks[f][i]
                shards.append(FfnShard(names[T.V[i]], bounds[p][0], bounds[p + k - 1][1]))
                p += k
            layers.append(LayerPlacement(tuple(heads), names[T.V[a.iP]], tuple(shards)))
        return Placement(self.prob.snap.source, tuple(layers), meta=dict(meta or {}))

    def latency(self, pl: Placement) -> float:
        return decode_cost(pl, self.prob.snap, self.prob.dims).token_latency_s

    # -------------------------------------------------------------- the master problem
    def col_cost(self, c: Column) -> float:
        T = self.T
        if c.f < 0:
            return float(self.att_exact(c.A, c.iP, np.array([c.row]))[0] + T.proj_t[c.iP])
        return float(self.f_cost[c.f] + (T.final[self.f_agg[c.f]] if c.l == self.L - 1 else 0.0))

    def col_mem(self, c: Column) -> np.ndarray:
        return self.att_mem(c.iP, np.array([c.row]))[0] if c.f < 0 else self.f_mem[c.f]

    def master(self, cols: list[Column], node: Node = Node()):
        """The column generation's LP: one attention and one FFN column per layer, chained (layer
        l + 1's input is layer l's aggregator, the proj of both columns of a layer is the same)
        within the memory budgets (MB rows) and the node's rows (each ``entered`` device entered
        at least once; columns out of the node are dropped), with priced slack on both so that it
        always has a solution. Returns (Milp, column variables, row index by key, columns kept)."""
        T, L, m = self.T, self.L, Milp()
        cols = [c for c in cols if self.allowed_in(c, node)]
        xs = [m.binary(OBJ_SCALE * self.col_cost(c)) for c in cols]
        keys = [("in", 0, T.src)] + [("in", l, A) for l in range(1, L) for A in T.V] + \
               [("P", l, iP) for l in range(L) for iP in range(T.m)] + [("mem", i) for i in range(T.m)] + \
               [("enter", v) for v in sorted(node.entered)]
        terms = {k: {} for k in keys}
        for x, c in zip(xs, cols):
            v = self.enters(c)
            if v in node.entered:
                terms["enter", v][x] = 1.0
            mem = self.col_mem(c)
            if c.f < 0:
                terms["in", c.l, c.A][x] = 1.0
                terms["P", c.l, c.iP][x] = 1.0
            else:
                terms["P", c.l, self.f_P[c.f]][x] = -1.0
                if c.l + 1 < L:
                    terms["in", c.l + 1, self.f_agg[c.f]][x] = -1.0
            for i in np.nonzero(mem)[0]:
                terms["mem", i][x] = mem[i] / 1e6
        for i in range(T.m):  # 10 s per MB over, per entry missing: never in an optimum that fits
            terms["mem", i][m.var(0, cost=OBJ_SCALE * 10.0)] = -1.0
        for v in node.entered:
            terms["enter", v][m.var(0, cost=OBJ_SCALE * 10.0)] = 1.0
        row_of = {}
        for k in keys:
            row_of[k] = len(m.rows)
            if k[0] == "mem":
                m.le(terms[k], T.budget[k[1]] / 1e6)
            elif k[0] == "enter":
                m.ge(terms[k], 1.0)
            else:
                m.eq(terms[k], 1.0 if k == ("in", 0, T.src) else 0.0)
        return m, xs, row_of, cols

    # -------------------------------------------------------------- column generation
    def generate(self, start: list[Column], max_rounds: int, node: Node = Node(), prices: int = 4):
        """Column generation on the node's master LP from the columns ``start``: each round
        prices memory and the node's rows with the LP's duals, evaluates the Lagrangian bound
        (``priced``) and adds, per layer, the best priced attention option of each (input, proj)
        (the ``prices`` best floors, evaluated over their send orders) and the best FFN option of
        each (proj, aggregator) whose reduced cost is negative. Returns (columns, best bound, its
        prices (lam, mu), rounds, the last LP's aggregator flow per device)."""
        T, L = self.T, self.L
        path = self.path_columns(np.zeros(T.m), node)
        if path is None:  # no chain at all in the node
            return [], INF, (np.zeros(T.m), {}), 0, {}
        cols = [c for c in dict.fromkeys([*start, *path]) if self.allowed_in(c, node)]
        have = set(cols)
        best, best_prices, rounds, flow = -INF, (np.zeros(T.m), {}), 0, {}
        for rounds in range(1, max_rounds + 1):
            m, xs, row_of, cols = self.master(cols, node)
            x, obj, y = m.solve_lp(what="chain master LP")
            obj, y = obj / OBJ_SCALE, y / OBJ_SCALE  # seconds
            lam_raw = -np.array([y[row_of["mem", i]] for i in range(T.m)]) / 1e6
            mu_raw = {v: float(y[row_of["enter", v]]) for v in node.entered}
            lam = np.maximum(lam_raw, 0.0)
            mu = {v: max(0.0, w) for v, w in mu_raw.items()}
            val = self.priced(lam, mu, node)[-1]
            if val > best:
                best, best_prices = val, (lam, mu)
            flow = {}
            for c, xv in zip(cols, xs):
                if c.f >= 0 and x[xv] > 1e-9:
                    flow[int(self.f_agg[c.f])] = flow.get(int(self.f_agg[c.f]), 0.0) + x[xv]
            new = []
            tol = 1e-12 + 1e-9 * abs(obj)
            for iP in range(T.m):
                hm = self.rows[iP] @ (lam_raw * T.head_b) + T.proj_t[iP] + lam_raw[iP] * T.proj_b
                for A in self.inputs:
                    adj = self.att_adjust(A, iP, mu_raw, node)
                    if not np.isfinite(adj):
                        continue
                    v = self.floor[A, iP] + hm
                    cand = np.argpartition(v, min(prices, len(v) - 1))[:prices] if len(v) > prices else np.arange(len(v))
                    ex = self.att_exact(A, iP, cand) + hm[cand]
                    k = int(np.argmin(ex))
                    r, pe = int(cand[k]), float(ex[k]) + adj
                    for l in self.layers_with_input(A):
                        rc = pe - y[row_of["in", l, A]] - y[row_of["P", l, iP]]
                        c = Column(l, A=A, iP=iP, row=r)
                        if rc < -tol and c not in have:
                            new.append(c)
            fp = self.f_cost + self.f_mem @ lam_raw + self.ffn_adjust(mu_raw, node)
            for l in range(L):
                extra = np.array([T.final[a] if l == L - 1 else y[row_of["in", l + 1, a]] for a in self.f_agg])
                rc = fp + extra + np.array([y[row_of["P", l, p]] for p in self.f_P])
                order = np.lexsort((rc, self.f_agg, self.f_P))
                seen = set()
                for f in order:
                    g = (int(self.f_P[f]), int(self.f_agg[f]))
                    if g in seen:
                        continue
                    seen.add(g)
                    c = Column(l, f=int(f))
                    if rc[f] < -tol and c not in have:
                        new.append(c)
            if not new:
                break
            cols += new
            have.update(new)
        return cols, best, best_prices, rounds, flow

    # -------------------------------------------------------------- the chain search
    def path_columns(self, lam: np.ndarray, node: Node = Node()) -> list[Column] | None:
        """The columns of the node's least priced chain at ``lam`` (memory ignored beyond its
        price): a chain for the column generation to start from; None when the node has none."""
        T = self.T
        att, arg, ffn, fp, cb, _ = self.priced(lam, {}, node)
        if not np.isfinite(cb.total):
            return None
        cols, A = [], T.src
        for l in range(self.L):
            tot = att[A][:, None] + ffn + cb.bwd[l + 1][None, :]
            iP, r = np.unravel_index(int(np.argmin(tot)), tot.shape)
            f = np.nonzero((self.f_P == iP) & (self.f_agg == r))[0]
            f = int(f[np.argmin(fp[f])])
            cols += [Column(l, A=A, iP=int(iP), row=arg[A, iP]), Column(l, f=f)]
            A = int(r)
        return cols

    def survivors(self, prices, node: Node, U: float, max_options: int) -> list[Column] | None:
        """Every column of the node that some plan of latency <= ``U`` may use, by the
        Lagrangian bound at ``prices`` (the chain's least priced cost through the column + sum(mu)
        - lam . budget > U: no such plan uses it); None when more than ``max_options`` attention
        options pass the floors."""
        T, L = self.T, self.L
        lam, mu = prices
        att, arg, ffn, fp, cb, _ = self.priced(lam, mu, node)
        U = U * (1 + REL_TOL) + float(lam @ T.budget) - sum(mu.values())
        after = [(ffn + cb.bwd[l + 1][None, :]).min(axis=1) for l in range(L)]  # per iP
        before = [(cb.fwd[l][:, None] + att).min(axis=0) for l in range(L)]  # per iP: input to proj
        cands = []
        for iP in range(T.m):
            hm = self.rows[iP] @ (lam * T.head_b) + T.proj_t[iP] + lam[iP] * T.proj_b
            for A in self.inputs:
                ls = self.layers_with_input(A)
                adj = self.att_adjust(A, iP, mu, node)
                if not ls or not np.isfinite(adj):
                    continue
                thr = np.array([U - cb.fwd[l, A] - after[l][iP] for l in ls])
                v = self.floor[A, iP] + hm + adj
                rows = np.nonzero(v <= thr.max())[0]
                if len(rows):
                    cands.append((iP, A, ls, thr, rows, hm + adj))
        if sum(len(c[4]) for c in cands) > max_options:
            return None
        out = []
        for iP, A, ls, thr, rows, hm in cands:
            v = self.att_exact(A, iP, rows) + hm[rows]
            for l, t in zip(ls, thr):
                out += [Column(l, A=A, iP=iP, row=int(r)) for r in rows[v <= t]]
        for l in range(L):
            ok = before[l][self.f_P] + fp + cb.bwd[l + 1][self.f_agg] <= U
            out += [Column(l, f=int(f)) for f in np.nonzero(ok)[0]]
        return out

    @staticmethod
    def _failed(m: Milp, cutoff: float) -> "MilpOutcome":
        """A node MILP without a solution: none below the cutoff (closed), or stopped (open)."""
        if m.status == "Infeasible":
            return MilpOutcome(None, cutoff, True)
        bound = m.dual_bound / OBJ_SCALE if m.dual_bound is not None else -INF
        return MilpOutcome(None, min(bound, cutoff), False)

    # -------------------------------------------------------------- the node MILP without positions
    def count_milp(self, cols: list[Column], node: Node, cuts: list[frozenset]):
        """The node's problem over the options of ``cols`` as COUNTS (layers are identical, so a
        plan is a multiset of options walked as a chain): per option how many layers use it, the
        chain's end device, flow balance per device (out - in = 1 at the source, -1 at the end)
        and per proj (attention in = FFN out), the memory rows, the node's rows, and a
        connectivity row per set of ``cuts`` (a set the walk must enter from outside when any of
        its edges is used). Returns (Milp, [(key, var)] per option, end vars)."""
        T, L, m = self.T, self.L, Milp()
        att = sorted({(c.A, c.iP, c.row) for c in cols if c.f < 0 and self.allowed_in(c, node)})
        ffn = sorted({c.f for c in cols if c.f >= 0 and self.allowed_in(c, node)})
        opts = [(("a",) + k, m.var(0, L, OBJ_SCALE * self.col_cost(Column(1, A=k[0], iP=k[1], row=k[2])),
                                   integer=True)) for k in att] + \
               [(("f", f), m.var(0, L, OBJ_SCALE * float(self.f_cost[f]), integer=True)) for f in ffn]
        ends = {r: m.binary(OBJ_SCALE * float(T.final[r])) for r in T.V if r not in node.unused}
        bal = {v: {} for v in self.inputs}
        proj = {iP: {} for iP in range(T.m)}
        mem = {i: {} for i in range(T.m)}
        enter = {v: {} for v in node.entered}
        total = {}
        edges = []  # (tail node, head node, var)
        for key, x in opts:
            if key[0] == "a":
                _, A, iP, row = key
                bal[A][x] = bal[A].get(x, 0) + 1.0
                proj[iP][x] = 1.0
                total[x] = 1.0
                mv = self.att_mem(iP, np.array([row]))[0]
                c = Column(1, A=A, iP=iP, row=row)
                edges.append((("d", A), ("p", iP), x))
            else:
                f = key[1]
                r = int(self.f_agg[f])
                bal[r][x] = bal[r].get(x, 0) - 1.0
                proj[int(self.f_P[f])][x] = -1.0
                mv = self.f_mem[f]
                c = Column(1, f=f)
                edges.append((("p", int(self.f_P[f])), ("d", r), x))
            v = self.enters(c)
            if v in enter:
                enter[v][x] = 1.0
            for i in np.nonzero(mv)[0]:
                mem[i][x] = mv[i] / 1e6
        for v, terms in bal.items():
            if v in ends:
                terms[ends[v]] = 1.0
            m.eq(terms, 1.0 if v == T.src else 0.0)
        for terms in proj.values():
            m.eq(terms, 0.0)
        m.eq(total, float(L))
        m.eq(dict.fromkeys(ends.values(), 1.0), 1.0)
        for i, terms in mem.items():
            m.le(terms, T.budget[i] / 1e6)
        for terms in enter.values():
            m.ge(terms, 1.0)
        for S in cuts:  # 2L x (edges entering S) >= edges leaving nodes of S
            terms = {}
            for a, b, x in edges:
                if b in S and a not in S:
                    terms[x] = terms.get(x, 0.0) + 2.0 * L
                if a in S:
                    terms[x] = terms.get(x, 0.0) - 1.0
            m.ge(terms, 0.0)
        return m, opts, ends, edges

    def walk(self, counts: dict, end: int) -> list[Column] | frozenset:
        """The chain of layers walking every counted option once from the source (Hierholzer on
        the multigraph device -> proj -> device), as positional columns; or, when some used
        nodes cannot be reached from the source, the set of those nodes (a cut)."""
        T = self.T
        out: dict = {}
        for key, n in counts.items():
            for _ in range(n):
                if key[0] == "a":
                    out.setdefault(("d", key[1]), []).append((("p", key[2]), key))
                else:
                    out.setdefault(("p", int(self.f_P[key[1]])), []).append((("d", int(self.f_agg[key[1]])), key))
        seen, todo = {("d", T.src)}, [("d", T.src)]
        while todo:
            a = todo.pop()
            for b, _ in out.get(a, []):
                if b not in seen:
                    seen.add(b)
                    todo.append(b)
        lost = frozenset(a for a in out if a not in seen)
        if lost:
            return lost
        stack, path = [(("d", T.src), None)], []
        while stack:
            a, key = stack[-1]
            if out.get(a):
                b, k = out[a].pop()
                stack.append((b, k))
            else:
                stack.pop()
                if key is not None:
                    path.append(key)
        path.reverse()
        cols = []
        for l in range(self.L):
            a, f = path[2 * l], path[2 * l + 1]
            cols += [Column(l, A=a[1], iP=a[2], row=a[3]), Column(l, f=f[1])]
        return cols

    def best_count(self, cols: list[Column], node: Node, start: list[Column] | None, max_nodes: int,
                   time_limit, cutoff: float, max_cuts: int = 30) -> MilpOutcome:
        """``count_milp`` solved with connectivity cuts added until its solution is one chain
        (at most ``max_cuts`` rounds, else incomplete), wanting only solutions below ``cutoff``."""
        cuts: list[frozenset] = []
        for _ in range(max_cuts):
            m, opts, ends, edges = self.count_milp(cols, node, cuts)
            x0 = None
            if start is not None:
                want: dict = {}
                for c in start:
                    key = ("a", c.A, c.iP, c.row) if c.f < 0 else ("f", c.f)
                    want[key] = want.get(key, 0) + 1
                index = {k: x for k, x in opts}
                end = int(self.f_agg[[c for c in start if c.f >= 0 and c.l == self.L - 1][0].f])
                if all(k in index for k in want) and end in ends:
                    x0 = np.zeros(len(m.lb))
                    for k, n in want.items():
                        x0[index[k]] = n
                    x0[ends[end]] = 1.0
            try:
                x, _ = m.solve(time_limit(), "chain count MILP", max_nodes, start=x0, rel_gap=MIP_REL_GAP,
                               cutoff=OBJ_SCALE * cutoff if np.isfinite(cutoff) else None, abs_gap=MIP_ABS_GAP)
            except InfeasiblePlan:
                return self._failed(m, cutoff)
            counts = {k: int(round(x[v])) for k, v in opts if x[v] > 0.5}
            end = next(r for r, v in ends.items() if x[v] > 0.5)
            got = self.walk(counts, end)
            if isinstance(got, frozenset):
                cuts.append(got)
                continue
            return MilpOutcome(got, min(m.dual_bound / OBJ_SCALE, cutoff), not m.node_limited)
        return MilpOutcome(None, -INF, False)

    def solve(self, incumbent: Placement | None = None, max_rounds: int = 50, max_options: int = 8_000,
              max_nodes: int = 50_000, max_tree: int = 64, time_limit_s: float = 60.0) -> ChainResult:
        """The search of the module docstring, from ``incumbent`` (RA's plan: its latency is the
        first ``U`` when it lies in the space). Branches over ``Node``s (which devices are
        aggregators) while a node's options exceed ``max_options``, up to ``max_tree`` nodes."""
        import heapq
        import time

        T = self.T
        deadline = time.monotonic() + time_limit_s

        def left() -> float:
            """The guard's time left for the next MILP (at least a second: the guard is not a budget)."""
            return max(1.0, deadline - time.monotonic())

        best = {"pl": None, "t": INF, "cols": None}

        def offer(cols: list[Column] | None) -> float:
            """Keep the plan of ``cols`` if it is the best so far; returns its latency."""
            if cols is None:
                return INF
            pl = self.placement(cols)
            t = self.latency(pl)
            if t < best["t"] and self.fits(pl):
                best.update(pl=pl, t=t, cols=cols)
            return t

        if incumbent is not None and self.fits(incumbent):
            inc_cols = self.columns_of(incumbent)
            if inc_cols is not None:
                best.update(pl=incumbent, t=self.latency(incumbent), cols=inc_cols)
        start = best["cols"] or []
        meta = {"chain_tree_nodes": 0, "chain_rounds": 0}
        heap = [(-INF, 0, Node(), start)]
        open_bounds, seq = [], 1  # (bound, why) of the nodes left open, for the lower bound
        while heap:
            parent_bound, _, node, start = heapq.heappop(heap)
            if parent_bound >= best["t"] * (1 - REL_TOL):
                continue
            if meta["chain_tree_nodes"] >= max_tree or time.monotonic() > deadline:
                open_bounds.append((parent_bound, "max_tree" if meta["chain_tree_nodes"] >= max_tree else "guard"))
                continue
            meta["chain_tree_nodes"] += 1
            cols, bound, prices, rounds, flow = self.generate(start, max_rounds, node)
            meta["chain_rounds"] += rounds
            if node == Node():
                meta["lagrangian_bound_s"] = bound
            bound = max(bound, parent_bound)
            if bound >= best["t"] * (1 - REL_TOL):
                continue
            if node == Node():  # price and branch: a first incumbent from the generated columns
                offer(self.best_count(cols, node, best["cols"], min(max_nodes, 5000), left, INF).cols)
            free = [v for v in T.V if v != T.src and v not in node.entered and v not in node.unused]
            keep = self.survivors(prices, node, best["t"], max_options)
            if keep is not None:
                got = self.best_count(keep, node, best["cols"], max_nodes, left, cutoff=best["t"] * (1 + REL_TOL))
                t = offer(got.cols)
                # open when the MILP stopped early (its bound), or when the tables' bound of its
                # plan is below the plan's decode_cost (a near-tie): another plan of the node may
                # lie between the two
                if not got.complete:
                    open_bounds.append((max(bound, got.bound), "milp stopped (max_nodes or the guard)"))
                elif got.cols and t > sum(map(self.col_cost, got.cols)) * (1 + REL_TOL):
                    open_bounds.append((max(bound, got.bound), "near-tie"))
                continue
            if not free:
                open_bounds.append((bound, f"a leaf (nothing left to branch on) with more than {max_options} "
                                           f"options"))
                continue
            v = max(free, key=lambda d: flow.get(d, 0.0))  # the most used aggregator of the LP
            for child in (Node(node.entered | {v}, node.unused), Node(node.entered, node.unused | {v})):
                heapq.heappush(heap, (bound, seq, child, cols))
                seq += 1
        if best["pl"] is None:
            raise InfeasiblePlan("chain search: no plan found that fits the memory budgets")
        open_bounds = [(b, why) for b, why in open_bounds if b < best["t"] * (1 - REL_TOL - MIP_REL_GAP)]
        lower = min([best["t"], *(b for b, _ in open_bounds)])
        certified = not open_bounds
        if not certified:
            why = sorted({w for _, w in open_bounds})
            meta["chain_stop"] = f"{len(open_bounds)} node(s) left open: {', '.join(why)}"
            meta["chain_guard_reached"] = any("guard" in w for w in why)
        meta["attention_options_evaluated"] = self.evaluated
        return ChainResult(best["pl"], best["t"], lower, certified, meta)

    def fits(self, pl: Placement) -> bool:
        from testbed.partition.cost.latency import placement_memory

        mem = placement_memory(pl, self.prob.snap, self.prob.dims, self.prob.T_mem)
        return all(mem.get(d.name, 0) <= d.mem_budget_bytes for d in self.prob.snap.devices)
