"""EdgeShard-style layer partitioning (arXiv 2405.14371, our reading) and its dynamic variant.

A layer's heads, KV caches, projection and FFN all live on one device; each device holds at most one
contiguous run of layers (a shard). Dynamic programming over (layers placed, position of the last
shard's device in a device order):

    f[i][t] = min_{s < t, m >= 1} f[i-m][s] + x(o_s, o_t) + m * c_{o_t},   m * layer_bytes <= budget

with ``x(j, k)`` the hidden-state transfer (latency + bytes/bandwidth), ``c_k`` one layer's compute
time on ``k`` (the ``decode`` model of a whole layer on one device), devices that get no layers
skipped; the token ends with ``x(last, source)`` + LM head. Pinning: the FIRST shard goes on the
source when ``allow_blocks_on_source`` (EdgeShard's rule), otherwise on the allowed device nearest
the source (smallest hidden-state transfer time, with room for a layer) — the paper's privacy rule
forbids the source itself. Simplification: the DP is exact for a FIXED device order; we run it for
three orders (by layer compute time, by distance to the source, by both) and keep the best — the
full EdgeShard search over orders is exponential. Under the ``paper`` model (one layer) the whole
layer goes on the pinned device.

``edgeshard`` plans once (static). ``edgeshard_dynamic`` re-runs the DP every decision epoch on the
measured snapshot and keeps the old plan unless the new one's latency plus migration delay amortised
over the same horizon as RA (default 4 epochs) is lower; when the old plan no longer fits (a
memory-forced move) it takes the cheaper of the new plan and the cheapest layer-contiguous repair of
the old one (the DP with each layer's amortised migration delay in its cost), as RA does at head
granularity.
"""
from __future__ import annotations

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.layer import edgeshard_kernel
from testbed.partition.common import Problem, uniform_layers
from testbed.partition.cost.latency import decode_constants
from testbed.core.errors import InfeasiblePlan
from testbed.core.placement import Placement


def _layer_seconds(prob: Problem) -> np.ndarray:
    d = prob.dims
    if prob.cost_model == "paper":
        flops = d.n_kv_heads * prob.sz.head_f + prob.sz.proj_f + d.ffn_dim * prob.sz.ffn_col_f
    else:
        k = decode_constants(d, prob.T)
        flops = d.n_kv_heads * k["head_flops"] + k["proj_flops"] + d.ffn_dim * k["ffn_col_flops"]
    with np.errstate(divide="ignore"):
        return np.where(prob.C > 0, flops / np.where(prob.C > 0, prob.C, 1.0), np.inf)


def _caps(prob: Problem, room: np.ndarray | None = None) -> np.ndarray:
    """Whole layers each allowed device can hold within ``room`` (default ``prob.budget``)."""
    room = prob.budget if room is None else room
    return np.where(prob.allowed, np.floor(np.clip(room, 0, None) / prob.layer_bytes()), 0).astype(int)


def _hop(prob: Problem) -> np.ndarray:
    """Seconds to pass a hidden state i -> j (latency + bytes / bandwidth)."""
    return prob.lat + prob.sz.x_b * prob.spb


def _pin(prob: Problem, X: np.ndarray, caps: np.ndarray) -> int:
    if prob.allowed[prob.src]:
        return prob.src
    cand = np.where(prob.allowed & (caps > 0), X[prob.src], np.inf)
    return int(np.argmin(cand))


def _dp(prob: Problem, caps: np.ndarray, c: np.ndarray, X: np.ndarray, order: list[int],
        move: np.ndarray | None = None):
    """Exact DP for a fixed device order (order[0] pinned, later devices may get 0 layers).
    ``move[k, l]``: an extra cost of layer ``l`` on device ``k`` (the repair's amortised migration)."""
    L = prob.dims.n_layers
    # S[k, i]: extra cost of layers [0, i) on device k; a shard [i - m, i) adds S[k, i] - S[k, i - m]
    S = np.zeros((len(prob.names), L + 1)) if move is None else np.hstack(
        [np.zeros((len(prob.names), 1)), np.cumsum(move, axis=1)])
    return edgeshard_kernel.dp(int(prob.src), L, np.asarray(c, dtype=float), np.asarray(X, dtype=float),
                               np.asarray(caps, dtype=np.int64), np.array(order, dtype=np.int64), S)


def _backtrack(arg: np.ndarray, last: int, L: int, order: list[int]) -> list[int]:
    devs, i, t = [], L, last
    while i > 0:
        j, m = arg[i, t]
        devs = [order[t]] * m + devs
        i, t = i - m, j
    return devs


