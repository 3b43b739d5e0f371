"""EdgeShard's dynamic program over one device order (``layer.edgeshard._dp``) compiled (numba):
the same operations in the same order, so the same floats and the same split, ~30x faster than the
numpy form (three orders per split, twice per RA decision).
"""
from __future__ import annotations

import numpy as np
from numba import njit

INF = np.inf


@njit(cache=True)
def _argmin(x):
    """``np.argmin``: the first NaN if any, else the first minimum."""
    best = 0
    for i in range(len(x)):
        if x[i] != x[i]:
            return i
        if x[i] < x[best]:
            best = i
    return best


@njit("Tuple((f8[:], i8[:, :, :]))(i8, i8, f8[:], f8[:, :], i8[:], i8[:], f8[:, :])", cache=True)
def dp(src, L, c, X, caps, order, S):
    """``_dp`` for ``L`` layers over devices ``order`` (``order[0]`` pinned): per position t the best
    finish of each number of layers on the devices up to t, with ``arg[i, t]`` = (previous
    position, shard length); returns (finish with the hop back to ``src`` per last position, arg).
    ``c``: a layer's seconds per device, ``X``: hop seconds, ``caps``: whole layers per device,
    ``S[k, i]``: extra cost of layers [0, i) on device k."""
    n = len(order)
    f = np.full((L + 1, n), INF)
    arg = np.full((L + 1, n, 2), -1, dtype=np.int64)
    pin = order[0]
    for m in range(1, min(L, caps[pin]) + 1):
        f[m, 0] = X[src, pin] + m * c[pin] + S[pin, m]
        arg[m, 0, 0], arg[m, 0, 1] = -1, m
    reach = np.empty(n)
    j_best, g = np.empty(L + 1, dtype=np.int64), np.empty(L + 1)
    val = np.empty(L)
    for t in range(1, n):
        k = order[t]
        M = min(L - 1, caps[k])
        if M < 1:
            continue
        for i in range(L + 1):  # the best previous position for i layers placed, then the hop to k
            for j in range(t):
                reach[j] = f[i, j] + X[order[j], k]
            j_best[i] = _argmin(reach[:t])
            g[i] = reach[j_best[i]]
        for i in range(L + 1):
            for m in range(1, M + 1):  # shard [i - m, i) on k
                before = i - m
                if m <= i - 1 and before >= 1:
                    val[m - 1] = g[before] + m * c[k] + S[k, i] - S[k, before]
                else:
                    val[m - 1] = INF
            m_best = _argmin(val[:M])
            best = val[m_best]
            if best < INF and best > -INF:  # finite (NaN fails both)
                f[i, t] = best
                arg[i, t, 0] = j_best[max(0, min(i - (m_best + 1), L))]
                arg[i, t, 1] = m_best + 1
    end = np.empty(n)
    for t in range(n):
        end[t] = f[L, t] + X[order[t], src]
    return end, arg
