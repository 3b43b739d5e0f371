"""The ``decode``-model passes of one RA greedy round: place a layer's heads, then its FFN chunks,
for one anchor (projection device), each block on the device that least delays the layer's
critical path given what the pass already placed, with the sender's uplink serialised as in the
``decode`` cost model. Tables per problem (``_Tables``) make a pass index python lists only.
The Python passes are the reference and the fallback of the compiled ones (``heads_compiled``,
``ffn_compiled``, ``ra.decode_kernel``), which give the same results where no key is NaN.
"""
from __future__ import annotations

import heapq

import numpy as np

from testbed.partition.common import NoFit, Problem
from testbed.partition.ra import decode_kernel as K

# ``_Layer`` in annotations is ``testbed.partition.ra.greedy._Layer`` (not imported: greedy imports
# this module, and annotations are not evaluated)


class _Tables:
    """Per-problem rows the decode passes index by device (python lists: the greedy loops are
    scalar). ``tau_x[i][j]``: seconds to push a hidden state i -> j; ``lat[i][j]``, ``latT[j][i]``
    = ``lat[i][j]``; ``head_inc[P][j]``: one more head on j (compute + its output to P);
    ``back[a][j]``: j's partial FFN output to aggregator a; ``chunk_c[j]``: one FFN chunk on j."""

    def __init__(self, prob: Problem, chunks: int):
        sz, C = prob.sz, np.where(prob.C > 0, prob.C, np.nan)
        tau_x = sz.x_b * prob.spb
        head_inc = sz.head_f / C + sz.head_out_b * prob.spb.T
        hop = prob.lat + tau_x  # [from, to]: a hidden state arrives
        back = hop.T
        chunk_c = -(-prob.dims.ffn_dim // chunks) * sz.ffn_col_f / C
        self.tau_x, self.lat, self.latT = _Rows(tau_x), _Rows(prob.lat), _Rows(prob.lat.T)
        self.head_inc, self.back, self.chunk_c = _Rows(head_inc), _Rows(back), chunk_c.tolist()
        # the same as C-ordered arrays for the compiled passes (``decode_kernel``), and their scratch
        self.arrays = tuple(np.ascontiguousarray(x, dtype=float) for x in (tau_x, prob.lat, head_inc, back, chunk_c))
        self.counts, self.order = np.zeros(len(prob.names), dtype=np.int64), np.zeros(len(prob.names), dtype=np.int64)
        self.allowed_idx = np.nonzero(prob.allowed)[0]
        # the same over allowed devices only (columns in ``allowed_idx`` order), for the static
        # keys of devices a pass has not used yet
        al = self.allowed_idx
        self.reach_al = hop[:, al]  # [from, allowed]
        self.head_tail_al = (prob.lat[al].T + head_inc[:, al])  # [P, allowed]: head on j, output to P
        self.back_al = back[:, al]  # [aggregator, allowed]
        self.chunk_al = chunk_c[al]


class _Rows:
    """A matrix's rows as Python lists, each converted when first asked for (a pass reads the rows
    of its sender and anchor only: an incremental re-decision a few dozen of the 65-129)."""

    def __init__(self, matrix: np.ndarray):
        self.matrix, self.rows = matrix, [None] * len(matrix)

    def __getitem__(self, i: int) -> list:
        row = self.rows[i]
        if row is None:
            row = self.rows[i] = self.matrix[i].tolist()
        return row


def _tables(prob: Problem, chunks: int) -> _Tables:
    """The tables for ``prob`` and ``chunks`` FFN chunks per layer, built once per problem."""
    cache = prob.memo.setdefault("ra_tables", {})
    if chunks not in cache:
        cache[chunks] = _Tables(prob, chunks)
    return cache[chunks]


def _unused_in_order(idx: np.ndarray, static: np.ndarray) -> tuple:
    """Devices ``idx`` cheapest first by ``static``, as lists then as arrays (devices, keys,
    devices, keys). A pass's unused devices have keys ``up + static``: the shared uplink offset
    ``up`` grows for all of them alike, so their order never changes (the pass walks this list,
    skipping devices it has already used)."""
    order = static.argsort(kind="stable")
    devs, keys = idx[order].astype(np.int64), np.ascontiguousarray(static[order], dtype=float)
    return devs.tolist(), keys.tolist(), devs, keys


def _order(ly: _Layer, kind: str, static, a: int, b: int, arrays: bool = False) -> tuple:
    """``_unused_in_order`` of the allowed devices by ``static()`` (a pass's static keys for
    sender ``a`` and anchor/aggregator ``b``), once per problem: the keys depend on the layer only
    through its current placement (the migration penalties), so layers without one, and every
    round and anchor that repeats (a, b), share it. ``arrays``: as numpy arrays (the compiled passes)."""
    memo = ly.prob.memo.setdefault("ra_order", {})
    key = (kind, a, b, -1 if ly.cur is None else ly.l)
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = _unused_in_order(ly.tab.allowed_idx, static())
    return hit[2:] if arrays else hit[:2]


class _Picker:
    """The next device for a block: the cheapest of the devices a pass already uses (a heap of
    exact keys) and the first unused one with room (``_unused_in_order``, key ``up + static``).
    Opening a device fixes its arrival (``base``) and adds its transfer to the sender's uplink."""

    def __init__(self, tau: list, lat: list, base: dict, up: float, order: tuple[list[int], list[float]],
                 used: list):
        self.tau, self.lat, self.base, self.up, self.used = tau, lat, base, up, used
        self.devs, self.keys = order
        self.nxt = 0
        heapq.heapify(self.used)

    def pick(self, r: list, nbytes: float, block: str) -> int:
        used, devs, m = self.used, self.devs, len(self.devs)
        while used and r[used[0][1]] < nbytes:
            heapq.heappop(used)
        while self.nxt < m and (r[devs[self.nxt]] < nbytes or devs[self.nxt] in self.base):
            self.nxt += 1
        fresh = self.up + self.keys[self.nxt] if self.nxt < m else float("inf")
        if used and used[0][0] <= fresh:
            return heapq.heappop(used)[1]
        if self.nxt == m:
            raise NoFit(block, nbytes)
        j = devs[self.nxt]
        self.nxt += 1
        self.base[j] = self.up + self.tau[j] + self.lat[j]
        self.up += self.tau[j]
        return j

    def push(self, key: float, j: int) -> None:
        heapq.heappush(self.used, (key, j))


def _heads_decode(ly: _Layer, P: int, r: list) -> tuple[float, float, dict[int, int]]:
    """Greedy heads for anchor P: (attention-stage finish, penalties, counts per device).

    Mirrors the ``decode`` model's serialised fan-out: the input device A sends x to P first,
    then to each new head device in the order they are picked, so a device's x arrives after the
    uplink time of every earlier destination (head-output fan-in into P is not modelled here;
    the final plan comparison uses the full cost model). Each head goes to the device whose
    finish (arrival + its heads' compute + output to P + migration penalty) is lowest: devices
    already used are kept in a heap of exact keys, unused ones in their fixed order (``_order``;
    key ``up + static``: opening one fixes its arrival and adds its transfer to A's uplink ``up``).
    The loop is ``_Picker``'s, inlined (this is the planner's innermost loop)."""
    p, A, tab = ly.prob, ly.A, ly.tab
    hb = p.sz.head_b
    tauA, latA, tail, inc = tab.tau_x[A], tab.lat[A], tab.latT[P], tab.head_inc[P]
    cur, mig = ly.cur_heads_l, ly.mig_head
    base = {P: latA[P] + tauA[P] if P != A else 0.0, A: 0.0}  # devices whose x arrival is fixed
    bt = {j: base[j] + tail[j] for j in base}  # arrival + output to P
    used = [(bt[j] + inc[j] + (0.0 if cur[j] > 0 else mig[j]), j) for j in dict.fromkeys((P, A)) if p.allowed[j]]
    heapq.heapify(used)
    devs, keys = _order(ly, "h", lambda: tab.reach_al[A] + tab.head_tail_al[P] + ly.pen0_head_al, A, P)
    m, nxt, up = len(devs), 0, tauA[P] if P != A else 0.0
    pop, push, replace = heapq.heappop, heapq.heappush, heapq.heapreplace
    n: dict[int, int] = {}
    finish, pens = float(base[P]), 0.0
    for g in range(p.dims.n_kv_heads):
        while used and r[used[0][1]] < hb:
            pop(used)
        while nxt < m:
            d = devs[nxt]
            if r[d] >= hb and d not in base:
                break
            nxt += 1
        top = bool(used) and (nxt == m or used[0][0] <= up + keys[nxt])
        if top:
            j = used[0][1]
        elif nxt == m:
            raise NoFit(f"L{ly.l}.H{g}", hb)
        else:
            j = devs[nxt]
            nxt += 1
            up_j = up + tauA[j]
            base[j], up = up_j + latA[j], up_j
            bt[j] = base[j] + tail[j]
        k = n.get(j, 0)
        cj, btj, incj = cur[j], bt[j], inc[j]
        if k >= cj:
            pens += mig[j]
        n[j] = k = k + 1
        r[j] -= hb
        x = btj + k * incj
        if x > finish:
            finish = x
        item = (btj + (k + 1) * incj + (0.0 if k < cj else mig[j]), j)
        if top:
            replace(used, item)
        else:
            push(used, item)
    return finish, pens, n


def _aggregator(ly: _Layer, P: int, r, agg: int | None) -> int:
    """The FFN's aggregator for anchor P: ``agg`` if it has room for a chunk, or (None) the
    cheapest device with room by h from P + one chunk + its migration penalty (the first in the
    stable order: argmin's tie rule). Raises ``NoFit`` when there is none."""
    tab, cb = ly.tab, ly.chunk_b
    if agg is None:
        devs, keys = _order(ly, "agg", lambda: tab.reach_al[P] + tab.chunk_al + ly.pen0_chunk_al, P, -1)
        agg = next((j for j, kv in zip(devs, keys) if r[j] >= cb and kv < np.inf), None)
        if agg is None:
            raise NoFit(f"L{ly.l}.ffn", cb)
    elif r[agg] < cb:
        raise NoFit(f"L{ly.l}.ffn", cb)
    return agg


def _ffn_decode(ly: _Layer, P: int, r: list, agg: int | None = None) -> tuple[float, float, dict[int, int], int]:
    """Greedy FFN chunks after the projection on P: (stage time, penalties, counts, aggregator).

    P sends h to the aggregator first, then to each new shard device in pick order (serialised on
    P's uplink, as in the ``decode`` model). ``agg``: the aggregator (default: the cheapest).
    Used devices in a heap, unused ones in their fixed order, as in ``_heads_decode``."""
    tab, cb = ly.tab, ly.chunk_b
    tauP, latP, fc = tab.tau_x[P], tab.lat[P], tab.chunk_c
    cur, mig = ly.cur_chunks_l, ly.mig_chunk
    reach = lambda: tab.reach_al[P] + tab.chunk_al  # h arrives + one chunk, per allowed device  # noqa: E731
    agg = _aggregator(ly, P, r, agg)
    back = tab.back[agg]
    base = {agg: tauP[agg] + latP[agg] if agg != P else 0.0}
    pens = 0.0 if cur[agg] > 0 else mig[agg]
    finish, n = base[agg] + fc[agg], {agg: 1}
    r[agg] -= cb
    used = [(base[agg] + 2 * fc[agg] + back[agg] + (0.0 if 1 < cur[agg] else mig[agg]), agg)]
    pick = _Picker(tauP, latP, base, tauP[agg] if agg != P else 0.0,
                   _order(ly, "f", lambda: reach() + tab.back_al[agg] + ly.pen0_chunk_al, P, agg), used)
    for _ in range(ly.K - 1):
        j = pick.pick(r, cb, f"L{ly.l}.ffn")
        k = n.get(j, 0)
        pens += 0.0 if k < cur[j] else mig[j]
        n[j] = k = k + 1
        r[j] -= cb
        finish = max(finish, base[j] + k * fc[j] + back[j])
        pick.push(base[j] + (k + 1) * fc[j] + back[j] + (0.0 if k < cur[j] else mig[j]), j)
    return finish, pens, n, agg


def heads_compiled(ly: _Layer, P: int, r: np.ndarray) -> tuple[float, float, dict[int, int]]:
    """``_heads_decode`` by the compiled pass (``decode_kernel.heads_pass``; ``r`` an array), the
    Python one where a key is NaN."""
    p, A, tab = ly.prob, ly.A, ly.tab
    devs, keys = _order(ly, "h", lambda: tab.reach_al[A] + tab.head_tail_al[P] + ly.pen0_head_al, A, P, arrays=True)
    tau_x, lat, head_inc, _, _ = tab.arrays
    finish, pens, used, status = K.heads_pass(A, P, p.dims.n_kv_heads, float(p.sz.head_b), tau_x, lat, head_inc,
                                              ly.cur_heads, ly.mig_head_a, p.allowed, devs, keys, r, tab.counts,
                                              tab.order)
    if status == K.NAN:
        rl = r.tolist()
        out = _heads_decode(ly, P, rl)
        r[:] = rl
        return out
    if status != K.OK:
        raise NoFit(f"L{ly.l}.H{status}", p.sz.head_b)
    counts = tab.counts
    return finish, pens, {j: int(counts[j]) for j in tab.order[:used].tolist()}


def ffn_compiled(ly: _Layer, P: int, r: np.ndarray, agg: int | None = None) -> tuple[float, float, dict[int, int], int]:
    """``_ffn_decode`` by the compiled pass (``decode_kernel.ffn_pass``; ``r`` an array), the
    Python one where a key is NaN."""
    tab, cb = ly.tab, ly.chunk_b
    reach = lambda: tab.reach_al[P] + tab.chunk_al  # noqa: E731
    agg = _aggregator(ly, P, r, agg)
    devs, keys = _order(ly, "f", lambda: reach() + tab.back_al[agg] + ly.pen0_chunk_al, P, agg, arrays=True)
    tau_x, lat, _, back, chunk_c = tab.arrays
    finish, pens, used, status = K.ffn_pass(P, agg, ly.K, float(cb), tau_x, lat, back[agg], chunk_c, ly.cur_chunks,
                                            ly.mig_chunk_a, devs, keys, r, tab.counts, tab.order)
    if status == K.NAN:
        rl = r.tolist()
        out = _ffn_decode(ly, P, rl, agg)
        r[:] = rl
        return out
    if status != K.OK:
        raise NoFit(f"L{ly.l}.ffn", cb)
    counts = tab.counts
    return finish, pens, {j: int(counts[j]) for j in tab.order[:used].tolist()}, agg
