"""The several-layer exact search's LP side (``exact.chain``): the master problem over
chained columns, column generation with memory prices, the Lagrangian path bound and the
options a node keeps under it. A mixin of ``chain.ChainSearch``: it reads the tables the
search builds (``T``, ``L``, ``f_cost``, ``f_mem``, ``f_P``, ``f_agg``, the pricing methods)."""
from __future__ import annotations

import numpy as np

from testbed.partition.exact.chain_base import INF, OBJ_SCALE, REL_TOL, Column, Node
from testbed.partition.exact.milp import Milp


class ChainLp:
    """``ChainSearch``'s LP side (module docstring)."""

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
