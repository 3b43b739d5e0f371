"""Exact solver: MILP == brute force (paper and decode, with and without migration), enumeration == MILP."""
import itertools
from dataclasses import replace

import numpy as np
import pytest

from testbed.partition import plan
from testbed.partition.cost import decode_cost, paper_cost
from testbed.partition.exact import enumerate_paper
from testbed.partition.migration import migration_delay
from testbed.partition.synthetic import random_star
from testbed.placement import FfnShard, LayerPlacement, Placement
from testbed.snapshot import ModelDims

PAPER = ModelDims("p", 1, 64, 4, 4, 16, 256, 100)
DECODE = ModelDims("d", 2, 32, 4, 2, 16, 64, 50, gated_ffn=True)


def _fits(pl, snap, mem):
    return all(mem[d.name] <= d.mem_budget_bytes for d in snap.devices)


def brute_paper(snap, dims, with_migration=False):
    devs = [d.name for d in snap.devices if not d.is_source]
    best = np.inf
    T_mem = snap.context_len + snap.tokens_until_next_decision
    for heads in itertools.product(devs, repeat=dims.n_kv_heads):
        for p in devs:
            for f in devs:
                pl = Placement("d0", (LayerPlacement(heads, p, (FfnShard(f, 0, dims.ffn_dim),)),))
                if not _fits(pl, snap, paper_cost(pl, snap, dims, context_len=T_mem).mem_bytes):
                    continue
                t = paper_cost(pl, snap, dims).token_latency_s
                if with_migration:
                    t += migration_delay(snap.current, pl, snap, dims, cost_model="paper") / snap.tokens_until_next_decision
                best = min(best, t)
    return best


