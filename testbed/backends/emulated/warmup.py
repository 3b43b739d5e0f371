"""Measure what a *working* node agent is charged beyond its blocks, before any algorithm runs.

A freshly spawned agent is charged its idle pages (0.5-4 MiB here, varying from spawn to spawn);
once it has loaded blocks and run a token its charge beyond those blocks is ~3.5 MiB more (runtime
buffers, threads, allocator state), whatever the number of blocks. Planning the first placement
with the idle figure over-promises memory: a static placement packed to the promise was OOM-killed
at its first prefill. So the emulated cluster runs a short warm-up on fresh agents (whole layers
round-robin over the workers, a prefill and four tokens), reads every host's usage minus its blocks
after each token, and plans every algorithm's first placement with those figures (one for all
workers, ``working_overheads``) — the same figures for all algorithms, so the comparison stays fair.
The source is measured apart: it built and shipped every block, and its charge for that (up to the
whole model's size when freed payloads linger in malloc's arenas) once made the single worst-host
figure leave every 20 MiB worker 0 MiB — "infeasible" in 4 of 6 quickstarts on a fresh machine.
"""
from __future__ import annotations

from testbed.core.errors import AlgorithmFailure
from testbed.core.placement import FfnShard, LayerPlacement, Placement


def warmup_workers(hosts: list[str], source: str) -> list[str]:
    """The hosts the warm-up gives layers: all but the source (the source only when it is alone)."""
    return [h for h in hosts if h != source] or [source]


def warmup_placement(hosts: list[str], source: str, n_layers: int, n_groups: int, ffn_dim: int) -> Placement:
    """Whole layers round-robin over the workers (``warmup_workers``)."""
    workers = warmup_workers(hosts, source)
    layers = tuple(LayerPlacement((w,) * n_groups, w, (FfnShard(w, 0, ffn_dim),))
                   for w in (workers[l % len(workers)] for l in range(n_layers)))
    return Placement(source, layers)


def _excess_bytes(cluster, host: str) -> int:
    """``host``'s cgroup charge beyond the blocks it holds, read from its agent."""
    st = cluster.pool.call(host, "stats", 30.0)
    return st["cgroup_usage_bytes"] - sum((st.get("blocks") or {}).values())


def working_overheads(samples: dict[str, list[int]], workers: list[str]) -> dict[str, int]:
    """Per host, the charge to plan with: each host's median reading (one transient — a socket
    buffer, a freed payload not yet returned to the kernel — does not set the figure), then ONE
    figure for all workers, the largest of their medians (workers are alike; a spawn-to-spawn
    difference in idle pages must not make one of them look smaller). Hosts that held no blocks in
    the warm-up (the source) keep their own median: the source's charge for shipping weights says
    nothing about a worker's."""
    median = {h: sorted(v)[len(v) // 2] for h, v in samples.items()}
    worst_worker = max(median[w] for w in workers)
    return {h: worst_worker if h in workers else m for h, m in median.items()}


def measure_working_overhead(cluster, prompt_len: int = 8, tokens: int = 4) -> tuple[dict[str, int], float, float] | None:
    """After a warm-up: each host's charge beyond its blocks (``working_overheads``, read after
    every decode token); the fixed cost of one block call (the decode tokens' measured
    critical-path compute beyond what the FLOPs at the calibrated speeds predict, over the calls on
    that path: three a layer and the LM head); and the runtime's cost of one activation message
    between hosts (the measured transfer + wait on the critical path beyond the links' predicted
    transfer, over the path's cross-host messages: one per layer boundary and one back to the
    source) — serialising, handing the frame to the worker, waking it: time a real device's runtime
    spends too, which the links' delay and rate do not contain. None if the warm-up placement does
    not fit (the caller keeps its static estimates)."""
    from node_agent.model.config import ModelConfig
    from testbed.partition.cost.latency import decode_cost
    from testbed.core.snapshot import ModelDims

    cfg = cluster.pool.config
    dims = ModelDims.from_config(ModelConfig.from_dict(cfg))
    source = cluster.topology.source
    pl = warmup_placement(cluster.hosts(), source, dims.n_layers, dims.n_kv_heads, dims.ffn_dim)
    excess, comm, samples = [], [], {h: [] for h in cluster.hosts()}
    try:
        tok = cluster.load(pl, [1 + i % 7 for i in range(prompt_len)]).token_id
        snap = cluster.snapshot(prompt_len, 1)  # calibrated speeds (no per-call cost known yet)
        for i in range(tokens):
            rec = cluster.step(tok)
            tok = rec.token_id
            if i:  # the first decode token still warms caches up
                predicted = decode_cost(pl, snap, dims, context_len=prompt_len + i + 1)
                excess.append(rec.compute_s - predicted.compute_s)
                comm.append(rec.transfer_s + rec.wait_s - predicted.transfer_s)
            for h in samples:
                samples[h].append(_excess_bytes(cluster, h))
    except AlgorithmFailure:
        return None
    workers = warmup_workers(cluster.hosts(), source)
    calls = 3 * dims.n_layers + 1
    per_call = max(0.0, min(excess)) / calls if excess else 0.0
    messages = sum(1 for a, b in zip([source, *(lp.proj for lp in pl.layers)], [*(lp.proj for lp in pl.layers), source])
                   if a != b)
    per_message = max(0.0, sorted(comm)[len(comm) // 2]) / messages if comm and messages else 0.0
    return working_overheads(samples, workers), per_call, per_message