def _orders(prob: Problem, X: np.ndarray, c: np.ndarray, pin: int, caps: np.ndarray) -> list[list[int]]:
    rest = [k for k in np.nonzero(prob.allowed & (caps > 0))[0].tolist() if k != pin]
    by_speed = sorted(rest, key=lambda k: (c[k], k))
    by_near = sorted(rest, key=lambda k: (X[prob.src, k], k))
    by_both = sorted(rest, key=lambda k: (c[k] + X[prob.src, k] + X[k, prob.src], k))
    return [[pin] + o for o in (by_speed, by_near, by_both)]


def best_split(prob: Problem, max_devices: int | None = None, budget: np.ndarray | None = None) -> list[int] | None:
    """Device index per layer of the best contiguous layer split within ``budget`` (default
    ``prob.budget``; the DP over EdgeShard's three device orders), None when no split fits. ``max_devices``: each order
    cut to its first devices (at least enough of them to hold every layer): a split uses at most
    ``n_layers`` devices, and the DP is quadratic in the order's length."""
    caps, c, X = _caps(prob, budget), _layer_seconds(prob), _hop(prob)
    memo = prob.memo.setdefault("best_split", {})
    key = (max_devices, caps.tobytes())  # the split depends on the budget only through whole layers
    if key not in memo:
        memo[key] = _best_split(prob, max_devices, caps, c, X)
    return None if memo[key] is None else list(memo[key])


def _best_split(prob: Problem, max_devices: int | None, caps: np.ndarray, c: np.ndarray,
                X: np.ndarray) -> list[int] | None:
    pin = _pin(prob, X, caps)
    best, best_t = None, np.inf
    for order in _orders(prob, X, c, pin, caps):
        if max_devices is not None and len(order) > max_devices:
            held = np.cumsum(caps[order])
            order = order[:max(max_devices, int(np.searchsorted(held, prob.dims.n_layers)) + 1)]
        end, arg = _dp(prob, caps, c, X, order)
        t = int(np.argmin(end))
        if end[t] < best_t:
            best, best_t = _backtrack(arg, t, prob.dims.n_layers, order), end[t]
    return best


def edgeshard(snapshot, dims, cost_model: str = "decode") -> Placement:
    """Contiguous layer shards minimising per-token latency subject to memory (see module doc)."""
    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    best = best_split(prob)
    if best is None:
        lb, caps = prob.layer_bytes(), _caps(prob)
        pin = _pin(prob, _hop(prob), caps)
        raise InfeasiblePlan(
            f"edgeshard: no contiguous layer split fits: a layer needs {int(lb)} bytes at T={prob.T_mem}; "
            f"first shard pinned to {prob.names[pin]} (room for {int(caps[pin])} layers); total needed "
            f"{int(lb * dims.n_layers)} vs total available {int(np.clip(prob.budget[prob.allowed], 0, None).sum())}")
    pl = Placement(snapshot.source, uniform_layers([prob.names[k] for k in best], dims))
    return Placement(pl.source, pl.layers, meta={"algorithm": "edgeshard"})


def layer_level(pl: Placement, dims) -> bool:
    """Every layer whole on one device and every device one contiguous run of layers."""
    devs = []
    for lp in pl.layers:
        if set(lp.heads) != {lp.proj} or len(lp.ffn) != 1 or lp.ffn[0].device != lp.proj:
            return False
        devs.append(lp.proj)
    runs = [d for i, d in enumerate(devs) if i == 0 or devs[i - 1] != d]
    return len(runs) == len(set(runs)) and len(devs) == dims.n_layers


