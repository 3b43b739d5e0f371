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
Pure functions of a ``Problem``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.partition.common import Problem, sizes_for
from testbed.partition.ra.choice import _block_use, _objective, plan_arrays, plan_cost, problem_net
from testbed.core.placement import FfnShard, LayerPlacement, Placement


@dataclass(frozen=True)
class _Move:
    """One candidate: block ``blk`` (head group index, or an FfnShard) of layer ``l`` from ``a`` to ``dest``."""

    far: bool  # the destination adds a hop to the layer's dataflow
    key_s: float  # the block's messages' transfer time to/from the destination (ranking only)
    l: int
    blk: int | FfnShard
    cols: int  # FFN columns moved (0 for a head)
    dest: int
    nbytes: float  # bytes at the peak horizon


def peak_horizon(prob: Problem) -> int:
    """Context at which peaks are measured: the end of the run when known, else the memory horizon."""
    end = prob.snap.end_context_len
    return int(end) if end != float("inf") else int(prob.T_mem)


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


def _move(pl: Placement, m: _Move, dest: str) -> Placement:
    """``pl`` with move ``m`` applied (an FFN chunk is cut off the END of its shard; it joins the
    destination's shard when that starts where the chunk ends)."""
    lp = pl.layers[m.l]
    if isinstance(m.blk, int):
        lp = LayerPlacement(lp.heads[:m.blk] + (dest,) + lp.heads[m.blk + 1:], lp.proj, lp.ffn)
    else:
        s, c0 = m.blk, m.blk.col_end - m.cols
        shards = []
        for t in lp.ffn:
            if t == s:
                if c0 > s.col_start:
                    shards.append(FfnShard(s.device, s.col_start, c0))
            elif t.device == dest and t.col_start == s.col_end:
                shards.append(FfnShard(dest, c0, t.col_end))
                c0 = -1
            else:
                shards.append(t)
        if c0 >= 0:
            new = FfnShard(dest, c0, s.col_end)
            # the whole aggregator shard moved: the destination becomes the aggregator
            shards = [new] + shards if (s == lp.ffn[0] and c0 == s.col_start) else shards + [new]
        lp = LayerPlacement(lp.heads, lp.proj, tuple(shards))
    return Placement(pl.source, pl.layers[:m.l] + (lp,) + pl.layers[m.l + 1:], meta=pl.meta)


def _candidates(prob: Problem, pl: Placement, a: int, room: np.ndarray, chunk_cols: int,
                n_dest: int) -> list[_Move]:
    """Moves of one head group or one FFN chunk per layer off device ``a``, to the ``n_dest`` best
    destinations with ``room`` for it (bytes; the caller keeps every destination below ``a``'s peak)."""
    names, sz = prob.names, sizes_for(prob.dims, prob.cost_model, prob.T, peak_horizon(prob))
    name, xb = names[a], prob.sz.x_b
    out: list[_Move] = []
    for l, lp in enumerate(pl.layers):
        A = prob.index[pl.layers[l - 1].ffn[0].device] if l else prob.src
        P, agg = prob.index[lp.proj], prob.index[lp.ffn[0].device]
        near = {prob.index[d] for d in lp.heads} | {P, A} | {prob.index[s.device] for s in lp.ffn}
        blocks = []
        if name in lp.heads:
            g = max(i for i, d in enumerate(lp.heads) if d == name)
            key = prob.lat[A] + xb * prob.spb[A] + prob.lat[:, P] + prob.sz.head_out_b * prob.spb[:, P]
            blocks.append((g, 0, sz.head_b, key))
        for s in lp.ffn:
            if s.device == name:
                c = min(chunk_cols, s.col_end - s.col_start)
                key = prob.lat[P] + xb * prob.spb[P] + prob.lat[:, agg] + xb * prob.spb[:, agg]
                blocks.append((s, c, c * sz.ffn_col_b, key))
        for blk, cols, nbytes, key in blocks:
            ok = [int(j) for j in np.nonzero(prob.allowed & (room >= nbytes) & np.isfinite(key))[0] if j != a]
            ranked = sorted(ok, key=lambda j: (j not in near, float(key[j]), j))[:n_dest]
            out.extend(_Move(j not in near, float(key[j]), l, blk, cols, j, nbytes) for j in ranked)
    return out


