"""The one roofline: how long one block call takes on a device, from its FLOPs and the bytes it reads.

    time = max(FLOPs / rate, bytes read / memory bandwidth) + per-call overhead

``rate`` is the device's sustained matmul rate *for the model's weight format* (a Q4_0 matmul on a
Cortex-A72 spends most of its time unpacking nibbles: its rate is the format's, not the fp32 peak),
``memory bandwidth`` its sustained streaming bandwidth, the overhead a fixed cost per call
(dispatch, thread wake-up, small ops). Batch-1 decode reads every weight once per token for two
FLOPs, so on edge CPUs the second term usually wins: decode is memory-bound, and this says so.

Every cost model (``latency.decode_cost``), every planner (through ``matvec_rate``) and the
simulated backend use ``roofline_s``; the emulated agents' pacing calls ``block_time_s`` to know how
long a block takes on the emulated device. Work per call comes from ``blocks.call_work``.
"""
from __future__ import annotations

from typing import Protocol

INF = float("inf")


class Rates(Protocol):
    """Anything with a device's rates: ``DeviceState`` (one format resolved) or ``DeviceProfile``."""

    mem_bw_bytes_per_s: float
    call_overhead_s: float

    def flops_for(self, weight_format: str) -> float: ...


def roofline_s(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float = INF,
               call_s: float = 0.0, calls: int = 1) -> float:
    """``max(flops / flops_per_s, nbytes / bytes_per_s) + calls · call_s``; ``inf`` on a device
    with no compute rate (down), ``bytes_per_s = inf`` is FLOPs only."""
    if flops_per_s <= 0:
        return INF
    mem = nbytes / bytes_per_s if bytes_per_s < INF else 0.0
    return max(flops / flops_per_s, mem) + calls * call_s


def block_time_s(device: Rates, work: tuple[float, float], weight_format: str, calls: int = 1) -> float:
    """Seconds one block call takes on ``device``: ``work`` is (FLOPs, bytes read) as
    ``blocks.call_work`` counts them for the model in ``weight_format``.

    Example: one Llama-2-7B FFN (3·4096·11008 weights in Q4_0) on an ``rpi4-8gb`` profile:
    ``block_time_s(get_profile("rpi4-8gb"), call_work(dims, "ffn", cols=11008), "q4_0")``."""
    return roofline_s(work[0], work[1], device.flops_for(weight_format), device.mem_bw_bytes_per_s,
                      device.call_overhead_s, calls)


def matvec_rate(flops_per_s: float, bytes_per_s: float, weight_bytes: float) -> float:
    """The FLOP/s a batch-1 matrix-vector product reaches under the roofline (2 FLOPs per weight
    read): ``min(rate, 2 · bandwidth / weight_bytes)`` — the one rate a planner that counts FLOPs
    only needs to rank devices on decode blocks (exact for W_o and FFN, heads also read KV)."""
    if bytes_per_s >= INF:
        return flops_per_s
    return min(flops_per_s, 2.0 * bytes_per_s / weight_bytes)
