"""Measure what a *working* node agent is charged beyond its blocks, before any algorithm runs.

A freshly spawned agent is charged its idle pages (0.5-4 MiB here, varying from spawn to spawn);
once it has loaded blocks and run a token its charge beyond those blocks is ~3.5 MiB more (runtime
buffers, threads, allocator state), whatever the number of blocks. Planning the first placement
with the idle figure over-promises memory: a static placement packed to the promise was OOM-killed
at its first prefill. So the emulated cluster runs a short warm-up on fresh agents (whole layers
round-robin over the workers, a prefill and four tokens), reads every host's usage minus its blocks,
and plans every algorithm's first placement with the worst host's figure — the same figure for all
algorithms, so the comparison stays fair.
"""
from __future__ import annotations

from testbed.core.errors import AlgorithmFailure
from testbed.core.placement import FfnShard, LayerPlacement, Placement


def warmup_placement(hosts: list[str], source: str, n_layers: int, n_groups: int, ffn_dim: int) -> Placement:
    """Whole layers round-robin over the workers (the source only when it is the only host)."""
    workers = [h for h in hosts if h != source] or [source]
    layers = tuple(LayerPlacement((w,) * n_groups, w, (FfnShard(w, 0, ffn_dim),))
                   for w in (workers[l % len(workers)] for l in range(n_layers)))
    return Placement(source, layers)


def measure_working_overhead(cluster, prompt_len: int = 8, tokens: int = 4) -> tuple[int, float] | None:
    """After a warm-up: the largest (cgroup usage - blocks held) over the hosts, and the fixed
    cost of one block call (the decode tokens' measured critical-path compute beyond what the
    FLOPs at the calibrated speeds predict, over the calls on that path: three a layer and the LM
    head). None if the warm-up placement does not fit (the caller keeps its static estimates)."""
    from node_agent.model.config import ModelConfig
    from testbed.partition.cost.latency import decode_cost
    from testbed.core.snapshot import ModelDims

    cfg = cluster.pool.config
    dims = ModelDims.from_config(ModelConfig.from_dict(cfg))
    pl = warmup_placement(cluster.hosts(), cluster.topology.source, dims.n_layers, dims.n_kv_heads, dims.ffn_dim)
    excess = []
    try:
        tok = cluster.load(pl, [1 + i % 7 for i in range(prompt_len)]).token_id
        snap = cluster.snapshot(prompt_len, 1)  # calibrated speeds (no per-call cost known yet)
        for i in range(tokens):
            rec = cluster.step(tok)
            tok = rec.token_id
            if i:  # the first decode token still warms caches up
                predicted = decode_cost(pl, snap, dims, context_len=prompt_len + i + 1).compute_s
                excess.append(rec.compute_s - predicted)
    except AlgorithmFailure:
        return None
    worst = 0
    for h in pl.devices():
        st = cluster.pool.call(h, "stats", 30.0)
        worst = max(worst, st["cgroup_usage_bytes"] - sum((st.get("blocks") or {}).values()))
    calls = 3 * dims.n_layers + 1
    per_call = max(0.0, min(excess)) / calls if excess else 0.0
    return worst, per_call
