"""One layer's option tables for the several-layer search (``exact.chain``): per-device block
times (``Net.call``: the cost model's roofline), the attention and FFN phases' times as LOWER
BOUNDS of ``decode_cost`` (fan-in queueing counted only behind messages arriving more than ``EPS``
later, as ``exact.serial``: exact without near-ties), the head-count rows within the memory
budgets, and the FFN options with their fastest shard order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from testbed.core.errors import OutOfScope
from testbed.partition.common import Problem
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import Net, decode_constants
from testbed.partition.exact.serial import _comps, _fan_in_lb

INF = float("inf")


def chain_size(n_devices: int, n_groups: int) -> int:
    """Head-count vectors per proj device (the attention table's rows before memory caps)."""
    from math import comb

    return comb(n_groups + max(1, n_devices) - 1, max(1, n_devices) - 1)


class LayerTables:
    """Per-device block times (``Net.call``: the cost model's roofline), link matrices and block
    bytes of ONE layer of the problem, and the two phase-time functions that bound
    ``decode_cost`` from below (exact without near-ties)."""

    def __init__(self, prob: Problem, K: int):
        d = prob.dims
        if d.ffn_dim % K:
            raise OutOfScope(f"chain search: {K} FFN chunks must divide ffn_dim {d.ffn_dim}")
        self.prob, self.K, self.G = prob, K, d.n_kv_heads
        self.V = [int(j) for j in np.nonzero(prob.allowed)[0]]
        self.m = len(self.V)
        self.src = prob.src
        self.width = d.ffn_dim // K
        k = decode_constants(d, prob.T)
        self.k = k
        net = Net(prob.snap)
        names = prob.names
        self.lat, self.spb = prob.lat, prob.spb
        with np.errstate(invalid="ignore"):
            self.xtau = np.where(np.isfinite(prob.spb), k["x_bytes"] * prob.spb, INF)
        self.head_t = np.array([[net.call(names[j], n * k["head_flops"], n * k["head_read"]) if n else 0.0
                                 for n in range(self.G + 1)] for j in self.V])
        self.proj_t = np.array([net.call(names[j], k["proj_flops"], k["proj_read"]) for j in self.V])
        self.ffn_t = np.array([[net.call(names[j], c * self.width * k["ffn_col_flops"],
                                         c * self.width * k["ffn_col_read"]) if c else 0.0
                                for c in range(K + 1)] for j in self.V])
        lm = net.call(names[self.src], k["lm_flops"], k["lm_read"])
        n_all = len(names)
        self.final = np.array([lm + (0.0 if a == self.src else self.xtau[a, self.src] + self.lat[a, self.src])
                               for a in range(n_all)])
        self.head_b = int(B.block_memory_bytes(d, "head", prob.T_mem))
        self.proj_b = int(B.proj_bytes(d))
        self.ffn_b = [int(B.ffn_bytes(d, c * self.width)) if c else 0 for c in range(K + 1)]
        self.budget = np.array([np.floor(prob.budget[j]) for j in self.V])

    def head_out_tau(self, i: int, P: int, n: np.ndarray) -> np.ndarray:
        """Downlink seconds of ``n`` groups' outputs from V[i] to device P (0 where n == 0)."""
        s = self.spb[self.V[i], P]
        return np.where(n > 0, n * self.k["head_out_bytes"] * (s if np.isfinite(s) else INF), 0.0)

    def attention(self, A: int, iP: int, order: tuple[int, ...], N: np.ndarray) -> np.ndarray:
        """Lower bound of the attention phase (x leaves A at 0; every head output received by the
        proj on V[iP]) per row of ``N`` (head counts over V; the devices in ``order``, the x send
        order after the proj, hold heads, no other device but the proj does), as
        ``latency._decode_layer``."""
        V, P, lat = self.V, self.V[iP], self.lat
        up = 0.0
        arrP = 0.0
        if P != A:
            up = self.xtau[A, P]
            arrP = up + lat[A, P]
        base = arrP + self.head_t[iP, N[:, iP]]
        arr = []
        for i in order:
            if V[i] == A:
                arr.append(0.0)
            else:
                up += self.xtau[A, V[i]]
                arr.append(up + lat[A, V[i]])
        if not order:
            return base
        R, tau = [], []
        for i, a in zip(order, arr):
            n = N[:, i]
            start = a + self.head_t[i, n]
            if V[i] == A:
                start = np.maximum(start, up)  # A's output waits for its x sends
            t = self.head_out_tau(i, P, n)
            R.append(start + t + lat[V[i], P])
            tau.append(t)
        return np.maximum(base, _fan_in_lb(R, tau))

    def attention_floor(self, A: int, iP: int, N: np.ndarray) -> np.ndarray:
        """A cheaper lower bound of ``attention`` over EVERY send order: each head device on its
        own (x sent to it right after the proj; the input device's own heads send once its x to
        the proj has left), no fan-in queueing."""
        V, P, lat = self.V, self.V[iP], self.lat
        first = self.xtau[A, P] if P != A else 0.0
        arrP = first + lat[A, P] if P != A else 0.0
        out = arrP + self.head_t[iP, N[:, iP]]
        for i in range(self.m):
            if i == iP:
                continue
            n = N[:, i]
            if V[i] == A:  # x is there at 0; its output waits for the uplink (>= the send to P)
                start = np.maximum(self.head_t[i, n], first)
            else:
                start = first + self.xtau[A, V[i]] + lat[A, V[i]] + self.head_t[i, n]
            r = start + self.head_out_tau(i, P, n) + lat[V[i], P]
            out = np.maximum(out, np.where(n > 0, r, -INF))
        return out

    def ffn(self, iP: int, seq: tuple[int, ...], chunks: tuple[int, ...]) -> float:
        """Lower bound of the FFN phase from the proj's finish (uplinks free) to the layer's output
        on the aggregator V[seq[0]]: h to the shard devices in ``seq`` order, the shards, the
        partials into the aggregator (the proj's partial queued on its uplink behind its h sends)."""
        V, P, lat, up = self.V, self.V[iP], self.lat, {}

        def send(a: int, b: int, t: float) -> float:
            if a == b:
                return t
            start = max(t, up.get(a, t))
            up[a] = start + self.xtau[a, b]
            return up[a] + lat[a, b]

        agg = V[seq[0]]
        out, R, tau = 0.0, [], []
        for i, c in zip(seq, chunks):
            dev = V[i]
            done = send(P, dev, 0.0) + self.ffn_t[i, c]
            if dev == agg:
                out = done
                continue
            R.append(np.array([send(dev, agg, done)]))
            tau.append(np.array([self.xtau[dev, agg]]))
        if R:
            out = max(out, float(_fan_in_lb(R, tau)[0]))
        return out


@dataclass
class FfnOptions:
    """Per FFN option: proj position iP, chunks per device (over V), shard order (aggregator
    first, positions in V) and the FFN phase's cost (its minimum over the other shards' orders)."""

    P: list = field(default_factory=list)
    chunks: list = field(default_factory=list)
    seq: list = field(default_factory=list)
    cost: list = field(default_factory=list)


def ffn_options(T: LayerTables) -> FfnOptions:
    """Every (proj, chunk counts within the budgets, aggregator) with its fastest shard order."""
    o = FfnOptions()
    caps = tuple(max(c for c in range(T.K + 1) if T.ffn_b[c] <= max(b, 0)) for b in T.budget)
    for iP in range(T.m):
        for c in _comps(T.K, caps):
            supp = [i for i in range(T.m) if c[i] > 0]
            for agg in supp:
                best, best_seq = INF, None
                for rest in itertools.permutations([i for i in supp if i != agg]):
                    seq = (agg, *rest)
                    t = T.ffn(iP, seq, tuple(int(c[i]) for i in seq))
                    if t < best:
                        best, best_seq = t, seq
                if np.isfinite(best):
                    o.P.append(iP)
                    o.chunks.append(tuple(int(x) for x in c))
                    o.seq.append(best_seq)
                    o.cost.append(best)
    return o


def head_rows(T: LayerTables, iP: int) -> np.ndarray:
    """Head-count vectors over V within each device's budget (the proj's bytes taken on V[iP])."""
    caps = []
    for i, b in enumerate(T.budget):
        rem = b - (T.proj_b if i == iP else 0)
        caps.append(int(max(0, min(T.G, rem // T.head_b))) if rem >= 0 else -1)
    if caps[iP] < 0:
        return np.zeros((0, T.m), dtype=int)
    return _comps(T.G, tuple(max(c, 0) for c in caps))


def best_orders(T: LayerTables, A: int, iP: int, N: np.ndarray) -> tuple[np.ndarray, list]:
    """Per row of ``N``: the minimum of ``attention`` over the x send orders of its head devices
    (other than the proj) and that order."""
    best = np.full(len(N), INF)
    orders: list = [()] * len(N)
    others = np.delete(np.arange(T.m), iP)
    masks = N[:, others] > 0
    keys, inv = np.unique(masks, axis=0, return_inverse=True)
    for g, key in enumerate(keys):
        rows = np.nonzero(inv.ravel() == g)[0]
        supp = tuple(int(i) for i in others[key])
        for perm in itertools.permutations(supp):
            v = T.attention(A, iP, perm, N[rows])
            better = v < best[rows]
            for r in rows[better]:
                orders[r] = perm
            best[rows] = np.minimum(best[rows], v)
    return best, orders
