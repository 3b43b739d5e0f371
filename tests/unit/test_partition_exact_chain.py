"""Exact several-layer decode search (``exact.chain``): the certified optimum == brute force over
every placement (any heads tuple, proj, FFN cut at the chunk boundaries in any layout and order)
under the serialised ``decode_cost``, on small instances where memory binds; an uncertified
result's lower bound still bounds the brute-force optimum."""
import itertools
from dataclasses import replace

import numpy as np
import pytest

from testbed.partition import plan
from testbed.partition.common import Problem
from testbed.partition.cost.blocks import ffn_chunk_bounds
from testbed.partition.cost.latency import Net, decode_cost, placement_memory
from testbed.partition.exact.chain import ChainSearch, Column
from testbed.partition.synthetic import random_star, star_snapshot
from testbed.core.placement import FfnShard, LayerPlacement, Placement
from testbed.core.snapshot import ModelDims

TWO = ModelDims("two", 2, 32, 4, 2, 16, 64, 50, gated_ffn=True)
THREE = ModelDims("three", 3, 32, 4, 2, 16, 64, 50)


def _layers(devs, dims, K):
    """Every layer placement: any heads tuple, any proj, any FFN layout at the K chunk
    boundaries (any device per chunk, any shard first, the others in any order)."""
    bounds = ffn_chunk_bounds(dims.ffn_dim, K)
    ffns = set()
    for assign in itertools.product(devs, repeat=K):
        shards = [FfnShard(d, a, b) for d, (a, b) in zip(assign, bounds)]
        for perm in itertools.permutations(range(K)):
            ffns.add(tuple(shards[i] for i in perm))
    return [LayerPlacement(h, p, f) for h in itertools.product(devs, repeat=dims.n_kv_heads)
            for p in devs for f in sorted(ffns, key=str)]


def brute(snap, dims, K):
    """Serialised minimum over every plan that fits at the memory horizon."""
    devs = [d.name for d in snap.devices if snap.allow_blocks_on_source or not d.is_source]
    T_mem = snap.context_len + snap.tokens_until_next_decision
    budget = {d.name: d.mem_budget_bytes for d in snap.devices}
    net, best = Net(snap), np.inf
    for layers in itertools.product(_layers(devs, dims, K), repeat=dims.n_layers):
        pl = Placement(snap.source, layers)
        mem = placement_memory(pl, snap, dims, T_mem)
        if all(v <= budget[k] for k, v in mem.items()):
            best = min(best, decode_cost(pl, snap, dims, net=net).token_latency_s)
    return best


CASES = [  # (seed, devices incl. the source, dims, K, memory slack, blocks on the source)
    (0, 3, TWO, 2, 1.2, False), (1, 3, TWO, 2, 1.5, False), (2, 4, TWO, 1, 1.3, False),
    (3, 4, TWO, 1, 1.1, False), (4, 3, TWO, 2, 1.3, True), (5, 3, THREE, 1, 1.2, False),
    (6, 3, THREE, 1, 1.6, False),
]


