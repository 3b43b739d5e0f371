"""RA step 6: level memory by heads (issue 19) — lower the largest device's peak at (almost) no latency.

The memory policy RA states (``ra.planner``'s docstring): first minimise latency (+ migration delay
/ H) subject to every device having room for the KV growth until the memory horizon (the next
decisions, or the end of the run when the snapshot knows ``tokens_remaining``); then, among plans
whose objective is within ``tol`` (default 2 %) of that best one, minimise the largest device's
PEAK — its blocks' bytes at the end of the run when known, else at the memory horizon.

``level`` does the second part greedily, at the granularity only a head-level planner has: while
some move lowers the device with the largest peak, it moves ONE head group with its KV cache, or
one FFN chunk (``ffn_dim / ffn_chunks`` columns), off that device to a device with headroom, never
a whole layer. Each candidate is evaluated with the full cost model (``ra.choice._objective``:
latency + migration delay from the current placement / H, so on a re-decision a move pays its
migration within the horizon or is not made) and the move with the smallest objective increase
per byte of peak removed is applied, as long as the plan's objective AND its predicted latency
both stay within ``(1 + tol)`` of those the leveling started from (the objective alone would let a
re-decision whose objective is dominated by a forced migration's stall trade up to 9 % of latency,
measured on the recorded RA instances). Destinations that keep the dataflow short come first:
a device that already holds part of the layer or sends the layer's input (no new hop), then
devices by the transfer time the block's messages would take (a head needs the layer's input and
sends its output to the projection; an FFN chunk needs ``h`` from the projection and sends its
partial to the aggregator). A destination must fit the moved block at the peak horizon and end
below the peak it relieves, so the sorted vector of peaks decreases at every move (termination);
the work is bounded by ``max_evals`` plan evaluations (no clock: deterministic).
Pure functions of a ``Problem``. Where the objective is the latency (no current placement) under
``decode``, each round runs compiled (``ra.leveling_kernel``, the same moves); the Python round
(``ra.leveling_moves``) is the reference and takes re-decisions.
"""
from __future__ import annotations

import numpy as np

from testbed.partition.common import Problem
from testbed.partition.ra import leveling_kernel
from testbed.partition.ra.choice import _block_use, _objective, plan_arrays, problem_net
from testbed.partition.ra.leveling_moves import _best_move, _candidates, _memo, _Move, peak_horizon
from testbed.partition.ra.objective import no_migration
from testbed.core.placement import FfnShard, LayerPlacement, Placement


def worker_peaks(prob: Problem, pl: Placement, until: int | None = None) -> np.ndarray:
    """Block bytes per device (index order) at ``until`` (default ``peak_horizon``), the source's
    embedding/LM head excluded."""
    return _block_use(prob, pl, peak_horizon(prob) if until is None else until)


