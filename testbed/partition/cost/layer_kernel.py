"""The ``decode`` cost of many (layer, input device) rows in one compiled call (numba): the same
operations in the same order as ``layer_walk.walk`` (itself ``latency._decode_layer``'s), so the
same floats, at ~0.5 us a layer instead of 17-29 us. Compiled at import for the one signature
it is called with (cached on disk by numba; ``scripts/setup.sh`` fills the cache: a cold compile
takes seconds, loading it ~0.2 s once per process).

Rows are packed flat (``pack``): per row its input device and proj, and its x destinations,
head devices and FFN devices as slices of shared arrays. A fan-in whose arrival keys include a
NaN (a path down: ``inf - inf`` in a queue) is not sorted here — CPython's sort orders NaN keys
by its own algorithm — the row is flagged and the caller walks it in Python.
"""
from __future__ import annotations

import numpy as np
from numba import njit

INF = np.inf

# ``decode_constants`` keys, in the order the kernel reads them
CONSTANTS = ("x_bytes", "head_flops", "head_read", "head_out_bytes", "proj_flops", "proj_read",
             "ffn_col_flops", "ffn_col_read")


@njit(cache=True)
def _pymax(a, b):
    """Python's ``max(a, b)`` on floats (the first unless the second is larger: NaN keeps ``a``)."""
    return b if b > a else a


@njit(cache=True)
def _roof(flops, read, speed, bw, call_s):
    """``roofline.roofline_s(flops, read, speed, bw, call_s)``."""
    if speed <= 0:
        return INF
    mem = read / bw if bw < INF else 0.0
    return _pymax(flops / speed, mem) + 1 * call_s


@njit(cache=True)
def _send(a, b, n, r0, r1, lat, spb, up, used):
    """``walk.send``: (r0, r1 at b, bytes counted); ``up[a]`` is when a's uplink frees where ``used[a]``."""
    if a == b:
        return r0, r1, 0
    tau = n * spb[a, b]
    t = r0 + r1
    start = _pymax(t, up[a]) if used[a] else t
    up[a] = start + tau
    used[a] = True
    return r0, r1 + (start - t) + tau + lat[a, b], np.int64(n)


@njit(cache=True)
def _fan_in(m0, m1, tau, k, key, idx):
    """``latency.fan_in_serial`` over the first ``k`` messages: (r0, r1, ok); ok False when an
    arrival key is NaN (the caller walks the row in Python). ``key``/``idx``: scratch; the
    messages are taken in arrival order by a stable insertion sort (as ``sorted``; fan-ins are short)."""
    for i in range(k):
        key[i] = m0[i] + m1[i]
        if key[i] != key[i]:
            return 0.0, 0.0, False
        j = i - 1
        while j >= 0 and key[idx[j]] > key[i]:
            idx[j + 1] = idx[j]
            j -= 1
        idx[j + 1] = i
    done = -INF
    o0, o1 = m0[0], m1[0]
    for n in range(k):
        i = idx[n]
        t = m0[i] + m1[i]
        fin = _pymax(t, done + tau[i])
        done = fin
        o0, o1 = m0[i], m1[i] + (fin - t)
    return o0, o1, True


@njit(cache=True)
def _later(r0, r1, m0, m1, tau, k, key, idx):
    """The later of (r0, r1) and the last of ``k`` messages' fan-in (``_cp_max``; (r0, r1) when
    there are none), and False where the fan-in meets a NaN arrival."""
    if k == 0:
        return r0, r1, True
    g0, g1, fine = _fan_in(m0, m1, tau, k, key, idx)
    if not fine:
        return 0.0, 0.0, False
    if not r0 + r1 >= g0 + g1:
        return g0, g1, True
    return r0, r1, True


@njit(cache=True)
def _tally(ids, weights, unit, count, devs):
    """Add each ``ids[i]``'s weight (1 where ``unit``, else ``weights[i]``) to ``count`` and list
    the devices in first-appearance order in ``devs``; returns how many."""
    n = 0
    for i in range(len(ids)):
        j = ids[i]
        if count[j] == 0:
            devs[n] = j
            n += 1
        count[j] += 1 if unit else weights[i]
    return n


@njit(cache=True)
def scratch(n_dev, width):
    """Work arrays for ``walk_layer`` over ``n_dev`` devices, fan-ins of up to ``width`` messages."""
    return (np.empty(n_dev), np.zeros(n_dev, dtype=np.bool_), np.zeros(n_dev), np.zeros(n_dev), np.zeros(n_dev),
            np.empty(width, dtype=np.int64), np.empty(width), np.empty(width), np.empty(width), np.empty(width),
            np.empty(width, dtype=np.int64))


