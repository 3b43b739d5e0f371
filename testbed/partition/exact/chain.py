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

import numpy as np

from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import FfnShard, LayerPlacement, Placement
from testbed.partition.common import Problem
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import decode_cost
from testbed.partition.exact.chain_base import (INF, MIP_REL_GAP, REL_TOL, ChainResult, Column, Node, chain_bounds,
                                                layer_table)
from testbed.partition.exact.chain_lp import ChainLp
from testbed.partition.exact.chain_milp import ChainMilp
from testbed.partition.exact.options import LayerTables, best_orders, ffn_options, head_rows


class ChainSearch(ChainLp, ChainMilp):
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