def _signature(prob: Problem, pl: Placement, m: _Move) -> tuple:
    """What decides move ``m``'s effect on the objective: the layer, its input device, the next
    layer (its input may change), the layer's current placement (migration) and the move itself
    (the block by kind and columns, not by index: head groups of one device are interchangeable)."""
    l, cur = m.l, prob.snap.current
    blk = "h" if isinstance(m.blk, int) else (m.blk.col_start == pl.layers[l].ffn[0].col_start, m.blk, m.cols)
    return (pl.layers[l], pl.layers[l - 1].ffn[0].device if l else None,
            pl.layers[l + 1] if l + 1 < len(pl.layers) else None,
            cur.layers[l] if cur is not None and len(cur.layers) == len(pl.layers) else None, blk, m.dest)


def _best_move(prob: Problem, pl: Placement, cands: list[_Move], cur: float, limit: float, lat_limit: float,
               budget: int):
    """The candidate with the least objective added per byte among those within ``limit`` (objective)
    and ``lat_limit`` (latency), evaluating at most ``budget`` distinct moves, most promising first:
    ((score, objective, move, plan) or None, evaluations made)."""
    net, best, seen, todo = problem_net(prob), None, set(), []
    for m in sorted(cands, key=lambda m: (m.far, m.key_s, m.l, m.dest)):
        if len(todo) >= budget:
            break
        same = _signature(prob, pl, m)
        if same in seen:  # an identical layer in the same surroundings: the same effect
            continue
        seen.add(same)
        todo.append((m, _move(pl, m, prob.names[m.dest])))
    if prob.cost_model == "decode" and todo:  # the candidates' new layers in one batch
        plan_arrays(prob).warm([cand for _, cand in todo])
    for m, cand in todo:
        if plan_cost(prob, cand, net).token_latency_s > lat_limit:
            continue  # no migration estimate for a move the latency already rules out
        obj = _objective(prob, cand, prob.H, net)[0]
        score = (obj - cur) / m.nbytes  # objective added per byte of peak removed
        if obj <= limit and (best is None or score < best[0]):
            best = (score, obj, m, cand)
    return best, len(todo)


def level(prob: Problem, pl: Placement, tol: float = 0.02, chunks: int = 4, n_dest: int = 2,
          max_evals: int = 2000, ref_latency_s: float = float("inf")) -> tuple[Placement, dict]:
    """Lower the largest worker peak of ``pl`` within ``(1 + tol)`` x its objective and x its
    latency (or ``ref_latency_s`` when lower: the fastest plan the planner weighed) (module
    docstring). Returns (plan, what was done: ``moves``, ``evals``, peaks before and after)."""
    until = peak_horizon(prob)
    cur, lat0, _ = _objective(prob, pl, prob.H, problem_net(prob))
    limit, lat_limit = (1 + tol) * cur, (1 + tol) * min(lat0, ref_latency_s)
    used = worker_peaks(prob, pl, until)
    fit = _block_use(prob, pl, int(prob.T_mem))
    workers, fixed = _leveled(prob)
    before = float((used + fixed)[workers].max(initial=0.0))
    chunk_cols = -(-prob.dims.ffn_dim // max(1, chunks))
    moves = evals = 0
    while evals < max_evals:
        total = used + fixed
        a = int(np.argmax(np.where(workers, total, -np.inf)))
        # room at the peak horizon (and at the memory horizon the plan was made for), below a's peak
        room = np.minimum(prob.budget - used, prob.budget - fit)
        room = np.minimum(room, total[a] - total - 1.0)
        cands = _candidates(prob, pl, a, room, chunk_cols, n_dest)
        best, n = _best_move(prob, pl, cands, cur, limit, lat_limit, max_evals - evals)
        evals += n
        if best is None:
            break
        _, cur, m, pl = best
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
               ref_latency_s: float = float("inf"), rate_hedge: float | None = None) -> Placement:
    """``level``'s plan with what it did in ``meta`` (``leveling_*``); ``pl`` itself when nothing moved,
    or when ``rate_hedge`` is set and the leveled plan's objective with every link at ``rate_hedge`` x
    its rate (``ra.hedge``) is more than ``1 + tol`` times ``pl``'s: moves that cost nothing while the
    links hold can put heads behind slow links (step 4d's bet, made again by the back door)."""
    out, info = level(prob, pl, tol, chunks, max_evals=max_evals, ref_latency_s=ref_latency_s)
    if not info["leveling_moves"]:
        return pl
    if rate_hedge is not None:
        from testbed.partition.ra.hedge import slow_objective

        if slow_objective(prob, out, rate_hedge) > (1 + tol) * slow_objective(prob, pl, rate_hedge):
            return pl
    return Placement(out.source, out.layers, meta={**pl.meta, **info})