@pytest.mark.parametrize("seed,n,dims,K,slack,on_source", CASES)
def test_chain_optimum_equals_brute_force(seed, n, dims, K, slack, on_source):
    rng = np.random.default_rng(500 + seed)
    snap = random_star(rng, n, dims, mem_slack=slack, allow_blocks_on_source=on_source)
    if on_source:  # a slow source with room for about half a layer: holding blocks there is a choice
        from testbed.partition.cost.blocks import block_memory_bytes, ffn_bytes, proj_bytes, source_bytes

        layer = dims.n_kv_heads * block_memory_bytes(dims, "head", 24) + proj_bytes(dims) + ffn_bytes(dims)
        src = replace(snap.devices[0], flops_per_s=3e8, mem_limit_bytes=source_bytes(dims) + layer // 2)
        snap = replace(snap, devices=(src,) + snap.devices[1:])
    r = plan("optimal", snap, dims, ffn_chunks=K)
    best = brute(snap, dims, K)
    meta = r.placement.meta
    assert meta["solver"].startswith("chain")
    assert meta["latency_certified"], meta
    assert r.predicted_token_latency_s == pytest.approx(best, rel=1e-9)
    assert meta["latency_lower_bound_s"] <= best * (1 + 1e-9)


def test_chain_ties_equal_brute_force():
    """Identical workers (fan-in arrivals tie; decode_cost breaks ties by send order)."""
    from testbed.partition.cost.blocks import block_memory_bytes, ffn_bytes, proj_bytes, source_bytes

    layer = 2 * block_memory_bytes(TWO, "head", 24) + proj_bytes(TWO) + ffn_bytes(TWO)
    mems = [2 * source_bytes(TWO)] + [int(0.8 * layer)] * 3
    snap = star_snapshot([1e9, 5e8, 5e8, 5e8], mems, [10e6, 2e6, 2e6, 2e6], [1e-3] * 4)
    r = plan("optimal", snap, TWO, ffn_chunks=1)
    assert r.placement.meta["latency_certified"]
    assert r.predicted_token_latency_s == pytest.approx(brute(snap, TWO, 1), rel=1e-9)


@pytest.mark.parametrize("case", [0, 1, 5, 6])
def test_chain_branching_equals_brute_force(case):
    """Few options allowed per node MILP (``max_options=10``): the search branches over which
    devices are aggregators and still certifies the brute-force optimum; with fewer (3, 1) it
    may stop uncertified, and then its lower bound is still below the optimum."""
    seed, n, dims, K, slack, _ = CASES[case]
    snap = random_star(np.random.default_rng(500 + seed), n, dims, mem_slack=slack)
    best = brute(snap, dims, K)
    r = ChainSearch(Problem(snap, dims), K).solve(max_options=10)
    assert r.certified and r.meta["chain_tree_nodes"] > 1
    assert r.latency_s == pytest.approx(best, rel=1e-9)
    for few in (3, 1):
        r = ChainSearch(Problem(snap, dims), K).solve(max_options=few)
        assert r.lower_bound_s <= best * (1 + 1e-9) <= r.latency_s * (1 + 1e-9)
        assert not r.certified or r.latency_s == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_chain_uncertified_bound_is_a_bound(seed):
    """With no room for the final MILP (``max_options=0``) the plan is the best found and the
    reported lower bound (the Lagrangian one) still lies below the brute-force optimum."""
    snap = random_star(np.random.default_rng(600 + seed), 3, TWO, mem_slack=1.3)
    best = brute(snap, TWO, 2)
    r = ChainSearch(Problem(snap, TWO), 2).solve(max_options=0)
    assert not r.certified
    assert r.lower_bound_s <= best * (1 + 1e-9) <= r.latency_s * (1 + 1e-9)


@pytest.mark.parametrize("on_source", [False, True])
def test_chain_tables_bound_decode_cost(on_source):
    """Every attention and FFN option's tabulated cost, summed along a realised plan, is at most
    that plan's decode_cost (== without near-ties); the attention floor (any send order) is at
    most the attention table for every input device, proj and head-count row."""
    dims = ModelDims("t", 3, 64, 6, 6, 16, 256, 50)
    snap = random_star(np.random.default_rng(7), 5, dims, mem_slack=3, allow_blocks_on_source=on_source)
    S = ChainSearch(Problem(snap, dims), 4)
    for (A, iP), floor in S.floor.items():
        rows = np.arange(len(S.rows[iP]))
        assert (floor <= S.att_exact(A, iP, rows) * (1 + 1e-12)).all(), (A, iP)
    rng = np.random.default_rng(1)
    for _ in range(40):
        cols, A = [], S.T.src
        for l in range(dims.n_layers):
            iP = int(rng.integers(S.T.m))
            row = int(rng.integers(len(S.rows[iP])))
            f = int(rng.choice(np.nonzero(S.f_P == iP)[0]))
            cols += [Column(l, A=A, iP=iP, row=row), Column(l, f=f)]
            A = int(S.f_agg[f])
        pl = S.placement(cols)
        tab = sum(S.col_cost(c) for c in cols)
        assert tab == pytest.approx(decode_cost(pl, snap, dims).token_latency_s, rel=1e-12)


def test_chain_certifies_8_devices_x_12_layers():
    """bench [5]'s instance (GPT-2, 8 workers): certified optimal and faster than RA's plan."""
    from testbed.partition.synthetic import GPT2

    snap = random_star(np.random.default_rng(0), 9, GPT2)
    r = plan("optimal", snap, GPT2)
    assert r.placement.meta["latency_certified"], r.placement.meta
    assert r.predicted_token_latency_s == pytest.approx(r.placement.meta["latency_lower_bound_s"], rel=1e-9)
    assert r.predicted_token_latency_s < plan("resource_aware", snap, GPT2).predicted_token_latency_s
