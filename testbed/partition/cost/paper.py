"""The paper's single-layer evaluation model (arXiv 2505.02533, paper-notes "cost model"): per-block
FLOPs and bytes as the paper counts them, its memory per device and its token latency. The
``decode`` model (``cost.latency``) is the one the runtime follows; this one reproduces the paper.
"""
from __future__ import annotations

from collections import Counter

from testbed.core.placement import Placement
from testbed.core.snapshot import ClusterSnapshot, ModelDims
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import CostResult, Net


def paper_constants(dims: ModelDims, L: int) -> dict:
    """Paper model per-block FLOPs/bytes for sequence length L (unit = one KV group of q heads).

    Under MHA (q = 1) these are the paper's numbers exactly: head 3·L·D·d + L²·d FLOPs,
    3·L·d·p + 3·D·d·p bytes; proj L·D² FLOPs (L·D·(H·d) in general), L·D·p bytes; FFN 8·L·D² FLOPs
    (m·L·D·F in general, m = 2 matrices, F = 4D) and 4·L·D·p bytes (L·F·p in general).
    """
    D, d, q, p = dims.d_model, dims.head_dim, dims.q_per_group, dims.bytes_per_param
    return {
        "head_flops": (q + 2) * L * D * d + q * L * L * d,
        "head_bytes": (q + 2) * L * d * p + (q + 2) * D * d * p,
        "head_out_bytes": q * L * d * p,
        "proj_flops": L * D * dims.n_heads * d,
        "proj_bytes": L * D * p,
        "ffn_flops": B.ffn_mats(dims) * L * D * dims.ffn_dim,
        "ffn_bytes": L * dims.ffn_dim * p,
        "hidden_bytes": L * D * p,
    }


def paper_memory(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims, L: int) -> dict[str, int]:
    k = paper_constants(dims, L)
    mem = {d.name: 0 for d in snapshot.devices}
    mem[placement.source] = mem.get(placement.source, 0) + B.source_bytes(dims)
    for lp in placement.layers:
        for dev in lp.heads:
            mem[dev] = mem.get(dev, 0) + k["head_bytes"]
        mem[lp.proj] = mem.get(lp.proj, 0) + k["proj_bytes"]
        for s in lp.ffn:
            mem[s.device] = mem.get(s.device, 0) + k["ffn_bytes"] * (s.col_end - s.col_start) // dims.ffn_dim
    return mem


def paper_cost(placement: Placement, snapshot: ClusterSnapshot, dims: ModelDims,
               context_len: int | None = None, net: Net | None = None) -> CostResult:
    """T = max_j n_j·F_h/C_j + Σ_{j≠P,n_j>0} n_j·o/B_jP + F_p/C_P + Σ_{k≠P} L·D·p/B_Pk + max_k F_ffn,k/C_k.

    One layer only. An FFN split into shards (not in the paper) generalises as: the hidden state is
    sent to every shard device (summed, like the paper's transfers), shards compute in parallel.
    """
    if len(placement.layers) != 1:
        raise ValueError(f"the paper cost model is single-layer; placement has {len(placement.layers)} layers")
    L = snapshot.context_len if context_len is None else context_len
    net = net or Net(snapshot)
    k, lp = paper_constants(dims, L), placement.layers[0]
    P = lp.proj
    head_c, xfer = 0.0, 0.0
    for j, n in Counter(lp.heads).items():
        head_c = max(head_c, net.compute(j, n * k["head_flops"]))
        if j != P:
            xfer += n * k["head_out_bytes"] * net.link(j, P)[1]
    ffn_c = 0.0
    for s in lp.ffn:
        ffn_c = max(ffn_c, net.compute(s.device, k["ffn_flops"] * (s.col_end - s.col_start) / dims.ffn_dim))
        if s.device != P:
            xfer += k["hidden_bytes"] * net.link(P, s.device)[1]
    comp = head_c + net.compute(P, k["proj_flops"]) + ffn_c
    return CostResult(comp + xfer, paper_memory(placement, snapshot, dims, L), comp, xfer)