def layer_repair(prob: Problem, H: float, n_new: int = 2) -> Placement | None:
    """The cheapest layer-contiguous re-split of ``snapshot.current`` (a layer-level placement) that
    fits the memory horizon: EdgeShard's DP with each layer's migration delay from its current
    device (latency + bytes at the MEASURED rate, weights + KV at ``T``) amortised over ``H`` added
    to the cost of putting it elsewhere, so the fewest bytes over the slowest links move.

    Device orders: the current shards' order with a new device appended or inserted at any
    boundary (``n_new`` candidates by layer compute + distance to the source, and as many by the
    fastest link from an over-committed device), plus EdgeShard's three orders; so a boundary
    shift, a cascade of shifts and a new shard between two old ones are all reachable. The first
    shard stays on the current first device when it may hold a layer. Summing the per-layer delays
    over-estimates the real (serialised per sender, senders in parallel) delay; the caller compares
    plans with the real one. None when the current placement uses a device that is down or not
    allowed, or no split fits."""
    from testbed.partition.common import sizes_for
    from testbed.partition.cost.latency import memory
    from testbed.partition.ra.choice import _devices_ok

    cur, d = prob.snap.current, prob.dims
    if cur is None or not layer_level(cur, d) or not _devices_ok(prob, cur):
        return None
    caps, c, X = _caps(prob), _layer_seconds(prob), _hop(prob)
    at_T = sizes_for(d, prob.cost_model, prob.T, prob.T, prob.snap.weights_shipped)
    moved = d.n_kv_heads * at_T.mig_head_b + at_T.mig_proj_b + d.ffn_dim * at_T.mig_col_b  # what a layer ships
    where = [prob.index[lp.proj] for lp in cur.layers]
    with np.errstate(invalid="ignore"):
        move = (prob.lat[where].T + moved * prob.spb[where].T) / H  # (device, layer)
    move[np.array(where), np.arange(len(where))] = 0.0
    first = where[0]
    pin = first if prob.allowed[first] and caps[first] > 0 else _pin(prob, X, caps)
    runs = [k for k in dict.fromkeys(where) if k != pin and caps[k] > 0]
    rest = [k for k in np.nonzero(prob.allowed & (caps > 0))[0].tolist() if k not in runs and k != pin]
    mem = memory(cur, prob.snap, d, prob.cost_model, prob.T_mem)
    over = [prob.index[n] for n, used in mem.items() if n in prob.index
            and used - (B.source_bytes(d) if prob.index[n] == prob.src else 0) > prob.budget[prob.index[n]]]
    near = sorted(rest, key=lambda k: (c[k] + X[prob.src, k] + X[k, prob.src], k))[:n_new]
    if over:
        near += [k for k in sorted(rest, key=lambda k: (prob.spb[over, k].min(), k)) if k not in near][:n_new]
    orders = [[pin] + runs + near]
    for u in near:
        orders += [[pin] + runs[:p] + [u] + runs[p:] for p in range(len(runs))]
    best, best_t = None, np.inf
    for order in orders + _orders(prob, X, c, pin, caps):
        end, arg = _dp(prob, caps, c, X, order, move)
        t = int(np.argmin(end))
        if end[t] < best_t:
            best, best_t = _backtrack(arg, t, d.n_layers, order), end[t]
    if best is None:
        return None
    return Placement(cur.source, uniform_layers([prob.names[k] for k in best], d), meta={"algorithm": "edgeshard_dynamic"})


def _whole_run_split(snapshot, dims, cost_model: str, N: int) -> Placement:
    """EdgeShard's split sized for the rest of the run when that fits (moving whole layers is
    expensive, so a split that outlasts the KV growth saves forced moves later), else for the
    next epoch only."""
    from dataclasses import replace

    rest = snapshot.tokens_remaining
    if rest is not None and rest > N:
        try:
            return edgeshard(replace(snapshot, tokens_until_next_decision=rest), dims, cost_model)
        except InfeasiblePlan:
            pass
    return edgeshard(snapshot, dims, cost_model)


def edgeshard_dynamic(snapshot, dims, cost_model: str = "decode", horizon_epochs: int = 4,
                      horizon_tokens: int | None = None) -> Placement:
    """EdgeShard re-planned every epoch (strictly layer-level: whole layers, contiguous shards).

    The new DP plan is sized for the rest of the run when that fits (``_whole_run_split``).
    Voluntary moves: the old plan is kept unless the new DP plan's latency plus migration delay
    amortised over the same horizon as RA (``horizon_tokens``, default ``horizon_epochs`` epochs)
    is lower. Memory-forced moves (the current plan no longer fits until the next decision, e.g.
    the KV caches outgrew a device or its limit fell): the cheaper, by the same objective at the
    measured rates, of the new DP plan and the cheapest layer-contiguous repair of the current
    plan (``layer_repair``)."""
    from testbed.partition.cost.latency import Net
    from testbed.partition.ra.choice import _objective, _usable

    N = max(1, snapshot.tokens_until_next_decision)
    H = max(1.0, snapshot.amortisation_tokens(horizon_tokens if horizon_tokens is not None
                                              else N * max(1, horizon_epochs)))
    prob = Problem(snapshot, dims, cost_model)
    cur = snapshot.current
    same = cur is not None and len(cur.layers) == dims.n_layers and cur.source == snapshot.source
    try:
        new = _whole_run_split(snapshot, dims, cost_model, N)
        new = Placement(new.source, new.layers, meta={"algorithm": "edgeshard_dynamic"})
        err = None
    except InfeasiblePlan as exc:  # no split from scratch (three device orders); a repair may exist
        if not same:
            raise
        new, err = None, exc
    if not same:
        return new
    net = Net(snapshot)
    obj = lambda pl: _objective(prob, pl, H, net)[0]  # noqa: E731
    if _usable(prob, cur):  # voluntary: the new plan must pay for its migration over H
        return cur if new is None or obj(cur) <= obj(new) else new
    cands = [pl for pl in (new, layer_repair(prob, H)) if pl is not None and _usable(prob, pl)]
    if not cands:
        if new is not None:
            return new
        raise err  # type: ignore[misc]
    return min(cands, key=obj)
