"""RA step 5: migration only when it pays over the horizon, minimal repair, memory balance."""
from dataclasses import replace

import numpy as np
import pytest

from testbed.partition import plan
from testbed.partition.cost.latency import decode_cost, placement_memory
from testbed.partition.cost.migration import migration_delay
from testbed.partition.synthetic import star_snapshot
from testbed.core.placement import Placement, uniform_layer
from testbed.core.moves import moved_blocks
from testbed.core.snapshot import LinkState, ModelDims

DIMS = ModelDims("small", 2, 256, 4, 4, 64, 1024, 1000)
BIG = 2**30


def whole_on(dev):
    return Placement("d0", (uniform_layer(dev, DIMS.n_kv_heads, DIMS.ffn_dim),) * DIMS.n_layers)


def snap3(speeds=(1e10, 1e8, 1.3e8, 1e8), bws=(1e6,) * 4, mems=(BIG,) * 4, **kw):
    return star_snapshot(list(speeds), list(mems), list(bws), [1e-3] * 4, context_len=32,
                         tokens_until_next_decision=8, **kw)


def gain_and_delay(snap, new):
    cur = snap.current
    gain = decode_cost(cur, snap, DIMS).token_latency_s - decode_cost(new, snap, DIMS).token_latency_s
    return gain, migration_delay(cur, new, snap, DIMS)


def test_no_migration_when_gain_over_horizon_is_below_delay():
    snap = snap3(current=whole_on("d1"))  # d2 is 30 % faster: moving would gain, but slowly pays
    fresh = plan("resource_aware", replace(snap, current=None), DIMS).placement
    gain, delay = gain_and_delay(snap, fresh)
    assert gain > 0 and delay > 0
    short = int(delay / gain / 4)  # the gain over this horizon is a quarter of the delay
    # step 5 alone (``level_tol=0``): step 6 (leveling) may still move an FFN chunk to d2 here, its stall
    # within 2 % of the objective, for a lower peak (tests/unit/test_partition_leveling.py)
    r = plan("resource_aware", snap, DIMS, horizon_tokens=short, level_tol=0.0)
    assert r.placement == snap.current and r.migration_delay_s == 0
    # the same decision with a horizon over which the move pays for itself: RA moves
    r = plan("resource_aware", snap, DIMS, horizon_tokens=int(4 * delay / gain) + 1, level_tol=0.0)
    assert r.placement != snap.current
    g, d = gain_and_delay(snap, r.placement)
    assert g * (4 * delay / gain) > d


def test_migrates_when_a_link_drops_10x_and_the_gain_pays():
    base = snap3(speeds=(1e10, 1e8, 1e8, 1e8), current=whole_on("d1"))
    paths = {k: (LinkState(v.bandwidth_bytes_per_s / 10, v.latency_s) if "d1" in k else v) for k, v in base.paths.items()}
    dropped = replace(base, paths=paths)
    H = 100_000
    r = plan("resource_aware", dropped, DIMS, horizon_tokens=H)
    assert r.placement != dropped.current
    gain, delay = gain_and_delay(dropped, r.placement)
    assert gain * H > delay > 0
    # with a short horizon the same drop does not pay for moving 6 MB over the slowed link
    assert gain * 100 < delay
    assert plan("resource_aware", dropped, DIMS, horizon_tokens=100).placement == dropped.current


def test_repair_moves_only_what_must_move():
    # the whole model on d1 fits at T=32 but not after 8 more tokens of KV growth
    cur = whole_on("d1")
    need = placement_memory(cur, snap3(), DIMS, 32)["d1"]
    snap = snap3(mems=(BIG, need + 100, BIG, BIG), current=cur)
    r = plan("resource_aware", snap, DIMS)
    moves = moved_blocks(cur, r.placement)
    assert 0 < len(moves) <= 2, moves
    mem = placement_memory(r.placement, snap, DIMS, 40)
    assert all(mem[d.name] <= d.mem_budget_bytes for d in snap.devices)
    fresh = plan("resource_aware", replace(snap, current=None), DIMS).placement
    assert r.migration_delay_s <= migration_delay(cur, fresh, snap, DIMS)


def test_ra_peak_memory_not_above_a_packed_plan_on_a_balanced_instance():
    dims = ModelDims("bal", 4, 512, 8, 8, 64, 2048, 1000)
    snap = star_snapshot([1e9] * 5, [BIG] * 5, [1e8] * 5, [1e-4] * 5, context_len=32)

    def peak(pl):
        return max(v for k, v in placement_memory(pl, snap, dims, 40).items() if k != "d0")

    packed = plan("greedy", snap, dims).placement
    ra = plan("resource_aware", snap, dims).placement
    assert peak(ra) <= peak(packed)
    flat = plan("resource_aware", snap, dims, mem_balance=1.0, balance_slack=np.inf).placement
    per_device = dims.n_layers * placement_memory(packed, snap, dims, 40)["d1"] / 4 / dims.n_layers
    assert peak(flat) <= peak(packed) / 2 and peak(flat) <= 1.5 * per_device


def test_balance_trades_bounded_latency():
    dims = ModelDims("bal", 4, 512, 8, 8, 64, 2048, 1000)
    snap = star_snapshot([1e9, 4e9, 1e9, 1e9, 1e9], [BIG] * 5, [1e7] * 5, [1e-3] * 5, context_len=32)
    free = plan("resource_aware", snap, dims, mem_balance=None).predicted_token_latency_s
    bal = plan("resource_aware", snap, dims, mem_balance=1.0, balance_slack=0.05).predicted_token_latency_s
    assert bal <= 1.05 * free + 1e-12
