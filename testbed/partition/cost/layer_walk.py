"""A layer as device indices (``_Layer``) and the scalar walk of one layer's ``decode`` cost over
those indices (``walk``): the same operations in the same order as ``latency._decode_layer``,
without its string-keyed lookups. ``cost.arrays`` uses it for the layers the compiled walk
(``layer_kernel``) leaves to Python (a NaN arrival in a fan-in); the tests use it as the
compiled walk's reference."""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from testbed.partition.cost.latency import fan_in_serial
from testbed.partition.cost.roofline import roofline_s


class _Layer(NamedTuple):
    """One layer's devices as indices: proj; x destinations in send order (proj first); head
    devices and their group counts (first-appearance order) and each one's position among the
    destinations; FFN devices (aggregator first) and their columns."""

    P: int
    xdst: tuple
    hdev: tuple
    hn: tuple
    hpos: tuple
    fdev: tuple
    fcols: tuple


def _extract(lp, index: dict, heads_memo: dict) -> _Layer:
    """``lp``'s devices as indices. The heads' part is memoised per (heads tuple object, proj) in
    ``heads_memo`` (a planner's variants of a layer that move only FFN columns share the tuple)."""
    P = index[lp.proj]
    key = (id(lp.heads), P)
    hit = heads_memo.get(key)
    if hit is None or hit[0] is not lp.heads:
        counts = Counter(map(index.__getitem__, lp.heads))  # first-appearance order
        xdst = (P, *(j for j in counts if j != P))
        pos = {j: i for i, j in enumerate(xdst)}
        hit = heads_memo[key] = (lp.heads, xdst, tuple(counts), tuple(counts.values()),
                                 tuple(pos[j] for j in counts))
    cols: dict[int, int] = {}
    for s in lp.ffn:
        j = index[s.device]
        cols[j] = cols.get(j, 0) + (s.col_end - s.col_start)
    return _Layer(P, *hit[1:], tuple(cols), tuple(cols.values()))


def walk(rows: tuple, k: dict, ly: _Layer, A: int) -> tuple[float, float, int]:
    """One layer's (compute_s, transfer_s, bytes) from input device ``A``: the scalar walk of
    ``latency._decode_layer`` (serial NICs, from a start at (0, 0)) over device indices and Python
    lists, with its operations in its order (the same floats; ``Net``'s string-keyed lookups and
    the per-link byte tally are what cost there). ``rows``: (latency, seconds per byte, FLOP/s,
    memory bandwidth, seconds per call) as lists; ``k``: ``latency.decode_constants``."""
    lat, spb, speed, bw, call_s = rows
    xb, P = k["x_bytes"], ly.P
    up: dict[int, float] = {}  # device -> when its uplink frees
    nbytes = 0

    def send(a: int, b: int, n: float, r0: float, r1: float) -> tuple[float, float]:
        nonlocal nbytes
        if a == b:
            return r0, r1
        tau = n * spb[a][b]
        t = r0 + r1
        start = max(t, up.get(a, t))
        up[a] = start + tau
        nbytes += int(n)
        return r0, r1 + (start - t) + tau + lat[a][b]

    def call(j: int, flops: float, read: float) -> float:
        return roofline_s(flops, read, speed[j], bw[j], call_s[j])

    arrive = {d: send(A, d, xb, 0.0, 0.0) for d in ly.xdst}
    att, outs = arrive[P], []
    hf, hr, hob = k["head_flops"], k["head_read"], k["head_out_bytes"]
    for j, n in zip(ly.hdev, ly.hn):
        done = (arrive[j][0] + call(j, n * hf, n * hr), arrive[j][1])
        if j == P:
            att = att if att[0] + att[1] >= done[0] + done[1] else done
            continue
        outs.append((j, done, n * hob))
    msgs = [(send(j, P, size, *done), size * spb[j][P]) for j, done, size in outs]
    got = fan_in_serial(msgs)
    if got is not None:
        att = att if att[0] + att[1] >= got[0] + got[1] else got
    pd = (att[0] + call(P, k["proj_flops"], k["proj_read"]), att[1])
    agg, out, msgs = ly.fdev[0], None, []
    fcf, fcr = k["ffn_col_flops"], k["ffn_col_read"]
    for dev, c in zip(ly.fdev, ly.fcols):  # shard order, aggregator first
        arr = send(P, dev, xb, *pd)
        done = (arr[0] + call(dev, c * fcf, c * fcr), arr[1])
        if dev == agg:
            out = done
            continue
        msgs.append((send(dev, agg, xb, *done), xb * spb[dev][agg]))
    got = fan_in_serial(msgs)
    if got is not None:
        out = out if out[0] + out[1] >= got[0] + got[1] else got
    return out[0], out[1], nbytes
