"""RA step 4d (``testbed.partition.ra.hedge``): a split that wins only while the links stay as fast as
measured is traded for a baseline's robust plan; a split whose gain survives the links halving is
kept; and RA never ends more than the portfolio's slack above the baselines' best plan today."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from testbed.core.snapshot import LinkState
from testbed.partition.common import evaluate
from testbed.partition.layer.edgeshard import edgeshard
from testbed.partition.ra.hedge import regrets, slowed
from testbed.partition.ra.planner import resource_aware
from testbed.partition.synthetic import star_snapshot
from testbed.spec.profiles import get_profile

from ra_instances import LLAMA7

MBIT = 1e6 / 8


def rpi4_star(n: int, mbps: float, delay_ms: float = 0.2):
    """n Raspberry Pi 4B 8 GB boards (their published roofline) on one switch, every one computing."""
    p = get_profile("rpi4-8gb")
    snap = star_snapshot([p.flops_for("q4_0")] * n, [p.mem_limit_mib * 2**20] * n, [mbps * MBIT] * n,
                         [delay_ms / 1e3] * n, context_len=16, allow_blocks_on_source=True)
    devices = tuple(replace(d, mem_bw_bytes_per_s=p.mem_bw_bytes_per_s, call_overhead_s=p.call_overhead_s)
                    for d in snap.devices)
    return replace(snap, devices=devices, tokens_remaining=32)


def test_slowed_scales_rates_and_keeps_delays():
    snap = rpi4_star(3, 10)
    slow = slowed(snap, 0.5)
    assert slow.path("d1", "d2").bandwidth_bytes_per_s == pytest.approx(5 * MBIT)
    assert slow.path("d1", "d2").latency_s == snap.path("d1", "d2").latency_s
    as_dict = replace(snap, paths={k: LinkState(v.bandwidth_bytes_per_s, v.latency_s) for k, v in snap.paths.items()})
    assert slowed(as_dict, 0.25).path("d0", "d2").bandwidth_bytes_per_s == pytest.approx(2.5 * MBIT)


def test_regret_is_the_worse_of_the_two_futures():
    # plan 0 best now, 40 % worse when slow; plan 1 10 % worse now, best when slow
    assert regrets([1.0, 1.1], [1.4, 1.0]) == pytest.approx([1.4, 1.1])
    assert regrets([1.0, 1.1], [1.4, None]) == [1.0, float("inf")]


def _lat(pl, snap):
    return evaluate(pl, snap, LLAMA7, "decode").token_latency_s


def test_a_marginal_bet_on_fast_links_is_hedged():
    # Llama-2-7B Q4_0 on 8 Pi 4 boards at 5 Mbit/s: a split is ~11 % faster while the links hold and
    # much slower when they halve (the regime map's fluctuating points, 1.06-1.13x over EdgeShard)
    snap = rpi4_star(8, 5)
    bet = resource_aware(snap, LLAMA7, rate_hedge=None)
    hedged = resource_aware(snap, LLAMA7)
    layer = edgeshard(snap, LLAMA7)
    assert len(bet.devices()) > 1 and _lat(bet, snap) < 0.95 * _lat(layer, snap)
    assert _lat(bet, slowed(snap, 0.5)) > 1.05 * _lat(layer, slowed(snap, 0.5))
    assert _lat(hedged, snap) <= 1.01 * _lat(layer, snap)
    assert _lat(hedged, slowed(snap, 0.5)) <= 1.01 * _lat(layer, slowed(snap, 0.5))


@pytest.mark.parametrize("mbps", [300, 1000])
def test_a_split_that_survives_slow_links_is_kept(mbps):
    snap = rpi4_star(8, mbps)
    bet = resource_aware(snap, LLAMA7, rate_hedge=None)
    hedged = resource_aware(snap, LLAMA7)
    assert hedged.layers == bet.layers
    assert _lat(hedged, snap) < 0.75 * _lat(edgeshard(snap, LLAMA7), snap)


def test_never_above_the_baselines_today_by_more_than_the_slack():
    rng = np.random.default_rng(5)
    for mbps in rng.choice([5, 10, 20, 50, 100], size=4, replace=False):
        snap = rpi4_star(int(rng.integers(2, 9)), float(mbps), float(rng.choice([0.2, 2.0])))
        hedged = _lat(resource_aware(snap, LLAMA7), snap)
        unhedged = _lat(resource_aware(snap, LLAMA7, rate_hedge=None), snap)
        assert hedged <= 1.0101 * min(_lat(edgeshard(snap, LLAMA7), snap), max(unhedged, hedged))


def test_slow_objective_is_decode_cost_on_the_slowed_links():
    """``slow_objective`` (arrays over the slowed links) is ``decode_cost``'s latency there, exactly."""
    from testbed.core.placement import Placement
    from testbed.partition.common import Problem
    from testbed.partition.cost.latency import decode_cost
    from testbed.partition.layer.baselines import galaxy_plans
    from testbed.partition.ra.hedge import slow_objective

    snap = rpi4_star(6, 20)
    prob = Problem(snap, LLAMA7)
    prob.H = 64.0
    plans = [resource_aware(snap, LLAMA7), edgeshard(snap, LLAMA7)]
    plans += [pl for _, pl in galaxy_plans(prob, [2, 3, 5]) if isinstance(pl, Placement)]
    for pl in plans:
        assert slow_objective(prob, pl, 0.5) == decode_cost(pl, slowed(snap, 0.5), LLAMA7).token_latency_s
