"""A tiny MILP builder over HiGHS (highspy): variables, sparse rows, solve with a time limit.

``solve`` returns the incumbent and its objective; ``dual_bound`` then holds HiGHS' proven lower
bound on the optimum (equal to the objective up to ``mip_rel_gap``); it may start from a known
solution (``start``). ``solve_lp`` solves the LP relaxation and returns the rows' duals."""
from __future__ import annotations

import numpy as np

from testbed.core.errors import InfeasiblePlan

INF = float("inf")


def _new_highs(highspy):
    """A silent Highs instance. The first construction prints a banner on the C-level stdout, which
    would corrupt ``headroom plan --json``; it is sent to stderr instead (fd swap, then restored)."""
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h


class Milp:
    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.cost: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[float, float, dict[int, float]]] = []
        self.dual_bound: float | None = None

    def var(self, lb: float = 0.0, ub: float = INF, cost: float = 0.0, integer: bool = False) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(cost)
        if integer:
            self.integer.append(len(self.lb) - 1)
        return len(self.lb) - 1

    def binary(self, cost: float = 0.0) -> int:
        return self.var(0.0, 1.0, cost, integer=True)

    def row(self, lb: float, ub: float, terms: dict[int, float]) -> None:
        self.rows.append((lb, ub, {k: v for k, v in terms.items() if v != 0.0}))

    def ge(self, terms: dict[int, float], rhs: float) -> None:
        """sum(terms) >= rhs"""
        self.row(rhs, INF, terms)

    def le(self, terms: dict[int, float], rhs: float) -> None:
        self.row(-INF, rhs, terms)

    def eq(self, terms: dict[int, float], rhs: float) -> None:
        self.row(rhs, rhs, terms)

    def _load(self, highspy, integer: bool = True):
        """A silent Highs instance holding this model (integrality only when ``integer``)."""
        h = _new_highs(highspy)
        n = len(self.lb)
        inf = h.getInfinity()
        clip = lambda v: max(min(v, inf), -inf)  # noqa: E731
        h.addCols(n, np.array(self.cost), np.array([clip(v) for v in self.lb]),
                  np.array([clip(v) for v in self.ub]), 0, np.zeros(0, dtype=np.int32),
                  np.zeros(0, dtype=np.int32), np.zeros(0))
        if integer:
            for i in self.integer:
                h.changeColIntegrality(i, highspy.HighsVarType.kInteger)
        starts, idx, val = [], [], []
        for _, _, terms in self.rows:
            starts.append(len(idx))
            idx.extend(terms.keys())
            val.extend(terms.values())
        h.addRows(len(self.rows), np.array([clip(r[0]) for r in self.rows]), np.array([clip(r[1]) for r in self.rows]),
                  len(idx), np.array(starts, dtype=np.int32), np.array(idx, dtype=np.int32), np.array(val, dtype=float))
        return h

    def solve_lp(self, time_limit_s: float = 60.0, what: str = "LP") -> tuple[np.ndarray, float, np.ndarray]:
        """The LP relaxation: (solution, objective, row duals; HiGHS' sign: a binding ``le`` row
        of a minimisation has a dual <= 0)."""
        import highspy

        h = self._load(highspy, integer=False)
        h.setOptionValue("time_limit", float(time_limit_s))
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        if status != "Optimal":
            raise InfeasiblePlan(f"{what}: HiGHS finished the LP with status {status!r}")
        sol = h.getSolution()
        return np.array(sol.col_value), float(h.getInfo().objective_function_value), np.array(sol.row_dual)

    def solve(self, time_limit_s: float = 60.0, what: str = "MILP",
              max_nodes: int | None = None, start: np.ndarray | None = None,
              rel_gap: float = 1e-7, cutoff: float | None = None,
              abs_gap: float | None = None) -> tuple[np.ndarray, float]:
        """(solution, objective). ``max_nodes``: the deterministic work budget (branch-and-bound
        nodes): reaching it returns the incumbent (``node_limited``, ``gap``), the same plan on any
        machine; ``time_limit_s`` only guards (reaching it is a failure, never another plan).
        ``start``: a feasible solution HiGHS starts from (its incumbent until it finds better).
        ``cutoff``: only solutions below it are wanted (HiGHS' ``objective_bound``: branches whose
        bound reaches it are pruned, so "Optimal" then means no solution below the cutoff other
        than the one returned, whose objective may lie above it; none found: "Infeasible").
        ``abs_gap``: HiGHS' ``mip_abs_gap`` (default 1e-6 in objective units: set it when the
        objective is small). ``status`` holds HiGHS' model status, also when this raises."""
        import highspy

        h = self._load(highspy)
        h.setOptionValue("time_limit", float(time_limit_s))
        h.setOptionValue("mip_rel_gap", float(rel_gap))
        if abs_gap is not None:
            h.setOptionValue("mip_abs_gap", float(abs_gap))
        if max_nodes is not None:
            h.setOptionValue("mip_max_nodes", int(max_nodes))
        if cutoff is not None:
            h.setOptionValue("objective_bound", float(cutoff))
        if start is not None:
            sol0 = highspy.HighsSolution()
            sol0.col_value = [float(v) for v in start]
            sol0.value_valid = True
            h.setSolution(sol0)
        h.run()
        status = self.status = h.modelStatusToString(h.getModelStatus())
        sol = h.getSolution()
        bound = float(getattr(h.getInfo(), "mip_dual_bound", -INF))
        self.dual_bound = bound if np.isfinite(bound) else None
        self.node_limited = status == "Solution limit reached" and max_nodes is not None and sol.value_valid
        if (status != "Optimal" and not self.node_limited) or not sol.value_valid:
            if status == "Infeasible":
                raise InfeasiblePlan(f"{what}: no placement satisfies the memory limits (HiGHS: infeasible)")
            raise InfeasiblePlan(f"{what}: HiGHS finished with status {status!r} within {time_limit_s} s")
        info = h.getInfo()
        obj = float(info.objective_function_value)
        bound = float(getattr(info, "mip_dual_bound", obj))
        self.dual_bound = min(obj, bound) if np.isfinite(bound) else obj
        self.gap = float(info.mip_gap) if self.node_limited else 0.0
        return np.array(sol.col_value), obj
