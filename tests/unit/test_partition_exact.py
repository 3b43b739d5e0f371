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
