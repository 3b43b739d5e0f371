"""The ``decode`` model's token latency and activation bytes of whole placements, computed with
arrays over layers: the planners' inner evaluation (``ra.choice.plan_cost``), where
``latency.decode_cost`` walks every message in Python.

Same model, same arithmetic: every message's times are formed with the same operations in the
same order as ``latency._decode_layer`` (serialised NICs: a sender's uplink queues its sends in
the runtime's order, a receiver's downlink takes its fan-in in arrival order), so a plan's
latency is the same float (``tests/unit/test_cost_arrays.py`` compares them on many plans). What
differs is the bookkeeping: a layer's device lists are extracted once per ``LayerPlacement``, a
layer's cost once per (layer, input device) and problem, and the layers a plan does not share
with an earlier one are computed together in one compiled call (``layer_kernel``; ~0.5 us a
layer where the Python walk ``layer_walk.walk`` takes 17-29 us). Only the latency and the bytes
on the links are produced; reports use ``decode_cost``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from testbed.partition.cost import layer_kernel as K
from testbed.partition.cost.latency import decode_constants
from testbed.partition.cost.roofline import roofline_s
from testbed.partition.cost.layer_walk import _Layer, _extract, walk



class PlanLatency(NamedTuple):
    token_latency_s: float
    bytes_moved: int  # activation bytes sent between devices for one token


class PlanArrays:
    """Per problem (snapshot, dims, context): device rates and path matrices as arrays, and the
    memos. ``lat``/``spb``: ``Problem``'s matrices (``inf`` where a path is down), the values
    ``latency.Net.link`` returns."""

    def __init__(self, prob):
        snap = prob.snap
        self.index, self.src = prob.index, prob.src
        self.lat, self.spb = prob.lat, prob.spb
        self.speed = np.array([d.flops_per_s if d.up else 0.0 for d in snap.devices], dtype=float)
        self.mem_bw = np.array([d.mem_bw_bytes_per_s for d in snap.devices], dtype=float)
        self.call_s = np.array([d.call_overhead_s for d in snap.devices], dtype=float)
        self.k = decode_constants(prob.dims, snap.context_len, 1)
        self.snap, self.names, self.dims = snap, prob.names, prob.dims
        self._rows = None  # the path matrices and device rates as Python lists (``_one``), when first needed
        # what every ``layer_kernel`` walk reads first: paths, device rates, the block constants
        self.walk_args = (self.lat, self.spb, self.speed, self.mem_bw, self.call_s,
                          np.array([float(self.k[c]) for c in K.CONSTANTS]))
        # memos by identity (hashing a LayerPlacement is slow; plans share layer objects), each
        # entry holding its layer so that the id stays taken
        self.layers: dict = {}  # id(LayerPlacement) -> (it, _Layer) (the Python walk's form)
        self.heads: dict = {}  # (id(heads tuple), proj) -> (it, the _Layer's head fields)
        self.rows: dict = {}  # id(LayerPlacement) -> (it, (proj, head devices, shard devices, columns))
        self.head_idx: dict = {}  # id(heads tuple) -> (it, its devices as indices)
        self.deltas: dict = {}  # (id(LayerPlacement), input device) -> (it, compute_s, transfer_s, bytes)
        src = self.src  # the LM head, on the source
        self.lm_s = roofline_s(self.k["lm_flops"], self.k["lm_read"], float(self.speed[src]), float(self.mem_bw[src]),
                               float(self.call_s[src]))

    def _missing(self, pl, todo: dict) -> tuple[list, int]:
        """The plan's (layer, input device) keys in order, the last aggregator; adds to ``todo``
        those not computed yet."""
        index, memo = self.index, self.deltas
        A, keys = self.src, []
        for lp in pl.layers:
            key = (id(lp), A)
            keys.append(key)
            hit = memo.get(key)
            if hit is None or hit[0] is not lp:
                todo[key] = (lp, A)
            A = index[lp.ffn[0].device]
        return keys, A

    def warm(self, plans) -> None:
        """Compute the layers of ``plans`` not computed yet, all in one batch."""
        todo: dict = {}
        for pl in plans:
            self._missing(pl, todo)
        self._fill(todo)

    def warm_mixes(self, pl, alt) -> None:
        """Compute, in one batch, the layers of ``pl`` and ``alt`` and those ``latencies_swapped(pl,
        ...)`` needs for each layer of ``alt`` that is not ``pl``'s (a per-layer mixture of the two:
        that layer at ``pl``'s input, and ``pl``'s next layer after its aggregator)."""
        todo: dict = {}
        keys, _ = self._missing(pl, todo)
        self._missing(alt, todo)
        memo, index, L = self.deltas, self.index, len(pl.layers)
        for l, (a, b) in enumerate(zip(pl.layers, alt.layers)):
            if a is b:
                continue
            need = [(b, keys[l][1])] + ([(pl.layers[l + 1], index[b.ffn[0].device])] if l + 1 < L else [])
            for lp, A in need:
                hit = memo.get((id(lp), A))
                if hit is None or hit[0] is not lp:
                    todo[(id(lp), A)] = (lp, A)
        self._fill(todo)

    def _fill(self, todo: dict) -> None:
        if todo:
            for (key, (lp, _)), val in zip(todo.items(), self._compute(list(todo.values()))):
                self.deltas[key] = (lp, *val)

    def latency(self, pl) -> PlanLatency:
        """The plan's token latency (``decode_cost(pl).token_latency_s``) and bytes on the links."""
        todo: dict = {}
        keys, A = self._missing(pl, todo)
        self._fill(todo)
        memo = self.deltas
        c0 = c1 = 0.0
        nbytes = 0
        for key in keys:
            _, dc, dt, nb = memo[key]
            c0, c1, nbytes = c0 + dc, c1 + dt, nbytes + nb
        src, k = self.src, self.k
        if A != src:
            t = c0 + c1
            c1 = ((c1 + (t - t)) + k["x_bytes"] * self.spb[A, src]) + self.lat[A, src]
            nbytes += int(k["x_bytes"])
        c0 = c0 + self.lm_s
        return PlanLatency(c0 + c1, nbytes)

    def latencies_swapped(self, pl, swaps: list) -> list[PlanLatency]:
        """``latency`` of ``pl`` with, per swap ``(l, lp)``, its layer ``l`` replaced by ``lp``, for
        every swap at once (leveling's candidates: each differs from the plan in one layer and in
        the next layer's input). The missing layer costs are computed in one batch; the per-layer
        sums run in layer order over the candidates' rows (the same additions as ``latency``, so
        the same floats)."""
        todo: dict = {}
        keys, A_last = self._missing(pl, todo)
        index, memo, L, n = self.index, self.deltas, len(pl.layers), len(swaps)
        swapped, nxt, aggs = [], [], []  # per swap: its layer's key, the next layer's key (or None), its aggregator
        for l, lp in swaps:
            key = (id(lp), keys[l][1])
            hit = memo.get(key)
            if hit is None or hit[0] is not lp:
                todo[key] = (lp, key[1])
            agg = index[lp.ffn[0].device]
            after = None
            if l + 1 < L:
                after = (keys[l + 1][0], agg)
                hit = memo.get(after)
                if hit is None or hit[0] is not pl.layers[l + 1]:
                    todo[after] = (pl.layers[l + 1], agg)
            swapped.append(key)
            nxt.append(after)
            aggs.append(agg)
        self._fill(todo)
        base = [memo[k] for k in keys]
        dc = np.tile(np.array([b[1] for b in base]), (n, 1))  # (n swaps, L layers) compute seconds
        dt = np.tile(np.array([b[2] for b in base]), (n, 1))  # (n, L) transfer seconds
        nb_base = [b[3] for b in base]
        total_nb = sum(nb_base)
        nbytes = []
        for i, ((l, _), key, after) in enumerate(zip(swaps, swapped, nxt)):
            _, dc[i, l], dt[i, l], nb = memo[key]
            b = total_nb - nb_base[l] + nb
            if after is not None:
                _, dc[i, l + 1], dt[i, l + 1], nb2 = memo[after]
                b += nb2 - nb_base[l + 1]
            nbytes.append(b)
        # (n,) the sums from 0, layer by layer as ``latency`` adds them (``accumulate`` is a
        # sequential fold, unlike ``sum``'s pairwise summation)
        zero = np.zeros((n, 1))
        c0 = np.add.accumulate(np.concatenate([zero, dc], axis=1), axis=1)[:, -1]
        c1 = np.add.accumulate(np.concatenate([zero, dt], axis=1), axis=1)[:, -1]
        src, k = self.src, self.k
        last = np.array([agg if l == L - 1 else A_last for (l, _), agg in zip(swaps, aggs)])  # (n,) exit device
        away = last != src
        with np.errstate(invalid="ignore"):
            t = c0 + c1
            c1 = np.where(away, ((c1 + (t - t)) + k["x_bytes"] * self.spb[last, src]) + self.lat[last, src], c1)
        c0 = c0 + self.lm_s
        lat = c0 + c1
        return [PlanLatency(float(x), b + int(k["x_bytes"]) * bool(a))
                for x, b, a in zip(lat.tolist(), nbytes, away.tolist())]

    def _layer(self, lp) -> _Layer:
        hit = self.layers.get(id(lp))
        if hit is None or hit[0] is not lp:
            hit = self.layers[id(lp)] = (lp, _extract(lp, self.index, self.heads))
        return hit[1]

    def _row(self, lp) -> tuple:
        """``lp`` as ``layer_kernel.pack`` reads it (without the input device), memoised."""
        hit = self.rows.get(id(lp))
        if hit is None or hit[0] is not lp:
            index = self.index
            h = self.head_idx.get(id(lp.heads))
            if h is None or h[0] is not lp.heads:
                h = self.head_idx[id(lp.heads)] = (lp.heads, [index[d] for d in lp.heads])
            hit = self.rows[id(lp)] = (lp, (index[lp.proj], h[1], [index[s.device] for s in lp.ffn],
                                            [s.col_end - s.col_start for s in lp.ffn]))
        return hit[1]

    def _compute(self, todo: list) -> list:
        """(compute_s, transfer_s, bytes) of each (layer, input device), from a start at (0, 0): all
        rows in one compiled call (``layer_kernel.walk_rows``), the rows it flags (a NaN arrival
        in a fan-in: a path down) by the Python walk (``_one``); the same floats either way."""
        R = len(todo)
        out0, out1, nbytes, ok = np.empty(R), np.empty(R), np.empty(R, dtype=np.int64), np.zeros(R, dtype=bool)
        K.walk_rows(*self.walk_args, *K.pack([(A, *self._row(lp)) for lp, A in todo]), out0, out1, nbytes, ok)
        out = list(zip(out0.tolist(), out1.tolist(), nbytes.tolist()))
        if not ok.all():
            for i in np.flatnonzero(~ok).tolist():
                out[i] = self._one(*todo[i])
        return out

    def _one(self, lp, A: int) -> tuple[float, float, int]:
        """One layer's (compute_s, transfer_s, bytes) from input device ``A`` by the scalar walk
        (``layer_walk.walk``): the rows the compiled walk leaves to it (a NaN arrival in a fan-in,
        whose order only CPython's sort defines) come here."""
        rows = self._rows
        if rows is None:
            rows = self._rows = (self.lat.tolist(), self.spb.tolist(), self.speed.tolist(), self.mem_bw.tolist(),
                                 self.call_s.tolist())
        return walk(rows, self.k, self._layer(lp), A)