@njit(cache=True)
def walk_layer(lat, spb, speed, bw, call_s, kc, a, p, heads, sdev, scols, work):
    """One layer's (compute_s, transfer_s, bytes, ok) from input device ``a``: proj ``p``, each
    head group's device ``heads``, FFN shards' devices ``sdev`` (aggregator first) and columns
    ``scols``, as ``layer_walk._extract`` reads a ``LayerPlacement`` (devices in first-appearance
    order); ok False where a fan-in has a NaN arrival (the Python walk must take it). ``kc``:
    ``CONSTANTS``' values; ``work``: ``scratch``'s arrays (``count`` is left all zero)."""
    up, used, arr0, arr1, count, devs, m0, m1, tau, key, idx = work
    xb, hf, hr, hob, pf, pr, fcf, fcr = kc[0], kc[1], kc[2], kc[3], kc[4], kc[5], kc[6], kc[7]
    nb = np.int64(0)
    used[:] = False
    n_h = _tally(heads, heads, True, count, devs)  # head groups per device
    arr0[p], arr1[p], b = _send(a, p, xb, 0.0, 0.0, lat, spb, up, used)  # x to the proj first,
    nb += b
    for i in range(n_h):  # then to the head devices
        d = devs[i]
        if d != p:
            arr0[d], arr1[d], b = _send(a, d, xb, 0.0, 0.0, lat, spb, up, used)
            nb += b
    att0, att1 = arr0[p], arr1[p]
    k = 0
    for i in range(n_h):
        j = devs[i]
        c = count[j]
        count[j] = 0
        d0, d1 = arr0[j] + _roof(c * hf, c * hr, speed[j], bw[j], call_s[j]), arr1[j]
        if j == p:
            if not att0 + att1 >= d0 + d1:
                att0, att1 = d0, d1
            continue
        size = c * hob
        m0[k], m1[k], b = _send(j, p, size, d0, d1, lat, spb, up, used)
        tau[k] = size * spb[j, p]
        nb += b
        k += 1
    att0, att1, fine = _later(att0, att1, m0, m1, tau, k, key, idx)
    if not fine:
        return 0.0, 0.0, nb, False
    pd0, pd1 = att0 + _roof(pf, pr, speed[p], bw[p], call_s[p]), att1
    n_f = _tally(sdev, scols, False, count, devs)  # FFN columns per device
    agg = devs[0]
    o0 = o1 = 0.0
    k = 0
    for i in range(n_f):  # shard order, aggregator first
        dev = devs[i]
        c = count[dev]
        count[dev] = 0
        h0, h1, b = _send(p, dev, xb, pd0, pd1, lat, spb, up, used)
        nb += b
        d0, d1 = h0 + _roof(c * fcf, c * fcr, speed[dev], bw[dev], call_s[dev]), h1
        if dev == agg:
            o0, o1 = d0, d1
            continue
        m0[k], m1[k], b = _send(dev, agg, xb, d0, d1, lat, spb, up, used)
        tau[k] = xb * spb[dev, agg]
        nb += b
        k += 1
    o0, o1, fine = _later(o0, o1, m0, m1, tau, k, key, idx)
    return o0, o1, nb, fine


@njit("void(f8[:, :], f8[:, :], f8[:], f8[:], f8[:], f8[:], i8[:], i8[:], i8[:, :], i8[:], f8[:], i8[:], f8[:], f8[:], "
      "i8[:], b1[:])", cache=True)
def walk_rows(lat, spb, speed, bw, call_s, kc, A, P, heads, sdev, scols, soff, out0, out1, nbytes, ok):
    """``walk_layer`` per row r into ``out0/out1/nbytes/ok[r]``: a row is its input device ``A[r]``,
    proj ``P[r]``, head group devices ``heads[r]`` and FFN shards ``sdev/scols[soff[r]:soff[r + 1]]``."""
    width = max(heads.shape[1], np.max(soff[1:] - soff[:-1])) if len(A) else 0
    work = scratch(lat.shape[0], width)
    for r in range(len(A)):
        s0, s1 = soff[r], soff[r + 1]
        out0[r], out1[r], nbytes[r], ok[r] = walk_layer(lat, spb, speed, bw, call_s, kc, A[r], P[r], heads[r],
                                                        sdev[s0:s1], scols[s0:s1], work)


def pack(rows: list) -> tuple:
    """The arrays ``walk_rows`` reads after ``kc``, from rows (input device, proj, head group
    devices, FFN shard devices, their columns), devices as indices."""
    A, P, heads, sdev, scols, soff = [], [], [], [], [], [0]
    for a, p, h, fd, fc in rows:
        A.append(a)
        P.append(p)
        heads.append(h)
        sdev += fd
        scols += fc
        soff.append(len(sdev))
    i64 = np.int64
    return (np.array(A, dtype=i64), np.array(P, dtype=i64), np.array(heads, dtype=i64), np.array(sdev, dtype=i64),
            np.array(scols, dtype=np.float64), np.array(soff, dtype=i64))
