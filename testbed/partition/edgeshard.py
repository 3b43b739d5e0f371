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
over the same horizon as RA (default 4 epochs) is lower.
"""
from __future__ import annotations

import numpy as np

from testbed.partition import blocks as B
from testbed.partition.common import Problem, uniform_layers
from testbed.partition.cost import decode_constants
from testbed.partition.errors import InfeasiblePlan
from testbed.placement import Placement


def _layer_seconds(prob: Problem) -> np.ndarray:
    d = prob.dims
    if prob.cost_model == "paper":
        flops = d.n_kv_heads * prob.sz.head_f + prob.sz.proj_f + d.ffn_dim * prob.sz.ffn_col_f
    else:
        k = decode_constants(d, prob.T)
        flops = d.n_kv_heads * k["head_flops"] + k["proj_flops"] + d.ffn_dim * k["ffn_col_flops"]
    with np.errstate(divide="ignore"):
        return np.where(prob.C > 0, flops / np.where(prob.C > 0, prob.C, 1.0), np.inf)


def _pin(prob: Problem, X: np.ndarray, caps: np.ndarray) -> int:
    if prob.allowed[prob.src]:
        return prob.src
    cand = np.where(prob.allowed & (caps > 0), X[prob.src], np.inf)
    return int(np.argmin(cand))


def _dp(prob: Problem, caps: np.ndarray, c: np.ndarray, X: np.ndarray, order: list[int]):
    """Exact DP for a fixed device order (order[0] pinned, later devices may get 0 layers)."""
    L, n = prob.dims.n_layers, len(order)
    f = np.full((L + 1, n), np.inf)
    arg = np.full((L + 1, n, 2), -1, dtype=int)  # (previous position in order, shard length)
    pin = order[0]
    for m in range(1, min(L, caps[pin]) + 1):
        f[m, 0], arg[m, 0] = X[prob.src, pin] + m * c[pin], (-1, m)
    ordv = np.array(order)
    for t in range(1, n):
        k = order[t]
        into = X[ordv[:t], k]
        for i in range(2, L + 1):
            for m in range(1, min(i - 1, caps[k]) + 1):
                prev = f[i - m, :t] + into
                j = int(np.argmin(prev))
                val = prev[j] + m * c[k]
                if val < f[i, t]:
                    f[i, t], arg[i, t] = val, (j, m)
    end = f[L] + X[ordv, prob.src]
    return end, arg


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


def edgeshard(snapshot, dims, cost_model: str = "decode") -> Placement:
    """Contiguous layer shards minimising per-token latency subject to memory (see module doc)."""
    prob = Problem(snapshot, dims, cost_model)
    prob.check_totals()
    lb = prob.layer_bytes()
    caps = np.where(prob.allowed, np.floor(np.clip(prob.budget, 0, None) / lb), 0).astype(int)
    c = _layer_seconds(prob)
    X = prob.lat + prob.sz.x_b * prob.spb
    pin = _pin(prob, X, caps)
    best, best_t = None, np.inf
    for order in _orders(prob, X, c, pin, caps):
        end, arg = _dp(prob, caps, c, X, order)
        t = int(np.argmin(end))
        if end[t] < best_t:
            best, best_t = _backtrack(arg, t, dims.n_layers, order), end[t]
    if best is None:
        raise InfeasiblePlan(
            f"edgeshard: no contiguous layer split fits: a layer needs {int(lb)} bytes at T={prob.T_mem}; "
            f"first shard pinned to {prob.names[pin]} (room for {int(caps[pin])} layers); total needed "
            f"{int(lb * dims.n_layers)} vs total available {int(np.clip(prob.budget[prob.allowed], 0, None).sum())}")
    pl = Placement(snapshot.source, uniform_layers([prob.names[k] for k in best], dims))
    return Placement(pl.source, pl.layers, meta={"algorithm": "edgeshard"})


def edgeshard_dynamic(snapshot, dims, cost_model: str = "decode", horizon_epochs: int = 4,
                      horizon_tokens: int | None = None) -> Placement:
    """EdgeShard re-planned every epoch; keeps the old plan unless the new one pays for its migration
    over the same amortisation horizon as RA (``horizon_tokens``, default ``horizon_epochs`` epochs)."""
    from testbed.partition.ra import _keep_current

    new = edgeshard(snapshot, dims, cost_model)
    new = Placement(new.source, new.layers, meta={"algorithm": "edgeshard_dynamic"})
    N = max(1, snapshot.tokens_until_next_decision)
    H = horizon_tokens if horizon_tokens is not None else N * max(1, horizon_epochs)
    return _keep_current(Problem(snapshot, dims, cost_model), new, H)
