"""One round of RA's step 6 (``ra.leveling``) compiled (numba), for plans whose objective is their
latency (no current placement to migrate from) under the ``decode`` model: the Python round of
``ra.leveling_moves`` — the candidates off the
device with the largest peak (``_candidates``), their order and de-duplication by signature within
the evaluation budget (``_best_move``), each one's plan latency (``cost.arrays.latencies_swapped``:
the moved layer, the next layer from its new input, the layers summed in order) and the best by
objective added per byte. The same operations in the same order as those functions, so the same
floats and the same move; a round that meets a NaN fan-in arrival returns ``NAN`` and the caller
runs the Python round. Compiled at import for its one signature (numba's disk cache).

The plan comes as arrays: ``heads`` (layers, head groups) device per group, ``proj`` (layers,),
the FFN shards flat (``sdev``, ``sc0``, ``sc1``: device, first and end column; layer l's are
``soff[l]:soff[l + 1]``, aggregator first) and ``canon`` (layers,): one number per distinct layer
VALUE (``_Memo.canon``), which is what the signature compares.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from testbed.partition.cost.layer_kernel import scratch, walk_layer

OK, NAN = -1, -2


@njit(cache=True)
def _rank(key, usable, near, devs, keys):
    """``_ranked``: the usable devices, near ones by (key, index) first, then far ones, into
    ``devs``/``keys``; returns (count, where the far ones start)."""
    n, start = 0, 0
    for far in (False, True):
        if far:
            start = n
        idx = np.flatnonzero(usable & (near != far))
        for j in idx[np.argsort(key[idx], kind="mergesort")]:
            devs[n], keys[n] = j, key[j]
            n += 1
    return n, start


@njit(cache=True)
def _pick(devs, n, a, room, nbytes, n_dest, out):
    """The first ``n_dest`` of ``devs[:n]`` other than ``a`` with ``room`` for ``nbytes``, into
    ``out`` as positions in ``devs`` (``_candidates``' filter); returns how many."""
    taken = 0
    for i in range(n):
        j = devs[i]
        if j != a and room[j] >= nbytes:
            out[taken] = i
            taken += 1
            if taken == n_dest:
                break
    return taken


@njit(cache=True)
def _moved_shards(sdev, sc0, sc1, si, cols, dest, od, o0, o1):
    """``leveling_moves._moved_layer``'s FFN part: the shards with ``cols`` columns cut off the end of
    shard ``si`` moved to ``dest`` (joining dest's shard that starts where they end), into
    ``od/o0/o1``; returns the count."""
    s_dev, s0, s1 = sdev[si], sc0[si], sc1[si]
    c0 = s1 - cols
    n, merged = 0, False
    for t in range(len(sdev)):
        if t == si:
            if c0 > s0:
                od[n], o0[n], o1[n] = s_dev, s0, c0
                n += 1
        elif sdev[t] == dest and sc0[t] == s1:
            od[n], o0[n], o1[n] = dest, c0, sc1[t]
            n += 1
            merged = True
        else:
            od[n], o0[n], o1[n] = sdev[t], sc0[t], sc1[t]
            n += 1
    if not merged:
        if si == 0 and c0 == s0:  # the whole aggregator shard moved: the destination aggregates
            for t in range(n, 0, -1):
                od[t], o0[t], o1[t] = od[t - 1], o0[t - 1], o1[t - 1]
            od[0], o0[0], o1[0] = dest, c0, s1
        else:
            od[n], o0[n], o1[n] = dest, c0, s1
        n += 1
    return n


@njit(cache=True)
def _put(cand, n, far, key, l, kind, blk, cols, nbytes, dest):
    """Candidate row ``n``: (far, key, layer, kind, block, columns, bytes, destination)."""
    cand[n, 0], cand[n, 1], cand[n, 2], cand[n, 3] = far, key, l, kind
    cand[n, 4], cand[n, 5], cand[n, 6], cand[n, 7] = blk, cols, nbytes, dest


@njit(cache=True)
def _before(c, i, j):
    """Candidate row ``i`` sorts before row ``j`` by (far, key, layer, destination)."""
    for f in (0, 1, 2, 7):
        if c[i, f] != c[j, f]:
            return c[i, f] < c[j, f]
    return False


@njit(cache=True)
def _gather(heads, sdev, sc0, sc1, soff, a, room, chunk_cols, n_dest, only, head_b, col_b, rank, rkey, rcount,
            widest):
    """``_candidates``: the moves of one head group or one FFN chunk per layer off device ``a``
    to the first ``n_dest`` ranked destinations with room, as rows (far, key, layer, kind,
    block, columns, bytes, destination) in generation order; returns (rows, how many)."""
    L, G = heads.shape[0], heads.shape[1]
    cand = np.empty((L * (widest + 1) * n_dest, 8))
    n = 0
    picks = np.empty(n_dest, dtype=np.int64)
    for l in range(L):
        if not only[l]:
            continue
        s0, s1 = soff[l], soff[l + 1]
        g_last = -1
        for g in range(G):
            if heads[l, g] == a:
                g_last = g
        if g_last >= 0:
            k = _pick(rank[0, l], rcount[0, l, 0], a, room, head_b, n_dest, picks)
            for t in range(k):
                i = picks[t]
                _put(cand, n, i >= rcount[0, l, 1], rkey[0, l, i], l, 0, g_last, 0, head_b, rank[0, l, i])
                n += 1
        for i in range(s0, s1):
            if sdev[i] != a:
                continue
            c = min(chunk_cols, sc1[i] - sc0[i])
            nbytes = c * col_b
            k = _pick(rank[1, l], rcount[1, l, 0], a, room, nbytes, n_dest, picks)
            for t in range(k):
                r = picks[t]
                _put(cand, n, r >= rcount[1, l, 1], rkey[1, l, r], l, 1, i - s0, c, nbytes, rank[1, l, r])
                n += 1
    return cand, n


@njit(cache=True)
def _distinct(cand, n, canon, inp, sc0, sc1, soff, budget):
    """``_best_move``'s evaluation list: the candidate rows by (far, key, layer, destination)
    (stable), skipping a move whose signature an earlier one has, at most ``budget``; returns
    (row indices, how many)."""
    L = len(canon)
    # stable sort by (far, key, layer, destination): insertion sort over row indices
    order = np.arange(n)
    for i in range(1, n):
        v = order[i]
        j = i - 1
        while j >= 0 and _before(cand, v, order[j]):
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = v
    # the distinct moves, most promising first, within the budget: signature (layer value, its
    # input, next layer value, block kind / aggregator shard / shard / columns, destination)
    sig = np.empty((n, 9), dtype=np.int64)
    todo = np.empty(n, dtype=np.int64)
    n_todo = 0
    for v in order:
        if n_todo >= budget:
            break
        l, kind, blk, dest = int(cand[v, 2]), int(cand[v, 3]), int(cand[v, 4]), int(cand[v, 7])
        row = sig[n_todo]
        row[0], row[1] = canon[l], inp[l] if l else -1
        row[2] = canon[l + 1] if l + 1 < L else -1
        row[3], row[8] = kind, dest
        if kind == 0:
            row[4] = row[5] = row[6] = row[7] = 0
        else:
            si = soff[l] + blk
            row[4] = 1 if sc0[si] == sc0[soff[l]] else 0
            row[5], row[6], row[7] = sc0[si], sc1[si], int(cand[v, 5])
        seen = False
        for u in range(n_todo):
            same = True
            for f in range(9):
                if sig[u, f] != row[f]:
                    same = False
                    break
            if same:
                seen = True
                break
        if not seen:
            todo[n_todo] = v
            n_todo += 1
    return todo, n_todo


@njit("Tuple((i8, i8, UniTuple(i8, 5), f8))(f8[:, :], f8[:, :], f8[:], f8[:], f8[:], f8[:], f8, i8, i8[:, :], i8[:], "
      "i8[:], i8[:], i8[:], i8[:], i8[:], b1[:], i8, f8[:], i8, i8, b1[:], f8[:], f8, f8, f8, f8, i8, f8[:], f8[:], "
      "i8[:, :, :], f8[:, :, :], i8[:, :, :], b1[:])", cache=True)
def level_round(lat, spb, speed, bw, call_s, kc, lm_s, src, heads, proj, sdev, sc0, sc1, soff, canon, allowed,
                a, room, chunk_cols, n_dest, only, sizes, H, cur, limit, lat_limit, budget, dc, dt, rank, rkey,
                rcount, fresh):
    """One leveling round off device ``a`` (module docstring). ``sizes``: (x bytes, head output
    bytes, head group bytes, FFN column bytes) at the peak horizon; ``only``: the layers whose
    blocks may move; ``cur``/``limit``/``lat_limit``: the plan's objective and the bounds a move
    must keep; ``budget``: evaluations left. Returns (status, evaluations made, best move as
    (layer, 0 = head group / 1 = FFN chunk, group or the shard's index in the layer, columns,
    destination), its objective); layer -1: no move within the bounds. Kept between rounds, per
    layer l (recomputed where ``fresh[l]`` is False, then set): ``dc/dt[l]`` its cost from its
    input, ``rank/rkey[kind, l]`` its head (0) and FFN (1) blocks' destinations in ``_ranked``'s
    order with their keys, ``rcount[kind, l]`` = (how many, where the far ones start)."""
    L, G, n_dev = heads.shape[0], heads.shape[1], lat.shape[0]
    x_b, hob_b, head_b, col_b = sizes[0], sizes[1], sizes[2], sizes[3]
    widest = np.max(soff[1:] - soff[:-1]) + 1
    work = scratch(n_dev, max(G, widest))
    sw = sc1 - sc0  # each shard's columns
    # the plan's layers from their inputs, and their blocks' destinations ranked
    inp = np.empty(L, dtype=np.int64)
    near = np.zeros(n_dev, dtype=np.bool_)
    for l in range(L):
        inp[l] = src if l == 0 else sdev[soff[l - 1]]
        if fresh[l]:
            continue
        s0, s1 = soff[l], soff[l + 1]
        dc[l], dt[l], _, fine = walk_layer(lat, spb, speed, bw, call_s, kc, inp[l], proj[l], heads[l], sdev[s0:s1],
                                           sw[s0:s1], work)
        if not fine:
            return NAN, 0, (-1, 0, 0, 0, 0), 0.0
        P, agg, A_l = proj[l], sdev[s0], inp[l]
        near[:] = False
        for g in range(G):
            near[heads[l, g]] = True
        near[P] = True
        for i in range(s0, s1):
            near[sdev[i]] = True
        near[A_l] = True
        key = lat[A_l] + x_b * spb[A_l] + lat[:, P] + hob_b * spb[:, P]
        rcount[0, l, 0], rcount[0, l, 1] = _rank(key, allowed & np.isfinite(key), near, rank[0, l], rkey[0, l])
        key = lat[P] + x_b * spb[P] + lat[:, agg] + x_b * spb[:, agg]
        rcount[1, l, 0], rcount[1, l, 1] = _rank(key, allowed & np.isfinite(key), near, rank[1, l], rkey[1, l])
        fresh[l] = True
    exit_dev = sdev[soff[L - 1]]
    cand, n = _gather(heads, sdev, sc0, sc1, soff, a, room, chunk_cols, n_dest, only, head_b, col_b, rank, rkey,
                      rcount, widest)
    todo, n_todo = _distinct(cand, n, canon, inp, sc0, sc1, soff, budget)
    pre0, pre1 = np.zeros(L + 1), np.zeros(L + 1)  # the plan's sums over the layers before each one
    for l in range(L):
        pre0[l + 1], pre1[l + 1] = pre0[l] + dc[l], pre1[l] + dt[l]
    # each distinct move's plan latency, objective and score
    mh = np.empty(G, dtype=np.int64)
    od, o0 = np.empty(widest, dtype=np.int64), np.empty(widest, dtype=np.int64)
    o1, ow = np.empty(widest, dtype=np.int64), np.empty(widest, dtype=np.int64)
    best, best_score, best_obj = -1, 0.0, 0.0
    for t in range(n_todo):
        v = todo[t]
        l, kind, blk, cols, dest = int(cand[v, 2]), int(cand[v, 3]), int(cand[v, 4]), cand[v, 5], int(cand[v, 7])
        s0, s1 = soff[l], soff[l + 1]
        if kind == 0:
            mh[:] = heads[l]
            mh[blk] = dest
            d0, d1, _, fine = walk_layer(lat, spb, speed, bw, call_s, kc, inp[l], proj[l], mh, sdev[s0:s1],
                                         sw[s0:s1], work)
            agg = sdev[s0]
        else:
            m = _moved_shards(sdev[s0:s1], sc0[s0:s1], sc1[s0:s1], blk, int(cols), dest, od, o0, o1)
            for t2 in range(m):
                ow[t2] = o1[t2] - o0[t2]
            d0, d1, _, fine = walk_layer(lat, spb, speed, bw, call_s, kc, inp[l], proj[l], heads[l], od[:m], ow[:m],
                                         work)
            agg = od[0]
        if not fine:
            return NAN, 0, (-1, 0, 0, 0, 0), 0.0
        e0 = e1 = 0.0
        if l + 1 < L and agg == inp[l + 1]:  # the next layer's input unchanged: its cost too
            e0, e1 = dc[l + 1], dt[l + 1]
        elif l + 1 < L:
            q0, q1 = soff[l + 1], soff[l + 2]
            e0, e1, _, fine = walk_layer(lat, spb, speed, bw, call_s, kc, agg, proj[l + 1], heads[l + 1],
                                         sdev[q0:q1], sw[q0:q1], work)
            if not fine:
                return NAN, 0, (-1, 0, 0, 0, 0), 0.0
        # the layers summed in order from 0 (the sums before layer l are the plan's own)
        c0, c1 = pre0[l] + d0, pre1[l] + d1
        for k in range(l + 1, L):
            if k == l + 1:
                c0, c1 = c0 + e0, c1 + e1
            else:
                c0, c1 = c0 + dc[k], c1 + dt[k]
        last = agg if l == L - 1 else exit_dev
        if last != src:
            tt = c0 + c1
            c1 = ((c1 + (tt - tt)) + kc[0] * spb[last, src]) + lat[last, src]
        c0 = c0 + lm_s
        latency = c0 + c1
        if latency > lat_limit:
            continue
        obj = latency + 0.0 / H
        score = (obj - cur) / cand[v, 6]
        if obj <= limit and (best < 0 or score < best_score):
            best, best_score, best_obj = v, score, obj
    if best < 0:
        return OK, n_todo, (-1, 0, 0, 0, 0), 0.0
    return OK, n_todo, (int(cand[best, 2]), int(cand[best, 3]), int(cand[best, 4]), int(cand[best, 5]),
                        int(cand[best, 7])), best_obj
