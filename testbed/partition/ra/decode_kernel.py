"""RA's ``decode``-model greedy passes compiled (numba): ``ra.decode._heads_decode`` and
``_ffn_decode``'s loops with the same operations in the same order, so the same floats and the
same picks, at a few microseconds a pass instead of ~40.

The passes keep the devices they already use in a heap of ``(key, device)``; here that set is a
short array scanned for its least ``(key, device)`` — the heap's top, as long as no key is NaN
(then a heap's order is its own algorithm's): a pass that meets a NaN key returns ``NAN`` and
the caller runs the Python pass. ``r`` (bytes left per device) is updated only when a pass
succeeds. Status: ``OK``, ``NAN``, or the index of the block that fit nowhere (>= 0).
Compiled at import for the one signature each pass is called with (numba's disk cache).
"""
from __future__ import annotations

import numpy as np
from numba import njit

OK, NAN = -1, -2


@njit(cache=True)
def _least(ukey, udev, size):
    """Index of the least (key, device) among the first ``size`` entries (-1 if none)."""
    best = -1
    for i in range(size):
        if best < 0 or ukey[i] < ukey[best] or (ukey[i] == ukey[best] and udev[i] < udev[best]):
            best = i
    return best


@njit("Tuple((f8, f8, i8, i8))(i8, i8, i8, f8, f8[:, :], f8[:, :], f8[:, :], f8[:], f8[:], b1[:], i8[:], f8[:], "
      "f8[:], i8[:], i8[:])", cache=True)
def heads_pass(A, P, G, hb, tau_x, lat, head_inc, cur, mig, allowed, devs, keys, r, counts, order):
    """``_heads_decode`` for input ``A``, anchor ``P``, ``G`` head groups of ``hb`` bytes: returns
    (finish, penalties, devices used, status); ``counts[j]`` heads per device and ``order`` the
    devices in first-pick order (the first ``devices used``). ``devs``/``keys``: the unused devices
    in their fixed order (``_order``)."""
    n_dev = lat.shape[0]
    rr = r.copy()
    inbase = np.zeros(n_dev, dtype=np.bool_)
    bt = np.zeros(n_dev)
    ukey, udev = np.empty(n_dev), np.empty(n_dev, dtype=np.int64)
    size = 0
    baseP = lat[A, P] + tau_x[A, P] if P != A else 0.0
    inbase[P] = True
    inbase[A] = True
    bt[P] = baseP + lat[P, P]
    bt[A] = 0.0 + lat[A, P]
    for j in (P, A):
        if allowed[j] and (size == 0 or udev[0] != j):
            ukey[size] = bt[j] + head_inc[P, j] + (0.0 if cur[j] > 0 else mig[j])
            udev[size] = j
            if ukey[size] != ukey[size]:
                return 0.0, 0.0, 0, NAN
            size += 1
    m, nxt = len(devs), 0
    up = tau_x[A, P] if P != A else 0.0
    counts[:] = 0
    n_used = 0
    finish, pens = baseP, 0.0
    for g in range(G):
        top = _least(ukey, udev, size)
        while top >= 0 and rr[udev[top]] < hb:
            size -= 1
            ukey[top], udev[top] = ukey[size], udev[size]
            top = _least(ukey, udev, size)
        while nxt < m:
            d = devs[nxt]
            if rr[d] >= hb and not inbase[d]:
                break
            nxt += 1
        if nxt < m and keys[nxt] != keys[nxt]:
            return 0.0, 0.0, 0, NAN
        use_top = top >= 0 and (nxt == m or ukey[top] <= up + keys[nxt])
        if use_top:
            j = udev[top]
        elif nxt == m:
            return 0.0, 0.0, 0, g
        else:
            j = devs[nxt]
            nxt += 1
            up_j = up + tau_x[A, j]
            base_j = up_j + lat[A, j]
            up = up_j
            inbase[j] = True
            bt[j] = base_j + lat[j, P]
        k = counts[j]
        cj, btj, incj = cur[j], bt[j], head_inc[P, j]
        if k >= cj:
            pens += mig[j]
        if k == 0:
            order[n_used] = j
            n_used += 1
        k += 1
        counts[j] = k
        rr[j] -= hb
        x = btj + k * incj
        if x > finish:
            finish = x
        key = btj + (k + 1) * incj + (0.0 if k < cj else mig[j])
        if key != key:
            return 0.0, 0.0, 0, NAN
        if use_top:
            ukey[top] = key
        else:
            ukey[size], udev[size] = key, j
            size += 1
    r[:] = rr
    return finish, pens, n_used, OK


