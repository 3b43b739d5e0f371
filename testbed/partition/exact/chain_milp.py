"""The several-layer exact search's node MILP (``exact.chain``): a node's options as counts
(layers are identical), solved by HiGHS with connectivity cuts until its solution walks as one
chain (an Euler walk from the source gives the layer order). A mixin of ``chain.ChainSearch``."""
from __future__ import annotations

import numpy as np

from testbed.core.errors import InfeasiblePlan
from testbed.partition.exact.chain_base import INF, MIP_ABS_GAP, MIP_REL_GAP, OBJ_SCALE, Column, MilpOutcome, Node
from testbed.partition.exact.milp import Milp


class ChainMilp:
    """``ChainSearch``'s node MILP (module docstring)."""

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
