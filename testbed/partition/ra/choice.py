"""RA step 5: keep, repair or move (the decision after a greedy round, shared with ``optimal``
and EdgeShard-dynamic).

``choose_plan`` minimises latency + migration delay / H over staying, the new plan and per-layer
mixtures of the two, the delay at the MEASURED path rates with each sender's transfers serialised
on its uplink (``migration``). Memory-forced moves are handled apart: the KV growth is linear, so
how long the current placement still fits is known exactly (``fits_until``); a forced or
predictable move takes the cheapest ``repair`` (fewest bytes over the slowest links), made early
when headroom is cheap (``_headroom``). Pure functions of a ``Problem``.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.common import Problem, check_memory, fits_until, sizes_for
from testbed.partition.cost.latency import Net, memory
from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import FfnShard, LayerPlacement, Placement
# what a candidate costs (re-exported: planners, EdgeShard-dynamic and the exact solver import them here)
from testbed.partition.ra.objective import (_objective, migration_lower_bound, plan_arrays, plan_cost,  # noqa: F401
                                            problem_net, remember_cost)


def _devices_ok(prob: Problem, pl: Placement) -> bool:
    """``pl`` only uses known devices that are up and allowed (the source always)."""
    if pl.source != prob.snap.source or len(pl.layers) != prob.dims.n_layers:
        return False
    if not pl.devices() <= set(prob.names):
        return False
    return all(prob.allowed[prob.index[d]] for d in pl.devices() - {pl.source})


def _usable(prob: Problem, pl: Placement, until: int | None = None) -> bool:
    """Placement only uses known, allowed devices and fits every budget up to context ``until``
    (default: the next decision, ``T + N``)."""
    if not _devices_ok(prob, pl):
        return False
    try:
        check_memory(pl, prob.snap, prob.dims, prob.cost_model,
                     prob.T + prob.snap.tokens_until_next_decision if until is None else until)
    except InfeasiblePlan:
        return False
    return True


class _MixFits:
    """``_usable(prob, best with layer l from alt, until)`` for every l at the cost of one memory
    evaluation of ``best`` (memory is a sum over layers, so a mixture's bytes per device are
    ``best``'s less its layer l plus ``alt``'s layer l)."""

    def __init__(self, prob: Problem, until: int):
        self.prob, self.until = prob, prob.snap.mem_horizon(until)
        self.limit = np.array([float(d.mem_budget_bytes) for d in prob.snap.devices])
        self.ok = {n for n, a in zip(prob.names, prob.allowed) if a} | {prob.snap.source}
        self.best, self.used = None, None
        self.layers: dict = {}  # id(LayerPlacement) -> (it, its bytes per device)
        self.head = self.proj = None  # a head's and a projection's bytes at ``until``
        self.shard: dict = {}  # FFN columns -> a shard's bytes

    def _bytes(self, pl: Placement) -> np.ndarray:
        p = self.prob
        mem = memory(pl, p.snap, p.dims, p.cost_model, self.until)
        return np.array([float(mem.get(n, 0)) for n in p.names])

    def __call__(self, best: Placement, alt: Placement, l: int) -> bool:
        if self.best is not best:
            self.best = best
            self.used = self._bytes(best) if _devices_ok(self.prob, best) else None
        lp = alt.layers[l]
        if self.used is None or not {*lp.heads, lp.proj, *(s.device for s in lp.ffn)} <= self.ok:
            return False
        swap = self._layer_bytes(lp) - self._layer_bytes(best.layers[l])
        return bool(np.all(self.used + swap <= self.limit))

    def _layer_bytes(self, lp) -> np.ndarray:
        """``_bytes`` of a one-layer placement, once per layer object."""
        hit = self.layers.get(id(lp))
        if hit is None or hit[0] is not lp:
            p = self.prob
            if p.cost_model != "decode":
                vec = self._bytes(Placement(p.snap.source, (lp,)))
            else:  # ``placement_memory``'s terms (whole bytes: exact sums), without the source's (it cancels)
                vec, idx, d = np.zeros(len(p.names)), p.index, p.dims
                if self.head is None:
                    self.head, self.proj = B.block_memory_bytes(d, "head", self.until), B.proj_bytes(d)
                for dev, n in Counter(lp.heads).items():
                    vec[idx[dev]] += n * self.head
                vec[idx[lp.proj]] += self.proj
                for sh in lp.ffn:
                    c = sh.col_end - sh.col_start
                    nb = self.shard.get(c)
                    if nb is None:
                        nb = self.shard[c] = B.ffn_bytes(d, c)
                    vec[idx[sh.device]] += nb
            hit = self.layers[id(lp)] = (lp, vec)
        return hit[1]


def _with_block(pl: Placement, l: int, block, dev: str) -> Placement:
    """``pl`` with head group ``block`` (int) or FFN shard ``block`` (FfnShard) of layer ``l`` on ``dev``."""
    lp = pl.layers[l]
    if isinstance(block, int):
        heads = lp.heads[:block] + (dev,) + lp.heads[block + 1:]
        lp = LayerPlacement(heads, lp.proj, lp.ffn)
    else:
        lp = LayerPlacement(lp.heads, lp.proj, tuple(FfnShard(dev, s.col_start, s.col_end) if s == block else s
                                                      for s in lp.ffn))
    return Placement(pl.source, pl.layers[:l] + (lp,) + pl.layers[l + 1:], meta=pl.meta)


def _block_use(prob: Problem, pl: Placement, until: int) -> np.ndarray:
    """Bytes of blocks per device (index order) at context ``until``, embedding/LM head excluded."""
    mem = memory(pl, prob.snap, prob.dims, prob.cost_model, until)
    used = np.array([float(mem.get(n, 0)) for n in prob.names])
    used[prob.src] -= B.source_bytes(prob.dims)
    return used


def repair(prob: Problem, cur: Placement, H: float, net: Net, budget: np.ndarray,
           n_dest: int = 3, max_moves: int = 64, until: int | None = None,
           start: Placement | None = None, max_evals: int = 24) -> Placement | None:
    """Minimal moves that make ``cur`` fit up to context ``until`` (default ``prob.T_mem``) again
    (a device outgrew its memory with the KV caches, or its budget shrank): while some device is
    over budget at ``until``, try moving each of its head groups / FFN shards to the ``n_dest``
    destinations with room that receive it fastest (devices already holding part of that layer
    first), evaluate the ``max_evals`` most promising of these moves (same order) and apply the
    one with the lowest ``latency + migration delay / H`` (migration from
    ``snapshot.current``: with the measured rates, so over a slow uplink the fewest bytes win).
    ``start``: continue from an earlier repair of ``cur`` (to a shorter horizon). None if blocks
    sit on a device that is down or not allowed, or no move helps."""
    if not _devices_ok(prob, cur):
        return None
    until = prob.T_mem if until is None else prob.cap(until)
    sz = sizes_for(prob.dims, prob.cost_model, prob.T, until)
    pl = cur if start is None else start
    for _ in range(max_moves):
        used = _block_use(prob, pl, until)
        over = used - prob.budget
        j = int(np.argmax(over))
        if over[j] <= 0:
            return pl
        room = np.where(prob.allowed, budget - used, -np.inf)
        name, moves = prob.names[j], []
        for l, lp in enumerate(pl.layers):
            layer_devs = {prob.index[d] for d in lp.heads} | {prob.index[s.device] for s in lp.ffn}
            blocks = [(g, sz.head_b) for g, d in enumerate(lp.heads) if d == name]
            blocks += [(s, (s.col_end - s.col_start) * sz.ffn_col_b) for s in lp.ffn if s.device == name]
            seen = set()
            for blk, nbytes in blocks:
                kind = ("h", nbytes) if isinstance(blk, int) else ("f", blk.col_start)
                if kind in seen:
                    continue
                seen.add(kind)
                ok = np.nonzero(room >= nbytes)[0]
                ok = ok[ok != j]
                if ok.size == 0:
                    continue
                held = np.array([k in layer_devs for k in ok])
                t = prob.lat[j, ok] + nbytes * prob.spb[j, ok]
                for i in np.lexsort((t, ~held))[:n_dest].tolist():
                    moves.append((not held[i], float(t[i]), len(moves), l, blk, int(ok[i])))
        if not moves:
            return None
        # evaluate the most promising moves only: to a device already holding part of the
        # layer (no new hop in the dataflow) first, then by transfer time
        moves.sort()
        best = None
        for *_, l, blk, k in moves[:max_evals]:
            cand = _with_block(pl, l, blk, prob.names[k])
            obj = _objective(prob, cand, H, net)[0]
            if best is None or obj < best[0]:
                best = (obj, cand)
        pl = best[1]
    return None


def _fit(prob: Problem, pl: Placement) -> float:
    return fits_until(pl, prob.snap, prob.dims, prob.cost_model, prob.T)


def _headroom(prob: Problem, cur: Placement, base: Placement, base_obj: float, until_max: int, H: float,
              net: Net, budget: np.ndarray, price_s: float) -> tuple[Placement, float, float]:
    """Extend ``base`` epoch by epoch towards ``until_max`` with the cheapest repairs while each step
    is worth its price: its objective increase x H (stall + added latency over the horizon) is at
    most ``price_s`` per token of headroom it buys (headroom past the end of generation buys
    nothing; the last step stops at ``until_max`` when that is not on the epoch grid, e.g. the end
    of generation). Returns (plan, its objective, its fit)."""
    best, obj, fit = base, base_obj, _fit(prob, base)
    if fit >= until_max:
        return best, obj, fit
    until = prob.T + prob.N
    while until <= fit:
        until += prob.N
    while True:
        u = min(until, until_max)
        pl = repair(prob, cur, H, net, budget, until=u, start=best)
        if pl is None:
            break
        o, f = _objective(prob, pl, H, net)[0], _fit(prob, pl)
        if f <= fit or (o - obj) * H > price_s * (min(f, prob.T_end) - fit):
            break
        best, obj, fit = pl, o, f
        if fit >= until_max:
            break
        while until <= fit:
            until += prob.N
    return best, obj, fit


def choose_plan(prob: Problem, new: Placement, horizon_tokens: float, budget: np.ndarray | None = None,
                anticipate_epochs: int = 0, preempt: float = 0.0,
                headroom_until: int | None = None) -> Placement:
    """Step 5 with the migration delay computed properly (``migration`` aggregation, measured rates):

    minimise ``T_token(plan) + migration_delay(current -> plan) / H`` over the "stay" candidate,
    the new plan and per-layer mixtures of the two (first-improvement pass over the layers where
    they differ), so a voluntary move is taken only when its latency gain x H exceeds its
    migration delay. The stay candidate depends on how long the current placement still fits
    (only the KV caches grow, linearly: ``fits_until`` is exact):

    * it no longer fits until the next decision (a FORCED move): the cheapest repair that makes
      it fit until then (``repair``: fewest bytes over the slowest links, at the measured rates);
      if a device went down there is no such candidate and the new plan (mixed per layer) is used;
    * it fits past the next decision, but the KV growth will evict it before decision
      ``anticipate_epochs`` after the next one (a PREDICTABLE forced move): the cheapest repair to
      that horizon, made now if it is worth its price (below); otherwise the current placement
      (the move is deferred until forced: the links may recover, and then only what must move
      moves);
    * else the current placement.
    Price of pre-emptive headroom: a repair beyond what must move now is taken when its objective
    increase x H (its stall plus any latency it adds over the horizon) is at most ``preempt`` x
    the current token latency per token of headroom it buys, i.e. (``preempt = 1``) while the
    uplink moves a token's worth of KV growth faster than a token is generated: cheap over a fast
    link, deferred over a slow one. Repairs (forced or anticipated) are extended epoch by epoch
    towards ``headroom_until`` (default ``prob.T_mem``) + ``anticipate_epochs`` epochs at the same
    price (so a top-up is not due again at the next decision).
    ``anticipate_epochs = 0`` / ``preempt = 0``: no anticipation and no extension (the exact
    solver's use: only the minimal repair)."""
    cur = prob.snap.current
    if cur is None or len(cur.layers) != prob.dims.n_layers or cur.source != new.source:
        return new
    net = problem_net(prob)
    H = max(1.0, float(horizon_tokens))
    budget = budget if budget is not None else prob.budget
    T, N = prob.T, prob.N
    # top-ups reach the headroom horizon plus the anticipation window, so that the next one is
    # due only after ``headroom - 1`` epochs (not at every decision)
    # (every horizon is capped at the end of generation: no block moves for KV never written)
    until_max = prob.cap(max(T + N, int(prob.T_mem if headroom_until is None else headroom_until)
                             + max(0, anticipate_epochs) * N))
    if prob.cost_model == "decode":  # staying, the new plan and their per-layer mixtures: one batch
        try:
            plan_arrays(prob).warm_mixes(cur, new)
        except KeyError:  # the current placement uses a device the snapshot no longer has
            pass
    stay, need, value = _stay_candidate(prob, cur, H, net, budget, anticipate_epochs, preempt, until_max)

    def key(pl: Placement, obj: float | None = None) -> float:
        """The objective, less the headroom's value when a forced/predictable move is at stake (so
        the new plan and the top-up are compared at the price the top-up paid)."""
        obj = _objective(prob, pl, H, net)[0] if obj is None else obj
        return obj - value * min(_fit(prob, pl), until_max) / H if value else obj

    kept = [(key(stay[1], stay[0]), stay[1])] if stay is not None else []
    new_key = None
    if kept and not value and np.isfinite(kept[0][0]):
        # the new plan loses to staying already by its latency + a lower bound of its migration
        # (one wave: no memory-safe schedule); a margin keeps rounding from deciding
        low = plan_cost(prob, new, net).token_latency_s + migration_lower_bound(prob, new, net) / H
        if low > kept[0][0] * (1 + 1e-9) + 1e-15:
            new_key = low  # a lower bound above the stay's: ``min`` below picks the stay as with the exact key
    cands = [(key(new) if new_key is None else new_key, new)] + kept
    best_obj, best = min(cands, key=lambda c: c[0])
    # mix the winner per layer with the other candidate (with the current placement's usable
    # layers when there is no stay candidate, e.g. a device went down)
    alt = new if best is not new else (cands[1][1] if len(cands) > 1 else cur)
    best = _mix_per_layer(prob, best, best_obj, alt, key, need, by_latency=not value)
    if best is cur:
        return cur
    return Placement(best.source, best.layers, meta=new.meta)


def _stay_candidate(prob: Problem, cur: Placement, H: float, net: Net, budget: np.ndarray,
                    anticipate_epochs: int, preempt: float, until_max: int):
    """``choose_plan``'s "stay" candidate: (objective, placement) or None, how long every mixture
    must fit (``need``) and the value of a token of headroom in the comparison (``value``, s/token;
    0 unless a forced or predictable move is at stake)."""
    T, N = prob.T, prob.N
    nxt = prob.cap(T + N)  # the next decision
    need = nxt  # every mixture must fit at least until here (and keep a pre-emptive move)
    value, stay = 0.0, None
    if not _devices_ok(prob, cur):
        return stay, need, value
    fit = _fit(prob, cur)
    cur_obj, cur_lat, _ = _objective(prob, cur, H, net)
    price = preempt * cur_lat
    horizon = prob.cap(T + (1 + max(0, anticipate_epochs)) * N)
    if fit < horizon:  # a forced or predictable move: headroom is worth its price
        value = price
    if fit >= nxt:
        stay = (cur_obj, cur)
        if anticipate_epochs > 0 and price > 0 and fit < horizon <= until_max:
            pre = repair(prob, cur, H, net, budget, until=horizon)
            if pre is not None:
                o, f = _objective(prob, pre, H, net)[0], _fit(prob, pre)
                if f > fit and (o - cur_obj) * H <= price * (min(f, prob.T_end) - fit):
                    pre, o, f = _headroom(prob, cur, pre, o, until_max, H, net, budget, price)
                    stay, need = (o, pre), max(need, int(min(f, until_max)))
        return stay, need, value
    fixed = repair(prob, cur, H, net, budget, until=nxt)
    if fixed is not None and _usable(prob, fixed):
        o = _objective(prob, fixed, H, net)[0]
        if price > 0:
            fixed, o, f = _headroom(prob, cur, fixed, o, until_max, H, net, budget, price)
            need = max(need, int(min(f, until_max)))
        stay = (o, fixed)
    return stay, need, value


def _mix_per_layer(prob: Problem, best: Placement, best_obj: float, alt: Placement, key, need: int,
                   by_latency: bool = False) -> Placement:
    """First-improvement pass over the layers where ``alt`` differs from ``best``: take ``alt``'s
    layer when the mixture fits until ``need`` and lowers ``key``. ``by_latency`` (``key`` is the
    objective, latency + a delay >= 0): a mixture whose latency alone does not lower it is passed
    over without a migration estimate. Under ``decode`` the mixtures' latencies are computed
    together (``PlanArrays.latencies_swapped``), again after each mixture taken."""
    diff = [l for l in range(prob.dims.n_layers) if alt.layers[l] != best.layers[l]]
    if len(diff) <= 1:
        return best
    decode = prob.cost_model == "decode"
    fits, lats = _MixFits(prob, need), {}
    for i, l in enumerate(diff):
        if not fits(best, alt, l):
            continue
        cand = Placement(best.source, best.layers[:l] + (alt.layers[l],) + best.layers[l + 1:], meta=best.meta)
        if decode:
            if l not in lats:  # this and every later mixture of the current ``best``
                rest = diff[i:]
                lats = dict(zip(rest, plan_arrays(prob).latencies_swapped(best, [(m, alt.layers[m]) for m in rest])))
            remember_cost(prob, cand, lats[l])
        if by_latency and plan_cost(prob, cand).token_latency_s >= best_obj - 1e-12:
            continue  # its objective is at least its latency: no gain
        obj = key(cand)
        if obj < best_obj - 1e-12:
            best_obj, best, lats = obj, cand, {}
    return best


def _keep_current(prob: Problem, new: Placement, horizon_tokens: float | None = None) -> Placement:
    """Whole-plan step 5 (used by EdgeShard-dynamic and the exact solver): keep the current
    placement unless the new one's latency + migration delay / H is lower (H defaults to one epoch)."""
    cur = prob.snap.current
    if cur is None or len(cur.layers) != prob.dims.n_layers or cur.source != new.source:
        return new
    if not _usable(prob, cur):
        return new
    H = max(1.0, float(horizon_tokens or prob.N))
    net = problem_net(prob)
    return cur if _objective(prob, cur, H, net)[0] <= _objective(prob, new, H, net)[0] else new
