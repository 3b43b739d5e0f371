"""Which side of the regime boundary a cluster is on: the regime map's rule applied to one snapshot.

The regime map (``experiments/paper/regime_map.yaml``, docs/experiments.md "Regime map") found that
a head (tensor-parallel) split beats the best layer split by more than 5 % when

    R = one decode layer's time on the fastest device / one hop  >  R* = 4.96

with one hop = the path's one-way latency + one hidden state's bytes / the path's rate (a star's
host-to-host path: 2 x the link delay). The rule classified 97.7 % of the 600 static and 97.0 % of
the 600 fluctuating points right; its misses lie within R 4.7-9.2. Here it is computed for any
snapshot: the fastest device is the one whose layer time (roofline: every KV group's attention,
W_o and the whole FFN) is the smallest among the devices that may hold blocks, and its hop the
cheapest path from it to another such device. Pure functions.
"""
from __future__ import annotations

from dataclasses import dataclass

from testbed.core.snapshot import ClusterSnapshot, ModelDims
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import decode_constants
from testbed.partition.cost.roofline import roofline_s

R_STAR = 4.96  # the regime map of 2026-12-06 (docs/experiments.md), both scenarios
NEAR = (4.7, 9.2)  # where the map's rule missed points: a verdict here is a lean, not a prediction


def layer_time_s(dims: ModelDims, flops_per_s: float, mem_bw_bytes_per_s: float, call_overhead_s: float,
                 context_len: int) -> float:
    """One decode layer on one device: every KV group's attention, W_o and the FFN, each one call."""
    k = decode_constants(dims, context_len)
    g, F = dims.n_kv_heads, dims.ffn_dim
    rate, bw, call = flops_per_s, mem_bw_bytes_per_s, call_overhead_s
    return (roofline_s(g * k["head_flops"], g * k["head_read"], rate, bw, call)
            + roofline_s(k["proj_flops"], k["proj_read"], rate, bw, call)
            + roofline_s(F * k["ffn_col_flops"], F * k["ffn_col_read"], rate, bw, call))


@dataclass(frozen=True)
class Regime:
    R: float
    fastest_device: str
    layer_s: float
    hop_s: float
    peer: str

    @property
    def verdict(self) -> str:
        side = "head-level (a tensor-parallel split)" if self.R > R_STAR else "layer-level (whole layers together)"
        lean = " — near the boundary, where the map's rule also missed points" if NEAR[0] <= self.R <= NEAR[1] else ""
        return f"R = {self.R:.2f} vs R* = {R_STAR}: the regime map predicts {side} wins{lean}"

    def to_json(self) -> dict:
        return {"R": self.R, "R_star": R_STAR, "fastest_device": self.fastest_device, "peer": self.peer,
                "layer_ms": self.layer_s * 1e3, "hop_ms": self.hop_s * 1e3, "verdict": self.verdict}


def regime_of(snapshot: ClusterSnapshot, dims: ModelDims) -> Regime | None:
    """The rule's ratio for ``snapshot`` (None with fewer than two devices that may hold blocks or
    no path between them: nothing to split over)."""
    compute = [d for d in snapshot.devices if d.up and (not d.is_source or snapshot.allow_blocks_on_source)]
    if len(compute) < 2:
        return None
    T = snapshot.context_len
    times = {d.name: layer_time_s(dims, d.flops_per_s, d.mem_bw_bytes_per_s, d.call_overhead_s, T) for d in compute}
    fast = min(times, key=times.get)
    nbytes = B.hidden_bytes(dims, 1)
    hops = {}
    for d in compute:
        if d.name != fast:
            ls = snapshot.path(fast, d.name)
            if ls.up and ls.bandwidth_bytes_per_s > 0:
                hops[d.name] = ls.latency_s + nbytes / ls.bandwidth_bytes_per_s
    if not hops:
        return None
    peer = min(hops, key=hops.get)
    return Regime(times[fast] / hops[peer], fast, times[fast], hops[peer], peer)