@njit("Tuple((f8, f8, i8, i8))(i8, i8, i8, f8, f8[:, :], f8[:, :], f8[:], f8[:], f8[:], f8[:], i8[:], f8[:], f8[:], "
      "i8[:], i8[:])", cache=True)
def ffn_pass(P, agg, K, cb, tau_x, lat, back, chunk_c, cur, mig, devs, keys, r, counts, order):
    """``_ffn_decode`` after the projection on ``P`` with aggregator ``agg`` (which has room for
    a chunk), ``K`` chunks of ``cb`` bytes: returns (finish, penalties, devices used, status),
    ``counts``/``order`` as ``heads_pass``'s; ``back = tab.back[agg]``; ``devs``/``keys``: the
    unused devices in their fixed order (``_Picker``'s)."""
    n_dev = lat.shape[0]
    rr = r.copy()
    inbase = np.zeros(n_dev, dtype=np.bool_)
    base = np.zeros(n_dev)
    ukey, udev = np.empty(K + 1), np.empty(K + 1, dtype=np.int64)
    base[agg] = tau_x[P, agg] + lat[P, agg] if agg != P else 0.0
    inbase[agg] = True
    pens = 0.0 if cur[agg] > 0 else mig[agg]
    finish = base[agg] + chunk_c[agg]
    counts[:] = 0
    counts[agg] = 1
    order[0] = agg
    n_used = 1
    rr[agg] -= cb
    ukey[0] = base[agg] + 2 * chunk_c[agg] + back[agg] + (0.0 if 1 < cur[agg] else mig[agg])
    udev[0] = agg
    if ukey[0] != ukey[0]:
        return 0.0, 0.0, 0, NAN
    size = 1
    up = tau_x[P, agg] if agg != P else 0.0
    m, nxt = len(devs), 0
    for c in range(K - 1):
        top = _least(ukey, udev, size)
        while top >= 0 and rr[udev[top]] < cb:
            size -= 1
            ukey[top], udev[top] = ukey[size], udev[size]
            top = _least(ukey, udev, size)
        while nxt < m and (rr[devs[nxt]] < cb or inbase[devs[nxt]]):
            nxt += 1
        fresh = up + keys[nxt] if nxt < m else np.inf
        if fresh != fresh:
            return 0.0, 0.0, 0, NAN
        if top >= 0 and ukey[top] <= fresh:
            j = udev[top]
            size -= 1  # popped (a new entry for j is pushed below)
            ukey[top], udev[top] = ukey[size], udev[size]
        elif nxt == m:
            return 0.0, 0.0, 0, c
        else:
            j = devs[nxt]
            nxt += 1
            base[j] = up + tau_x[P, j] + lat[P, j]
            up += tau_x[P, j]
            inbase[j] = True
        k = counts[j]
        pens += 0.0 if k < cur[j] else mig[j]
        if k == 0:
            order[n_used] = j
            n_used += 1
        k += 1
        counts[j] = k
        rr[j] -= cb
        x = base[j] + k * chunk_c[j] + back[j]
        if x > finish:
            finish = x
        key = base[j] + (k + 1) * chunk_c[j] + back[j] + (0.0 if k < cur[j] else mig[j])
        if key != key:
            return 0.0, 0.0, 0, NAN
        ukey[size], udev[size] = key, j
        size += 1
    r[:] = rr
    return finish, pens, n_used, OK
