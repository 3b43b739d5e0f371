"""Cost models: predicted per-token latency, per-device memory and the critical-path breakdown.

Two models, selected by name through ``COST_MODELS``:

- ``decode`` — multi-layer decode of ONE token following the dataflow in ``testbed.core.placement``
  exactly: input broadcast from the previous aggregator to every head device and to the projection
  device, heads of one device serial / different devices parallel, head outputs to the projection,
  ``h`` to every FFN shard, partials to the aggregator, finally ``x`` to the source and the LM head
  there. A lone transfer of ``b`` bytes from ``a`` to ``c`` costs ``latency(a,c) + b / bandwidth(a,c)``
  (0 when ``a == c``). FLOPs and bytes read per block are in ``blocks``; attention work grows with the
  context ``T``. A block call takes its device's roofline time (``roofline.roofline_s``:
  max(FLOPs / rate, bytes read / memory bandwidth) + call overhead); all of one device's groups of a
  layer are one call, as the agents run them.

  NIC sharing (``serial_nics=True``, the default): a device's sends share its uplink, so they are
  SERIALISED in the order the runtime issues them (``node_agent.agent._emit`` loops over its
  destinations: ``x`` to ``[proj, *head devices in first-appearance order]``, ``h`` to the FFN shard
  devices in shard order, aggregator first): a send starts when the sender's uplink is free and
  occupies it for ``b / bandwidth(a,c)`` seconds (the path's bottleneck rate — conservative when the
  bottleneck is the receiver's side); the propagation latency overlaps. The uplink state persists
  across the whole token. Fan-in is serialised too: messages into one device (head outputs into
  the projection device, FFN partials into the aggregator) are received one at a time in arrival
  order, each occupying the receiver's downlink for its ``b / bandwidth`` seconds. Waiting in these
  queues counts as transfer time on the critical path. ``serial_nics=False`` gives the older
  independent-transfer model (every transfer at full path rate), which is a lower bound of the
  serialised one; the decode MILP optimises that relaxation (see ``exact``).
- ``paper`` — the paper's one-layer evaluation model (see paper-notes.md), sequence length
  ``L = context_len``; transfers are summed, not maxed, and carry no latency term, as in the paper.

Both return a ``CostResult``: token latency, per-device memory (weights + KV at ``T``, and the
embedding/LM head on the source) and the compute/transfer seconds on the critical path.
Migration costs live in ``migration``.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from testbed.partition.cost import blocks as B
from testbed.partition.cost.roofline import roofline_s
from testbed.core.paths import PathMatrix
from testbed.core.placement import Placement
from testbed.core.snapshot import ClusterSnapshot, ModelDims

INF = float("inf")


@dataclass
class CostResult:
    token_latency_s: float
    mem_bytes: dict[str, int]
    compute_s: float  # on the critical path
    transfer_s: float  # on the critical path
    bytes_moved: int = 0  # activation bytes sent between devices for one token
    bytes_by_link: dict[str, int] = field(default_factory=dict)


class Net:
    """Fast lookups over a snapshot: compute speed per device and transfer time per pair."""

    def __init__(self, snapshot: ClusterSnapshot):
        self.snap = snapshot
        self.speed = {d.name: (d.flops_per_s if d.up else 0.0) for d in snapshot.devices}
        self.call_s = {d.name: d.call_overhead_s for d in snapshot.devices}
        self.mem_bw = {d.name: d.mem_bw_bytes_per_s for d in snapshot.devices}
        self._cache: dict[tuple[str, str], tuple[float, float]] = {}
        self._path_rows = None
        # (context, tokens, serial) -> (layer placement, its input's device) -> the layer's cost
        # relative to its start (see ``_layer_delta``)
        self.layer_memo: dict[tuple, dict] = {}

    def link(self, a: str, b: str) -> tuple[float, float]:
        """(latency_s, seconds per byte) of the path a -> b."""
        key = (a, b)
        hit = self._cache.get(key)
        if hit is None:
            rows = self._rows()
            i, j = (rows[0].get(a), rows[0].get(b)) if rows else (None, None)
            if i is not None and j is not None and a != b:  # from the arrays: no LinkState
                hit = (rows[1][i][j], rows[2][i][j])
            else:
                ls = self.snap.path(a, b)
                bw, up, lat = ls.bandwidth_bytes_per_s, ls.up, ls.latency_s
                hit = (INF, INF) if not up or bw <= 0 else (lat, 1.0 / bw)
            self._cache[key] = hit
        return hit

    def _rows(self):
        """A ``PathMatrix``'s (index, latency rows, seconds-per-byte rows) as Python lists, ``inf``
        where a path is down (``link``'s values), built on the first lookup; None for a dict."""
        if self._path_rows is None:
            pm = self.snap.paths
            if not isinstance(pm, PathMatrix):
                self._path_rows = ()
            else:
                ok = pm.up & (pm.bandwidth > 0)
                with np.errstate(divide="ignore"):
                    spb = np.where(ok, 1.0 / np.where(ok, pm.bandwidth, 1.0), INF)
                self._path_rows = (pm.index, np.where(ok, pm.latency, INF).tolist(), spb.tolist())
        return self._path_rows

    def xfer(self, a: str, b: str, nbytes: float) -> float:
        if a == b:
            return 0.0
        lat, spb = self.link(a, b)
        return lat + nbytes * spb

    def compute(self, device: str, flops: float) -> float:
        c = self.speed.get(device, 0.0)
        return flops / c if c > 0 else INF

    def call(self, device: str, flops: float, nbytes: float = 0.0) -> float:
        """One block invocation on ``device``: its roofline time for ``flops`` and ``nbytes`` read
        plus the fixed cost of a call (the ``decode`` model; the ``paper`` model counts FLOPs only)."""
        return roofline_s(flops, nbytes, self.speed.get(device, 0.0), self.mem_bw.get(device, INF),
                          self.call_s.get(device, 0.0))


def _cp_max(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a if a[0] + a[1] >= b[0] + b[1] else b


def placement_memory(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
                     context_len: int) -> dict[str, int]:
    """Bytes each device holds under the ``decode`` model at context ``context_len``."""
    mem = {d.name: 0 for d in snapshot.devices}
    mem[placement.source] = mem.get(placement.source, 0) + B.source_bytes(dims)
    head = B.block_memory_bytes(dims, "head", context_len)
    pb = B.proj_bytes(dims)
    shard: dict[int, int] = {}  # columns -> bytes (a plan has few distinct shard widths)
    # a layer object repeated (Galaxy's and the layer splits' uniform layers) is counted once
    # times its repeats: integer bytes, so the sums are the same; devices first seen in the same order
    times: dict[int, list] = {}
    for lp in placement.layers:
        hit = times.get(id(lp))
        if hit is None:
            times[id(lp)] = [lp, 1]
        else:
            hit[1] += 1
    for lp, m in times.values():
        heads, proj, shards = _layer_parts(lp)
        for dev, n in heads:
            mem[dev] = mem.get(dev, 0) + m * n * head
        mem[proj] = mem.get(proj, 0) + m * pb
        for dev, c in shards:
            nb = shard.get(c)
            if nb is None:
                nb = shard[c] = B.ffn_bytes(dims, c)
            mem[dev] = mem.get(dev, 0) + m * nb
    return mem


# id(layer) -> (weak reference to it, its parts): a planner asks for the memory of many plans that
# share layer objects (the current placement, its candidates, their per-layer mixes)
_LAYER_PARTS: dict[int, tuple] = {}


def _layer_parts(lp) -> tuple[tuple, str, tuple]:
    """A layer's (head groups per device in first-appearance order, proj, (device, columns) per
    shard in order), remembered per layer object while it lives."""
    hit = _LAYER_PARTS.get(id(lp))
    if hit is not None and hit[0]() is lp:
        return hit[1]
    if len(_LAYER_PARTS) > 200_000:  # ids of dead layers: dropped now and then
        _LAYER_PARTS.clear()
    parts = (tuple(Counter(lp.heads).items()), lp.proj, tuple((s.device, s.col_end - s.col_start) for s in lp.ffn))
    _LAYER_PARTS[id(lp)] = (weakref.ref(lp), parts)
    return parts


class _Tally:
    def __init__(self) -> None:
        self.by_link: dict[str, int] = {}

    def send(self, a: str, b: str, nbytes: float) -> None:
        if a != b:
            key = f"{a}->{b}"
            self.by_link[key] = self.by_link.get(key, 0) + int(nbytes)


class _Nics:
    """Per-token uplink state (time each device's uplink frees) for serialised sends."""

    def __init__(self, net: Net, serial: bool):
        self.net, self.serial = net, serial
        self.up: dict[str, float] = {}

    def send(self, a: str, b: str, nbytes: float, ready: tuple[float, float]) -> tuple[float, float]:
        """(compute, transfer) on the critical path when ``nbytes`` from ``a`` (ready then) reach ``b``."""
        if a == b:
            return ready
        lat, spb = self.net.link(a, b)
        tau = nbytes * spb
        if not self.serial:
            return ready[0], ready[1] + lat + tau
        t = ready[0] + ready[1]
        start = max(t, self.up.get(a, t))
        self.up[a] = start + tau
        return ready[0], ready[1] + (start - t) + tau + lat

    def fan_in(self, msgs: list[tuple[tuple[float, float], float]]) -> tuple[float, float] | None:
        """Messages (arrival if alone, downlink seconds) into one device, received in arrival order;
        the critical path of the last one to finish (None when there are none)."""
        if not msgs:
            return None
        if not self.serial:
            out = msgs[0][0]
            for arr, _ in msgs[1:]:
                out = _cp_max(out, arr)
            return out
        return fan_in_serial(msgs)


def fan_in_serial(msgs: list[tuple[tuple[float, float], float]]) -> tuple[float, float] | None:
    """``_Nics.fan_in`` with serial NICs: messages (arrival pair, downlink seconds) received in
    arrival order (a stable sort), the critical path of the last one to finish (None if none)."""
    if not msgs:
        return None
    done, out = -INF, msgs[0][0]
    for arr, tau in sorted(msgs, key=lambda m: m[0][0] + m[0][1]):
        t = arr[0] + arr[1]
        fin = max(t, done + tau)
        done = fin
        out = (arr[0], arr[1] + (fin - t))
    return out


def _sends(nics: _Nics, tally: _Tally, pairs, nbytes) -> list[tuple[float, float]]:
    """``nics.send(a, b, n, ready)`` then ``tally.send(a, b, n)`` for each ``(a, b, ready)`` of
    ``pairs`` in order (``nbytes``: one size for all, or one per pair): the same arithmetic, in one
    loop (a layer sends ~35 messages; this is the cost model's innermost loop)."""
    link, up, by, serial = nics.net.link, nics.up, tally.by_link, nics.serial
    sizes = nbytes if isinstance(nbytes, list) else None
    out = []
    for i, (a, b, ready) in enumerate(pairs):
        if a == b:
            out.append(ready)
            continue
        n = nbytes if sizes is None else sizes[i]
        lat, spb = link(a, b)
        tau = n * spb
        r0, r1 = ready
        if serial:
            t = r0 + r1
            start = max(t, up.get(a, t))
            up[a] = start + tau
            out.append((r0, r1 + (start - t) + tau + lat))
        else:
            out.append((r0, r1 + lat + tau))
        key = f"{a}->{b}"
        by[key] = by.get(key, 0) + int(n)
    return out


def _decode_layer(lp, src_dev, start, nics: _Nics, k: dict, tally: _Tally):
    """Critical path (compute_s, transfer_s) when the layer's output is on its aggregator."""
    net, P, xb = nics.net, lp.proj, k["x_bytes"]
    counts = Counter(lp.heads)
    dsts = list(dict.fromkeys([P, *counts]))  # the runtime's send order
    arrive = dict(zip(dsts, _sends(nics, tally, [(src_dev, d, start) for d in dsts], xb)))
    att, outs, sizes = arrive[P], [], []
    hf, hr, hob, call = k["head_flops"], k["head_read"], k["head_out_bytes"], net.call
    for j, n in counts.items():
        done = (arrive[j][0] + call(j, n * hf, n * hr), arrive[j][1])
        if j == P:
            att = _cp_max(att, done)
            continue
        outs.append((j, P, done))
        sizes.append(n * hob)
    sent = _sends(nics, tally, outs, sizes)
    got = nics.fan_in([(arr, nb * net.link(j, P)[1]) for arr, nb, (j, _, _) in zip(sent, sizes, outs)])
    att = att if got is None else _cp_max(att, got)
    pd = (att[0] + call(P, k["proj_flops"], k["proj_read"]), att[1])
    agg = lp.ffn[0].device
    cols: dict[str, int] = {}
    for s in lp.ffn:  # shard order, aggregator first: the runtime's send order
        cols[s.device] = cols.get(s.device, 0) + (s.col_end - s.col_start)
    out, msgs = None, []
    fcf, fcr = k["ffn_col_flops"], k["ffn_col_read"]
    for dev, c in cols.items():  # P's sends interleave with the partials' (one uplink may carry both)
        arr = _sends(nics, tally, [(P, dev, pd)], xb)[0]
        done = (arr[0] + call(dev, c * fcf, c * fcr), arr[1])
        if dev == agg:
            out = done
            continue
        msgs.append((_sends(nics, tally, [(dev, agg, done)], xb)[0], xb * net.link(dev, agg)[1]))
    got = nics.fan_in(msgs)
    out = got if out is None else (out if got is None else _cp_max(out, got))
    return out, agg


def _layer_delta(lp, src_dev, net: Net, serial: bool, k: dict, memo: dict):
    """``_decode_layer`` from a start at (0, 0): ((compute_s, transfer_s), aggregator, bytes per link).

    A layer's cost does not depend on when it starts: every message it sends is awaited before its
    output exists (head outputs by the projection, FFN partials by the aggregator), so every
    uplink is free again by the time the next layer starts, and all its times shift with the start.
    Placements that share a layer (Galaxy's identical layers, RA's candidates and per-layer mixes
    of two plans) compute it once per ``Net``."""
    key = (lp, src_dev)
    hit = memo.get(key)
    if hit is None:
        tally = _Tally()
        delta, agg = _decode_layer(lp, src_dev, (0.0, 0.0), _Nics(net, serial), k, tally)
        hit = memo[key] = (delta, agg, tally.by_link)
    return hit


def decode_constants(dims: ModelDims, context_len: int, n_tokens: int = 1) -> dict:
    """Per-block FLOPs, bytes read (``*_read``) and message sizes for ``n_tokens`` tokens ending at
    ``context_len``, in the model's weight format.

    ``n_tokens > 1`` models a prefill chunk: linear work and messages scale by ``n_tokens`` and the
    attention work sums over the causal positions ``context_len - n_tokens + 1 .. context_len``;
    weights are read once per call whatever ``n_tokens`` (as ``blocks.call_work``).
    """
    D, d, q, n = dims.d_model, dims.head_dim, dims.q_per_group, n_tokens
    pos_sum = n * context_len - n * (n - 1) / 2.0
    return {
        "x_bytes": B.hidden_bytes(dims, n),
        "head_out_bytes": B.head_out_bytes(dims, n),
        "head_flops": 2.0 * (q + 2) * D * d * n + 4.0 * q * d * pos_sum,
        "head_read": float(B.head_weight_bytes(dims) + B.head_kv_bytes(dims, context_len)),
        "proj_flops": B.proj_flops(dims) * n,
        "proj_read": float(B.proj_bytes(dims)),
        "ffn_col_flops": 2.0 * B.ffn_mats(dims) * D * n,
        "ffn_col_read": B.ffn_col_bytes(dims),
        "lm_flops": B.lm_head_flops(dims),
        "lm_read": B.lm_head_read_bytes(dims),
    }


def decode_cost(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
                context_len: int | None = None, n_tokens: int = 1, net: Net | None = None,
                serial_nics: bool = True) -> CostResult:
    """The ``decode`` model: latency of one token at context ``T`` (default snapshot.context_len).

    ``serial_nics``: serialise each device's sends on its uplink and each device's fan-in on its
    downlink (default, see the module docstring); False = independent transfers (a lower bound)."""
    T = snapshot.context_len if context_len is None else context_len
    net = net or Net(snapshot)
    k = decode_constants(dims, T, n_tokens)
    tally, nics = _Tally(), _Nics(net, serial_nics)
    memo = net.layer_memo.setdefault((T, n_tokens, serial_nics), {})
    cp, dev = (0.0, 0.0), placement.source
    for lp in placement.layers:
        (dc, dt), dev, sent = _layer_delta(lp, dev, net, serial_nics, k, memo)
        cp = (cp[0] + dc, cp[1] + dt)
        for link, nbytes in sent.items():
            tally.by_link[link] = tally.by_link.get(link, 0) + nbytes
    src = placement.source
    cp = nics.send(dev, src, k["x_bytes"], cp)
    cp = (cp[0] + net.call(src, k["lm_flops"], k["lm_read"]), cp[1])
    tally.send(dev, src, k["x_bytes"])
    return CostResult(cp[0] + cp[1], placement_memory(placement, snapshot, dims, T), cp[0], cp[1],
                      sum(tally.by_link.values()), tally.by_link)


def _paper():
    from testbed.partition.cost import paper

    return paper


def paper_constants(dims: ModelDims, L: int) -> dict:
    """``cost.paper.paper_constants`` (the paper's model lives there)."""
    return _paper().paper_constants(dims, L)


def paper_cost(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
               context_len: int | None = None, net: Net | None = None) -> CostResult:
    """``cost.paper.paper_cost``."""
    return _paper().paper_cost(placement, snapshot, dims, context_len, net)


COST_MODELS = {"paper": paper_cost, "decode": decode_cost}


def cost(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str = "decode",
         context_len: int | None = None) -> CostResult:
    try:
        fn = COST_MODELS[cost_model]
    except KeyError:
        raise ValueError(f"unknown cost model {cost_model!r}; expected one of {sorted(COST_MODELS)}") from None
    return fn(placement, snapshot, dims, context_len=context_len)


def memory(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims, cost_model: str,
           context_len: int) -> dict[str, int]:
    if cost_model == "paper":
        return _paper().paper_memory(placement, snapshot, dims, context_len)
    return placement_memory(placement, snapshot, dims, context_len)