def _leveled(prob: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(devices whose peak the policy levels, bytes each holds besides its blocks). Every device
    but the source; the source too when it may hold blocks (``allow_blocks_on_source``), with its
    embeddings and LM head counted, so the largest peak is the largest device's whole footprint
    (leveling a worker below a source that holds most of the model lowers no device that matters)."""
    from testbed.partition.cost import blocks as B

    w = np.ones(len(prob.names), dtype=bool)
    fixed = np.zeros(len(prob.names))
    if prob.snap.allow_blocks_on_source:
        fixed[prob.src] = float(B.source_bytes(prob.dims))
    else:
        w[prob.src] = False
    return w, fixed


class _Compiled:
    """The plan as ``leveling_kernel.level_round`` reads it, kept up to date move by move, and the
    problem's constants: the rounds of a plan whose objective is its latency (no current placement)
    under ``decode``."""

    def __init__(self, prob: Problem, pl: Placement, only: set[int] | None):
        arr, memo = plan_arrays(prob), _memo(prob)
        self.prob, self.memo, self.index = prob, memo, prob.index
        self.const = (*arr.walk_args, float(arr.lm_s), int(prob.src))
        self.sizes = np.array([memo.sz.x_b, memo.sz.head_out_b, memo.sz.head_b, memo.sz.ffn_col_b], dtype=float)
        L = len(pl.layers)
        self.only = np.array([only is None or l in only for l in range(L)])
        self.heads = np.array([[self.index[d] for d in lp.heads] for lp in pl.layers], dtype=np.int64)
        self.proj = np.array([self.index[lp.proj] for lp in pl.layers], dtype=np.int64)
        self.shards = [self._shards(lp) for lp in pl.layers]
        self.flat = self._flat()
        self.canon = np.array([memo.canon(lp) for lp in pl.layers], dtype=np.int64)
        n = len(prob.names)  # what level_round keeps per layer between rounds (its docstring)
        self.kept = (np.empty(L), np.empty(L), np.empty((2, L, n), dtype=np.int64), np.empty((2, L, n)),
                     np.zeros((2, L, 2), dtype=np.int64), np.zeros(L, dtype=bool))

    def _shards(self, lp: LayerPlacement) -> list:
        return [(self.index[s.device], s.col_start, s.col_end) for s in lp.ffn]

    def _flat(self) -> tuple:
        """The shards as ``level_round`` reads them: (devices, first columns, end columns, offsets)."""
        flat = [s for layer in self.shards for s in layer]
        soff = np.cumsum([0] + [len(layer) for layer in self.shards])
        return (*(np.array(col, dtype=np.int64) for col in zip(*flat)), soff)

    def round(self, pl: Placement, a: int, room: np.ndarray, chunk_cols: int, n_dest: int, cur: float,
              limit: float, lat_limit: float, budget: int):
        """``level_round`` on ``pl``: (status, evaluations, the best ``_Move`` or None, its objective)."""
        status, n, (l, kind, blk, cols, dest), obj = leveling_kernel.level_round(
            *self.const, self.heads, self.proj, *self.flat, self.canon, self.prob.allowed, a, room, chunk_cols,
            n_dest, self.only, self.sizes, float(self.prob.H), cur, limit, lat_limit, budget, *self.kept)
        if status != leveling_kernel.OK or l < 0:
            return status, n, None, obj
        sz = self.memo.sz
        if kind == 0:
            return status, n, _Move(False, 0.0, l, blk, 0, dest, sz.head_b), obj
        return status, n, _Move(False, 0.0, l, pl.layers[l].ffn[blk], cols, dest, cols * sz.ffn_col_b), obj

    def moved(self, m: _Move, lp: LayerPlacement) -> None:
        """Record move ``m``, which made layer ``m.l`` into ``lp`` (the next layer's input may have changed)."""
        self.kept[-1][m.l:m.l + 2] = False
        self.canon[m.l] = self.memo.canon(lp)
        if isinstance(m.blk, int):
            self.heads[m.l, m.blk] = m.dest
        else:
            self.shards[m.l] = self._shards(lp)
            self.flat = self._flat()


def level(prob: Problem, pl: Placement, tol: float = 0.02, chunks: int = 4, n_dest: int = 2,
          max_evals: int = 2000, ref_latency_s: float = float("inf"),
          only: set[int] | None = None, compiled: bool = True) -> tuple[Placement, dict]:
    """Lower the largest worker peak of ``pl`` within ``(1 + tol)`` x its objective and x its
    latency (or ``ref_latency_s`` when lower: the fastest plan the planner weighed) (module
    docstring), moving blocks of the layers in ``only`` (default: all). Returns (plan, what was
    done: ``moves``, ``evals``, peaks before and after). ``compiled``: rounds of a plan with no
    current placement under ``decode`` run in ``leveling_kernel`` (the same moves; False: the
    Python rounds, the reference)."""
    until = peak_horizon(prob)
    cur, lat0, _ = _objective(prob, pl, prob.H, problem_net(prob))
    limit, lat_limit = (1 + tol) * cur, (1 + tol) * min(lat0, ref_latency_s)
    used = worker_peaks(prob, pl, until)
    fit = _block_use(prob, pl, int(prob.T_mem))
    workers, fixed = _leveled(prob)
    before = float((used + fixed)[workers].max(initial=0.0))
    chunk_cols = -(-prob.dims.ffn_dim // max(1, chunks))
    fast = None
    if compiled and prob.cost_model == "decode" and no_migration(prob, len(pl.layers)):
        fast = _Compiled(prob, pl, only)
    moves = evals = 0
    while evals < max_evals:
        total = used + fixed
        a = int(np.argmax(np.where(workers, total, -np.inf)))
        # room at the peak horizon (and at the memory horizon the plan was made for), below a's peak
        room = np.minimum(prob.budget - used, prob.budget - fit)
        room = np.minimum(room, total[a] - total - 1.0)
        status = None
        if fast is not None:
            status, n, m, obj = fast.round(pl, a, room, chunk_cols, n_dest, cur, limit, lat_limit, max_evals - evals)
        if status == leveling_kernel.OK:
            evals += n
            if m is None:
                break
            lp = _memo(prob).moved_layer(pl.layers[m.l], m)
            pl, cur = Placement(pl.source, pl.layers[:m.l] + (lp,) + pl.layers[m.l + 1:], meta=pl.meta), obj
        else:  # the Python round (also where the compiled one met a NaN arrival)
            cands = _candidates(prob, pl, a, room, chunk_cols, n_dest, only)
            best, n = _best_move(prob, pl, cands, cur, limit, lat_limit, max_evals - evals)
            evals += n
            if best is None:
                break
            _, cur, m, pl = best
        if fast is not None:
            fast.moved(m, pl.layers[m.l])
        delta_fit = m.nbytes if isinstance(m.blk, FfnShard) else prob.sz.head_b
        used[a] -= m.nbytes
        used[m.dest] += m.nbytes
        fit[a] -= delta_fit
        fit[m.dest] += delta_fit
        moves += 1
    after = float((used + fixed)[workers].max(initial=0.0))
    return pl, {"leveling_moves": moves, "leveling_evals": evals,
                "leveling_peak_before_bytes": int(before), "leveling_peak_after_bytes": int(after)}


def memory_binds(prob: Problem, pl: Placement, frac: float) -> bool:
    """Whether memory binds for ``pl``: some device that may hold blocks ends above ``frac`` of its
    block budget at the peak horizon (the end of the run when known). Where it does not, a lower
    peak buys nothing the run needs, and step 6 levels only at (practically) equal latency."""
    peaks = worker_peaks(prob, pl)
    ok = prob.allowed & (prob.budget > 0)
    return bool(np.any(peaks[ok] > frac * prob.budget[ok]))


def level_plan(prob: Problem, pl: Placement, tol: float, chunks: int, max_evals: int,
               ref_latency_s: float = float("inf"), rate_hedge: float | None = None,
               only: set[int] | None = None) -> Placement:
    """``level``'s plan with what it did in ``meta`` (``leveling_*``); ``pl`` itself when nothing moved,
    or when ``rate_hedge`` is set and the leveled plan's objective with every link at ``rate_hedge`` x
    its rate (``ra.hedge``) is more than ``1 + tol`` times ``pl``'s: moves that cost nothing while the
    links hold can put heads behind slow links (step 4d's bet, made again by the back door).
    ``only``: the layers whose blocks may move (``level``)."""
    if only is not None and not only:
        return pl
    out, info = level(prob, pl, tol, chunks, max_evals=max_evals, ref_latency_s=ref_latency_s, only=only)
    if not info["leveling_moves"]:
        return pl
    if rate_hedge is not None:
        from testbed.partition.ra.hedge import slow_objective

        if slow_objective(prob, out, rate_hedge) > (1 + tol) * slow_objective(prob, pl, rate_hedge):
            return pl
    return Placement(out.source, out.layers, meta={**pl.meta, **info})