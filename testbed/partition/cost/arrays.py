"""The ``decode`` model's token latency and activation bytes of whole placements, computed with
arrays over layers: the planners' inner evaluation (``ra.choice.plan_cost``), where
``latency.decode_cost`` walks every message in Python.

Same model, same arithmetic: every message's times are formed with the same operations in the
same order as ``latency._decode_layer`` (serialised NICs: a sender's uplink queues its sends in
the runtime's order, a receiver's downlink takes its fan-in in arrival order), so a plan's
latency is the same float (``tests/unit/test_cost_arrays.py`` compares them on many plans). What
differs is the bookkeeping: a layer's device lists are extracted once per ``LayerPlacement``, a
layer's cost once per (layer, input device) and problem, and the layers a plan does not share
with an earlier one are computed together, padded to the widest layer.
Small batches and wide layers are walked one by one (``layer_walk.walk``). Only the latency
and the bytes on the links are produced; reports use ``decode_cost``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from testbed.partition.cost.latency import decode_constants
from testbed.partition.cost.layer_walk import _Layer, _extract, walk

INF = float("inf")
WIDE_HEADS, WIDE_FFN = 24, 8  # wider layers are computed one by one (``PlanArrays._compute``)
SCALAR_ROWS = 6  # so are the layers of a batch of at most this many (one by one is faster there)


class PlanLatency(NamedTuple):
    token_latency_s: float
    bytes_moved: int  # activation bytes sent between devices for one token


def _pad(rows: list, fill) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + (fill,) * (width - len(r)) for r in rows])


def _cp_max(a0, a1, b0, b1, take):
    """``latency._cp_max`` per row where ``take``: (a if a0 + a1 >= b0 + b1 else b)."""
    pick_b = take & ~(a0 + a1 >= b0 + b1)
    return np.where(pick_b, b0, a0), np.where(pick_b, b1, a1)


def _fan_in(m0, m1, tau, valid):
    """``latency._Nics.fan_in`` per row over the valid messages (arrival pair, downlink seconds):
    (compute, transfer) of the last one to finish and whether a row had any. The queue runs over
    every row at once; past a row's last message its entries are (-inf, 0 s), which leave its
    queue as it is (``max(-inf, done + 0) = done``)."""
    order = np.lexsort((m0 + m1, ~valid), axis=1)  # valid first, by arrival, stable (as ``sorted``)
    R = m0.shape[0]
    rows = np.arange(R)[:, None]
    m0, m1, tau, valid = m0[rows, order], m1[rows, order], tau[rows, order], valid[rows, order]
    n = valid.sum(axis=1)  # (R,) messages per row, sorted first
    t = np.where(valid, m0 + m1, -INF)  # (R, M) arrivals
    gap = np.where(valid, tau, 0.0)  # (R, M) downlink seconds
    done = np.full(R, -INF)
    for k in range(int(n.max(initial=0))):
        done = np.maximum(t[:, k], done + gap[:, k])
    got = n > 0
    r, last = rows[:, 0], np.maximum(n - 1, 0)  # each row's last message
    l0, l1 = m0[r, last], m1[r, last]
    return np.where(got, l0, 0.0), np.where(got, l1 + (done - (l0 + l1)), 0.0), got


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
        # memos by identity (hashing a LayerPlacement is slow; plans share layer objects), each
        # entry holding its layer so that the id stays taken
        self.layers: dict = {}  # id(LayerPlacement) -> (it, _Layer)
        self.heads: dict = {}  # (id(heads tuple), proj) -> (it, the _Layer's head fields)
        self.deltas: dict = {}  # (id(LayerPlacement), input device) -> (it, compute_s, transfer_s, bytes)
        self._roof_rows: dict = {}  # block kind -> count -> roof per device (``roof_per_count``)
        every = np.arange(len(self.speed))
        self.proj_s = self.roof(every, self.k["proj_flops"], self.k["proj_read"])  # (devices,) the projection
        self.lm_s = float(self.roof(np.array([self.src]), self.k["lm_flops"], self.k["lm_read"])[0])  # the LM head

    def roof(self, dev: np.ndarray, flops, nbytes) -> np.ndarray:
        """``roofline.roofline_s`` per element (one call)."""
        speed, bw = self.speed[dev], self.mem_bw[dev]
        ok = speed > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            comp = flops / np.where(ok, speed, 1.0)
            mem = np.where(bw < INF, nbytes / np.where(bw < INF, bw, 1.0), 0.0)
        return np.where(ok, np.maximum(comp, mem) + self.call_s[dev], INF)

    def roof_per_count(self, kind: str, dev: np.ndarray, n: np.ndarray) -> np.ndarray:
        """``roof(dev, n * flops, n * read)`` per element for ``n`` heads (``kind = "head"``) or FFN
        columns (``"ffn_col"``): a row over devices per count, computed when the count first
        appears (the same elementwise operations as ``roof``, so the same floats), then looked up."""
        hit = self._roof_rows.get(kind)
        if hit is None:
            most = self.dims.n_kv_heads if kind == "head" else self.dims.ffn_dim
            hit = self._roof_rows[kind] = [np.full(most + 1, -1, dtype=np.intp), np.empty((0, len(self.speed)))]
        where, rows = hit  # count -> its row in ``rows`` (-1: not computed yet); (counts seen, devices)
        at = where[n]
        if (at < 0).any():
            new = sorted(set(n[at < 0].tolist()))
            cnt = np.array(new)[:, None]  # (new counts, 1)
            every = np.arange(len(self.speed))[None, :]
            flops, read = self.k[f"{kind}_flops"], self.k[f"{kind}_read"]
            where[new] = np.arange(len(rows), len(rows) + len(new))
            rows = hit[1] = np.concatenate([rows, self.roof(every, cnt * flops, cnt * read)])
            at = where[n]
        return rows[at, dev]

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

    def _compute(self, todo: list) -> list:
        """(compute_s, transfer_s, bytes) of each (layer, input device), from a start at (0, 0):
        layers with many head or FFN devices (a tensor-parallel split over tens of devices) one by
        one (``_one``: their queues are long sequential chains), the others together (``_batch``)
        unless they are at most ``SCALAR_ROWS``: then one by one too (a batch costs ~0.2 ms of
        array calls whatever its size, ``_one`` ~35 us a layer; the same floats either way)."""
        wide = [i for i, (lp, _) in enumerate(todo)
                if len(self._layer(lp).hdev) > WIDE_HEADS or len(self._layer(lp).fdev) > WIDE_FFN]
        if not wide and len(todo) > SCALAR_ROWS:
            return self._batch(todo)
        out: list = [None] * len(todo)
        for i in wide:
            out[i] = self._one(*todo[i])
        narrow = [i for i in range(len(todo)) if out[i] is None]
        if len(narrow) <= SCALAR_ROWS:
            for i in narrow:
                out[i] = self._one(*todo[i])
            return out
        for i, val in zip(narrow, self._batch([todo[i] for i in narrow])):
            out[i] = val
        return out

    def _one(self, lp, A: int) -> tuple[float, float, int]:
        """One layer's (compute_s, transfer_s, bytes) from input device ``A`` by the scalar walk
        (``layer_walk.walk``): wide layers (Galaxy's tensor-parallel plans over tens of devices)
        and small batches come here."""
        rows = self._rows
        if rows is None:
            rows = self._rows = (self.lat.tolist(), self.spb.tolist(), self.speed.tolist(), self.mem_bw.tolist(),
                                 self.call_s.tolist())
        return walk(rows, self.k, self._layer(lp), A)

    def _batch(self, todo: list) -> list:
        L = [self._layer(lp) for lp, _ in todo]
        A = np.array([a for _, a in todo])
        P = np.array([ly.P for ly in L])
        R, rows = len(L), np.arange(len(L))
        up = np.full((R, len(self.speed)), -INF)  # when each device's uplink frees (-inf: never used)
        with np.errstate(invalid="ignore"):  # a path that is down: inf - inf = nan, as in decode_cost
            a0, a1, nb_att = self._attention(L, A, P, up)
            pd0 = a0 + self.proj_s[P]
            o0, o1, nb_ffn = self._ffn(L, P, pd0, a1, up, rows)
        return [(float(x), float(y), int(b)) for x, y, b in zip(o0, o1, nb_att + nb_ffn)]

    def _attention(self, L, A, P, up):
        """Steps 1-2: x from A to the proj and head devices (A's uplink serialised), the heads, their
        outputs to the proj (fan-in in arrival order): ((compute, transfer) when the proj can start,
        bytes sent), recording each sender's uplink in ``up``."""
        k, lat, spb = self.k, self.lat, self.spb
        xb, hf, hr, hob = k["x_bytes"], k["head_flops"], k["head_read"], k["head_out_bytes"]
        rows = np.arange(len(L))[:, None]
        dst = _pad([ly.xdst for ly in L], -1)
        real = dst >= 0
        dst = np.where(real, dst, A[:, None])
        send = real & (dst != A[:, None])
        S = np.cumsum(np.where(send, xb * spb[A[:, None], dst], 0.0), axis=1)
        arr = np.where(send, S + lat[A[:, None], dst], 0.0)
        up[rows[:, 0], A] = S[:, -1]
        hd, hn = _pad([ly.hdev for ly in L], -1), _pad([ly.hn for ly in L], 0)
        hpos = _pad([ly.hpos for ly in L], 0)
        valid = hd >= 0
        hd = np.where(valid, hd, P[:, None])
        done0 = 0.0 + self.roof_per_count("head", hd, hn)
        done1 = arr[rows, hpos]
        onP = valid & (hd == P[:, None])
        att0, att1 = np.zeros(len(L)), arr[:, 0]
        pc0 = np.where(onP, done0, 0.0).sum(axis=1)  # at most one entry per row
        pc1 = np.where(onP, done1, 0.0).sum(axis=1)
        att0, att1 = _cp_max(att0, att1, pc0, pc1, onP.any(axis=1))
        out = valid & ~onP
        t = done0 + done1
        start = np.maximum(t, np.where(hd == A[:, None], up[rows, hd], -INF))
        nbytes = hn * hob
        tau = nbytes * spb[hd, P[:, None]]
        m1 = ((done1 + (start - t)) + tau) + lat[hd, P[:, None]]
        sent_up = start + tau
        r_out, c_out = np.nonzero(out)
        up[r_out, hd[r_out, c_out]] = sent_up[r_out, c_out]
        g0, g1, got = _fan_in(done0, m1, tau, out)
        att0, att1 = _cp_max(att0, att1, g0, g1, got)
        nb = send.sum(axis=1) * int(xb) + np.where(out, nbytes, 0).astype(np.int64).sum(axis=1)
        return att0, att1, nb

    def _ffn(self, L, P, pd0, pd1, up, rows):
        """Steps 3-4: h from the proj to the FFN devices in shard order (the proj's uplink also
        carries its own partial when it holds a shard), the shards, the partials into the
        aggregator (fan-in in arrival order): (compute, transfer) of the layer's output, bytes."""
        k, lat, spb = self.k, self.lat, self.spb
        xb = k["x_bytes"]
        fd, fc = _pad([ly.fdev for ly in L], -1), _pad([ly.fcols for ly in L], 0)
        agg, Pc = fd[:, 0], P[:, None]
        t = pd0 + pd1
        F = fd.shape[1]
        # (rows, F) per shard, everything but the uplinks' queues
        real = fd >= 0
        dev = np.where(real, fd, Pc)  # the shard's device (the proj on padding)
        move = real & (dev != Pc)  # h crosses a link
        tau, hop = xb * spb[Pc, dev], lat[Pc, dev]  # h: uplink seconds, latency
        tau2, hop2 = xb * spb[dev, agg[:, None]], lat[dev, agg[:, None]]  # the partial to the aggregator
        done0 = pd0[:, None] + self.roof_per_count("ffn_col", dev, fc)  # the shard computed
        valid = real.copy()
        valid[:, 0] = False  # the aggregator's own shard sends nothing
        m1 = np.zeros((len(L), F))
        nb = (move.sum(axis=1) + real[:, 1:].sum(axis=1)) * int(xb)
        out0 = out1 = None
        for f in range(F):
            upP = up[rows, P]
            sP = np.maximum(t, upP)
            arr1 = np.where(move[:, f], ((pd1 + (sP - t)) + tau[:, f]) + hop[:, f], pd1)
            up[rows, P] = np.where(move[:, f], sP + tau[:, f], upP)
            if f == 0:
                out0, out1 = done0[:, 0], arr1
                continue
            d = dev[:, f]
            t2 = done0[:, f] + arr1
            upd = up[rows, d]
            s2 = np.maximum(t2, upd)
            m1[:, f] = ((arr1 + (s2 - t2)) + tau2[:, f]) + hop2[:, f]
            up[rows, d] = np.where(real[:, f], s2 + tau2[:, f], upd)
        m0, taus = done0, tau2
        g0, g1, got = _fan_in(m0, m1, taus, valid)
        out0, out1 = _cp_max(out0, out1, g0, g1, got)
        return out0, out1, nb
