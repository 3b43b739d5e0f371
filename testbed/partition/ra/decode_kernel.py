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
def _take(j, counts, order, n_used, r, nbytes):
    """Device ``j`` takes one more block of ``nbytes``: its count, first-pick order and room;
    returns (its blocks before, devices used)."""
    k = counts[j]
    if k == 0:
        order[n_used] = j
        n_used += 1
    counts[j] = k + 1
    r[j] -= nbytes
    return k, n_used


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
        k, n_used = _take(j, counts, order, n_used, rr, hb)
        cj, btj, incj = cur[j], bt[j], head_inc[P, j]
        if k >= cj:
            pens += mig[j]
        k += 1
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
        k, n_used = _take(j, counts, order, n_used, rr, cb)
        pens += 0.0 if k < cur[j] else mig[j]
        k += 1
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


NOFIT = -3


@njit(cache=True)
def _sorted_keys(static, allowed_idx, devs, keys):
    """``decode._unused_in_order``: ``allowed_idx`` by ``static`` (stable) into ``devs``/``keys``;
    False when a key is NaN (a stable sort's order is then its own algorithm's)."""
    for i in range(len(static)):
        if static[i] != static[i]:
            return False
    order = np.argsort(static, kind="mergesort")
    for i in range(len(order)):
        devs[i], keys[i] = allowed_idx[order[i]], static[order[i]]
    return True


@njit("Tuple((i8, i8, i8, i8, i8))(i8, i8[:], f8[:], f8[:], i8, f8, f8, i8, f8, f8[:, :], f8[:, :], f8[:, :], "
      "f8[:, :], f8[:], f8[:], f8[:], f8[:], f8[:], b1[:], f8[:, :], f8[:, :], f8[:], f8[:], f8[:, :], f8[:], i8[:], "
      "f8[:], i8[:], i8[:], i8[:], i8[:])", cache=True)
def plan_layer(A, anchors, fixed, resid, G, hb, proj_b, K, cb, tau_x, lat, head_inc, back, chunk_c, cur_h, mig_h,
               cur_c, mig_c, allowed, reach_al, head_tail_al, pen0_h_al, chunk_al, back_al, pen0_c_al, allowed_idx,
               r_out, h_counts, h_order, f_counts, f_order):
    """``greedy._plan_layer`` for a layer that is not the last, under ``decode`` and not thorough:
    per anchor ``anchors[i]`` (cost ``fixed[i]`` for the projection there), heads first then the
    FFN with the cheapest aggregator, or FFN first where heads first does not fit; the anchor with
    the least total (the first on ties). The unused devices' orders (``decode._order``: heads,
    aggregator, FFN chunks) are sorted here from ``decode._Tables``' ``*_al`` rows and the layer's
    penalties. Returns (status, anchor, aggregator,
    heads devices used, FFN devices used): the bytes left into ``r_out``, blocks per device and
    first-pick order into ``h_counts/h_order`` and ``f_counts/f_order``. Status ``NOFIT``: no
    anchor fits (the caller raises the Python pass's error); ``NAN``: the caller runs the Python one."""
    n_dev, n_al = lat.shape[0], len(allowed_idx)
    f_devs, f_keys = np.empty(n_al, dtype=np.int64), np.empty(n_al)
    h_devs, h_keys = np.empty(n_al, dtype=np.int64), np.empty(n_al)
    agg_devs, agg_keys = np.empty(n_al, dtype=np.int64), np.empty(n_al)
    hc, ho, fc, fo = (np.empty(n_dev, dtype=np.int64), np.empty(n_dev, dtype=np.int64),
                      np.empty(n_dev, dtype=np.int64), np.empty(n_dev, dtype=np.int64))
    best_total, best_P, best_agg, best_nh, best_nf = 0.0, -1, -1, 0, 0
    for i in range(len(anchors)):
        P = anchors[i]
        r0 = resid.copy()
        r0[P] -= proj_b
        if not (_sorted_keys(reach_al[A] + head_tail_al[P] + pen0_h_al, allowed_idx, h_devs, h_keys)
                and _sorted_keys(reach_al[P] + chunk_al + pen0_c_al, allowed_idx, agg_devs, agg_keys)):
            return NAN, -1, -1, 0, 0
        for order in (0, 1):  # heads first; FFN first only when heads first did not fit
            r = r0.copy()
            h_t = h_pen = f_t = f_pen = 0.0
            nh = nf = agg = 0
            st = OK
            for step in range(2):  # heads then FFN (order 0), FFN then heads (order 1)
                if step == order:
                    h_t, h_pen, nh, st = heads_pass(A, P, G, hb, tau_x, lat, head_inc, cur_h, mig_h, allowed, h_devs,
                                                    h_keys, r, hc, ho)
                else:
                    agg, st = -1, NOFIT  # the cheapest aggregator with room (``_ffn_decode``, agg None)
                    for t in range(n_al):
                        if r[agg_devs[t]] >= cb and agg_keys[t] < np.inf:
                            agg, st = agg_devs[t], OK
                            break
                    if st == OK:
                        if not _sorted_keys(reach_al[P] + chunk_al + back_al[agg] + pen0_c_al, allowed_idx, f_devs,
                                            f_keys):
                            return NAN, -1, -1, 0, 0
                        f_t, f_pen, nf, st = ffn_pass(P, agg, K, cb, tau_x, lat, back[agg], chunk_c, cur_c, mig_c,
                                                      f_devs, f_keys, r, fc, fo)
                if st == NAN:
                    return NAN, -1, -1, 0, 0
                if st != OK:
                    break
            if st != OK:
                continue
            total = h_t + f_t + h_pen + f_pen + fixed[i] + 0.0
            if best_P < 0 or total < best_total:
                best_total, best_P, best_agg, best_nh, best_nf = total, P, agg, nh, nf
                r_out[:] = r
                h_counts[:] = hc
                h_order[:] = ho
                f_counts[:] = fc
                f_order[:] = fo
            break  # this anchor's plan (FFN first is tried only when heads first found none)
    if best_P < 0:
        return NOFIT, -1, -1, 0, 0
    return OK, best_P, best_agg, best_nh, best_nf