def brute_decode(snap, dims, serial_nics=False):
    devs = [d.name for d in snap.devices if not d.is_source]
    T_mem = snap.context_len + snap.tokens_until_next_decision
    layer_opts = [LayerPlacement(h, p, (FfnShard(f, 0, dims.ffn_dim),))
                  for h in itertools.product(devs, repeat=dims.n_kv_heads) for p in devs for f in devs]
    best = np.inf
    for layers in itertools.product(layer_opts, repeat=dims.n_layers):
        pl = Placement("d0", layers)
        if _fits(pl, snap, decode_cost(pl, snap, dims, context_len=T_mem).mem_bytes):
            best = min(best, decode_cost(pl, snap, dims, serial_nics=serial_nics).token_latency_s)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_paper_milp_equals_brute_force(seed):
    snap = random_star(np.random.default_rng(seed), 4, PAPER, mem_slack=1.3, context_len=32)
    r = plan("optimal", snap, PAPER, "paper")
    assert r.predicted_token_latency_s == pytest.approx(brute_paper(snap, PAPER), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_paper_milp_with_migration_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    snap = random_star(rng, 4, PAPER, mem_slack=1.5, context_len=32, tokens_until_next_decision=2)
    cur = Placement("d0", (LayerPlacement(("d1", "d2", "d3", "d1"), "d2", (FfnShard("d3", 0, PAPER.ffn_dim),)),))
    snap = replace(snap, current=cur)
    r = plan("optimal", snap, PAPER, "paper")
    got = r.predicted_token_latency_s + r.migration_delay_s / snap.tokens_until_next_decision
    assert got == pytest.approx(brute_paper(snap, PAPER, with_migration=True), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_enumeration_equals_milp(seed):
    dims = ModelDims("e", 1, 128, 12, 12, 16, 512, 100)
    snap = random_star(np.random.default_rng(seed), 5, dims, mem_slack=1.4, context_len=64)
    _, t_enum = enumerate_paper(snap, dims)
    assert plan("optimal", snap, dims, "paper").predicted_token_latency_s == pytest.approx(t_enum, rel=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_decode_milp_equals_brute_force(seed):
    snap = random_star(np.random.default_rng(seed), 4, DECODE, mem_slack=1.6)
    r = plan("optimal", snap, DECODE, ffn_chunks=1)
    # the MILP optimises the independent-transfer relaxation exactly ...
    relaxed = decode_cost(r.placement, snap, DECODE, serial_nics=False).token_latency_s
    assert relaxed == pytest.approx(brute_decode(snap, DECODE), rel=1e-6)
    # ... which bounds the serialised-NIC optimum from below
    assert r.predicted_token_latency_s >= relaxed - 1e-12
    assert brute_decode(snap, DECODE, serial_nics=True) >= relaxed - 1e-12


def test_decode_milp_not_worse_than_ra():
    snap = random_star(np.random.default_rng(9), 4, DECODE, mem_slack=2)
    opt = plan("optimal", snap, DECODE, ffn_chunks=2).predicted_token_latency_s
    ra = plan("resource_aware", snap, DECODE, ffn_chunks=2).predicted_token_latency_s
    assert opt <= ra + 1e-12


def test_paper_5x32_fast():
    dims = ModelDims("p32", 1, 512, 32, 32, 16, 2048, 100)
    snap = random_star(np.random.default_rng(11), 6, dims, context_len=128)
    r = plan("optimal", snap, dims, "paper")
    assert r.solve_time_s < 10
    assert r.predicted_token_latency_s == pytest.approx(enumerate_paper(snap, dims)[1], rel=1e-6)


def _star4_gpt2_layer(context_len, current=None):
    """star4 of experiments/paper/small_scale_exact.yaml: GPT-2 layer, 9/18/18 MiB workers."""
    from testbed.partition.synthetic import star_snapshot

    mib = 2 ** 20
    return star_snapshot([35.5e9, 8.88e9, 17.76e9, 13.32e9], [8192 * mib, 9.216 * mib, 18.432 * mib, 18.432 * mib],
                         [50e6 / 8, 20e6 / 8, 50e6 / 8, 50e6 / 8], [2e-3] * 4, context_len=context_len,
                         current=current)


def test_optimal_replan_after_kv_growth_moves_only_what_must_move():
    """The KV caches outgrow the fast device: the old optimal jumped to an unrelated placement
    (13 blocks, 1.6 s of migration for 0.1 ms/token); now migration is in the objective."""
    from testbed.placement import moved_blocks

    dims = ModelDims("gpt2-1layer", 1, 768, 12, 12, 64, 3072, 50257)
    cur = plan("optimal", _star4_gpt2_layer(32), dims).placement
    r = plan("optimal", _star4_gpt2_layer(72, cur), dims)
    moves = moved_blocks(cur, r.placement)
    full = {d for d in cur.devices() if cur.layers[0].heads.count(d) == dims.n_kv_heads}
    assert 1 <= len(moves) <= 2 and all(a in full for _, a, _ in moves), moves
    assert r.migration_delay_s < 0.2


@pytest.mark.parametrize("seed", [1, 3])
def test_optimal_replan_after_small_budget_cut_keeps_unrelated_blocks(seed):
    """One worker loses a few KB: blocks leave only that worker, everything else stays put."""
    from testbed.partition.cost import placement_memory
    from testbed.placement import moved_blocks

    dims = ModelDims("small-2layer", 2, 256, 8, 8, 32, 1024, 1000)
    snap = random_star(np.random.default_rng(100 + seed), 5, dims, mem_slack=1.5, context_len=32)
    cur = plan("optimal", snap, dims).placement
    mem = placement_memory(cur, snap, dims, 40)
    dev = max((d for d in snap.devices if not d.is_source), key=lambda d: mem[d.name]).name
    devs = tuple(replace(d, mem_limit_bytes=int(mem[d.name] - 1000)) if d.name == dev else d for d in snap.devices)
    r = plan("optimal", replace(snap, devices=devs, current=cur), dims)
    moves = moved_blocks(cur, r.placement)
    assert moves and all(a == dev for _, a, _ in moves), (dev, moves)
    assert len(moves) <= 2


@pytest.mark.parametrize("seed", range(6))
def test_optimal_replan_objective_not_worse_than_minimal_repair(seed):
    """latency + migration / H of optimal's re-plan <= that of RA's minimal repair of the old plan."""
    from testbed.partition.common import Problem
    from testbed.partition.cost import Net, placement_memory
    from testbed.partition.ra import _objective, repair

    dims = ModelDims("small-2layer", 2, 256, 8, 8, 32, 1024, 1000)
    snap = random_star(np.random.default_rng(100 + seed), 5, dims, mem_slack=1.5, context_len=32)
    cur = plan("optimal", snap, dims).placement
    mem = placement_memory(cur, snap, dims, 40)
    dev = max((d for d in snap.devices if not d.is_source), key=lambda d: mem[d.name]).name
    devs = tuple(replace(d, mem_limit_bytes=int(mem[d.name] - 1000)) if d.name == dev else d for d in snap.devices)
    s2 = replace(snap, devices=devs, current=cur)
    H = 4 * s2.tokens_until_next_decision
    prob, net = Problem(s2, dims), Net(s2)
    new = plan("optimal", s2, dims).placement
    fixed = repair(prob, cur, H, net, prob.budget)
    if fixed is not None:
        assert _objective(prob, new, H, net)[0] <= _objective(prob, fixed, H, net)[0] + 1e-9
