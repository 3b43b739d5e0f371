"""Synthetic snapshots for tests and benchmarks: star topologies described by plain numbers."""
from __future__ import annotations

import numpy as np

from testbed.core.paths import PathMatrix
from testbed.core.snapshot import ClusterSnapshot, DeviceState, ModelDims


def star_snapshot(speeds, mems, bws, lats, context_len: int = 16, tokens_until_next_decision: int = 8,
                  current=None, allow_blocks_on_source: bool = False) -> ClusterSnapshot:
    """Device 0 (``d0``) is the source. Device i reaches the hub over (bws[i], lats[i]); a path a->b
    has bandwidth min(bws[a], bws[b]) and latency lats[a] + lats[b] (a ``PathMatrix``)."""
    names = [f"d{i}" for i in range(len(speeds))]
    devices = tuple(DeviceState(n, int(m), 0, float(c), is_source=i == 0)
                    for i, (n, m, c) in enumerate(zip(names, mems, speeds)))
    bw, lat = np.asarray(bws, dtype=float), np.asarray(lats, dtype=float)
    up = ~np.eye(len(names), dtype=bool)
    paths = PathMatrix(names, np.minimum.outer(bw, bw), np.add.outer(lat, lat), up)
    return ClusterSnapshot(devices, paths, context_len, tokens_until_next_decision, current, allow_blocks_on_source)


def random_star(rng: np.random.Generator, n: int, dims: ModelDims, mem_slack: float = 2.0, **kw) -> ClusterSnapshot:
    """n devices (source included) with speeds 0.2-2 GFLOP/s, links 1-50 MB/s, 1-10 ms; memory such
    that the non-source devices together hold ``mem_slack`` times the model."""
    from testbed.partition.cost.blocks import block_memory_bytes, source_bytes

    T = kw.get("context_len", 16) + kw.get("tokens_until_next_decision", 8)
    per_layer = (dims.n_kv_heads * block_memory_bytes(dims, "head", T) + block_memory_bytes(dims, "proj", T)
                 + block_memory_bytes(dims, "ffn", T))
    total = per_layer * dims.n_layers * mem_slack
    share = rng.uniform(0.5, 1.5, n)
    mems = total * share / share[1:].sum()
    mems[0] = source_bytes(dims) + total
    speeds = rng.uniform(0.2e9, 2e9, n)
    bws = rng.uniform(1e6, 50e6, n)
    lats = rng.uniform(0.5e-3, 5e-3, n)
    return star_snapshot(speeds, mems, bws, lats, **kw)


GPT2 = ModelDims("gpt2", 12, 768, 12, 12, 64, 3072, 50257)
SMOLLM2 = ModelDims("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, gated_ffn=True)
