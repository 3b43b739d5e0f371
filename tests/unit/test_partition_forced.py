"""RA's memory-forced and anticipated moves (docs/experiments.md, Open problem 4).

The snapshot mimics experiments/paper/bandwidth_drop.yaml with the emulated agents' memory
overhead: mini-gpt2 on a star of four hosts, d1 (h2) holding layers 0-4 and three heads of layer 5,
its access link at 1 Mbit/s (dropped) or 20 Mbit/s, its memory budget chosen so that the current
placement stops fitting at a chosen context length.
"""
from dataclasses import replace

import numpy as np
import pytest

from testbed.partition import plan
from testbed.partition.cost.blocks import block_memory_bytes
from testbed.partition.common import check_memory, fits_until
from testbed.partition.cost.latency import decode_cost, placement_memory
from testbed.core.errors import InfeasiblePlan
from testbed.partition.cost.migration import migration_delay
from testbed.partition.synthetic import random_star, star_snapshot
from testbed.core.placement import FfnShard, LayerPlacement, Placement, uniform_layer
from testbed.core.moves import moved_blocks
from testbed.core.snapshot import ModelDims

MINI = ModelDims("mini-gpt2", 6, 256, 8, 8, 32, 1024, 4096)
MIB, MBIT = 2**20, 1e6 / 8
T, N, H = 64, 8, 32  # context at the decision, tokens per epoch, RA's default horizon (4 epochs)

CUR = Placement("d0", tuple(uniform_layer("d1", 8, 1024) for _ in range(5)) + (
    LayerPlacement(("d1",) * 3 + ("d2",) * 5, "d2", (FfnShard("d2", 0, 1024),)),))


def star(d1_mbps: float, fits_to: int, current=CUR):
    """d1's budget is what ``current`` needs at context ``fits_to`` (it fits up to there)."""
    d1 = placement_memory(current, star_snapshot([1e9] * 4, [1] * 4, [1] * 4, [0] * 4), MINI, fits_to)["d1"]
    bws = [50 * MBIT, d1_mbps * MBIT, 10 * MBIT, 10 * MBIT]
    return star_snapshot([3.7e9] * 4, [2**30, d1, 16 * MIB, 16 * MIB], bws, [2e-3, 5e-3, 5e-3, 8e-3],
                         context_len=T, tokens_until_next_decision=N, current=current)


def lat(pl, snap):
    return decode_cost(pl, snap, MINI).token_latency_s


def test_fits_until_is_exact():
    for seed in range(4):
        snap = random_star(np.random.default_rng(seed), 5, MINI, mem_slack=1.3, context_len=T)
        pl = plan("resource_aware", snap, MINI).placement
        last = fits_until(pl, snap, MINI, "decode", T)
        assert T + N <= last < 10_000
        check_memory(pl, snap, MINI, "decode", int(last))
        with pytest.raises(InfeasiblePlan):
            check_memory(pl, snap, MINI, "decode", int(last) + 1)
    assert fits_until(CUR, star(20, T - 1), MINI, "decode", T) == float("-inf")


def test_no_move_off_a_1mbit_host_for_a_gain_below_its_delay():
    snap = star(1, T + 6 * N)  # not memory-bound for a while
    r = plan("resource_aware", snap, MINI)
    assert r.placement == CUR and r.migration_delay_s == 0
    # moving would gain, both the plan from scratch and just layer 5's heads (the emulated run's
    # move, ~3 ms/token), but over H tokens less than the move costs over the 1 Mbit/s link
    fresh = plan("resource_aware", replace(snap, current=None), MINI).placement
    l5 = Placement("d0", CUR.layers[:5] + (uniform_layer("d2", 8, 1024),))
    for other in (fresh, l5):
        gain = lat(CUR, snap) - lat(other, snap)
        assert gain > 0 and gain * H < migration_delay(CUR, other, snap, MINI)
    # the same decision when the gain pays (a very long horizon): RA moves
    assert plan("resource_aware", snap, MINI, horizon_tokens=10**7).placement != CUR


def test_predictable_forced_move_is_deferred_over_a_slow_link_and_made_early_over_a_fast_one():
    fits_to = T + 2 * N + 4  # evicted by the KV growth two decisions from now
    slow = plan("resource_aware", star(1, fits_to), MINI)
    assert slow.placement == CUR  # a head takes ~0.9 s at 1 Mbit/s: wait until forced
    fast = star(20, fits_to)
    r = plan("resource_aware", fast, MINI)
    moves = moved_blocks(CUR, r.placement)
    assert moves and all(a == "d1" for _, a, _ in moves), moves
    # it now fits past the anticipation window; each token of headroom cost less than a token
    after = fits_until(r.placement, fast, MINI, "decode", T)
    assert after >= T + 3 * N
    assert r.migration_delay_s < (after - fits_to) * lat(CUR, fast)
    # without anticipation the current placement is kept until forced
    assert plan("resource_aware", fast, MINI, anticipate_epochs=0).placement == CUR


def test_forced_move_over_a_1mbit_link_moves_the_fewest_bytes():
    snap = star(1, T + N - 3)  # does not fit until the next decision: must move now
    r = plan("resource_aware", snap, MINI)
    moves = moved_blocks(CUR, r.placement)
    # one head (the smallest block) covers the deficit; it goes to d2, which holds layer 5 already
    assert len(moves) == 1 and ".H" in moves[0][0] and moves[0][1:] == ("d1", "d2"), moves
    head = block_memory_bytes(MINI, "head", T)
    assert r.migration_delay_s == pytest.approx(0.010 + head / MBIT)  # d1-d2 path: 5 + 5 ms
    check_memory(r.placement, snap, MINI, "decode", T + N)
    # the fresh plan (what a re-plan from scratch would do) costs far more over this link
    fresh = plan("resource_aware", replace(snap, current=None), MINI).placement
    assert migration_delay(CUR, fresh, snap, MINI) > 5 * r.migration_delay_s


def test_forced_move_over_a_fast_link_is_topped_up():
    snap = star(20, T + N - 3)
    r = plan("resource_aware", snap, MINI)
    moves = moved_blocks(CUR, r.placement)
    assert len(moves) > 1 and all(a == "d1" for _, a, _ in moves), moves
    # enough headroom that the next forced move is not due at the next decisions, each token of
    # headroom beyond the minimum repair costing less than a token
    after = fits_until(r.placement, snap, MINI, "decode", T)
    assert after >= T + 4 * N
    one_head = 0.010 + block_memory_bytes(MINI, "head", T) / (20 * MBIT)
    assert r.migration_delay_s - one_head < (after - (T + N)) * lat(CUR, snap)
