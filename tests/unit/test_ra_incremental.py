"""RA's incremental re-decision (``resource_aware(..., incremental=True)``, ``ra.incremental``) and
the per-layer migration delays it and every RA decision weigh candidates with
(``migration.planner_delay``).

Measured on 72 re-decisions (tests/unit/ra_instances bases and 48-device GPT-2 stars; links of
1 or 3 devices x0.1, a memory limit cut to 70 %, the context alone grown): the incremental plan
was the full decision's in 68, better by latency + migration / H in 3, worse in 1 (+6.4 %, a
limit cut on 5 devices)."""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from testbed.core.errors import InfeasiblePlan
from testbed.core.snapshot import LinkState
from testbed.partition.cost.migration import migration_estimate, planner_delay
from testbed.partition.cost.latency import Net
from testbed.partition.ra.incremental import Basis
from testbed.partition.ra.planner import resource_aware
from testbed.partition.synthetic import GPT2, random_star

sys.path.insert(0, str(Path(__file__).parent))
from ra_instances import _cut, _dropped, instances  # noqa: E402


def _ra(snap, dims, **kw):
    """RA up to step 5: the cases below were measured without step 6 (leveling, issue 19), which
    changes the first plans they start from (with it, seeds 0 and 2 keep the current placement
    incrementally where the full decision moves)."""
    return resource_aware(snap, dims, level_tol=0.0, **kw)


def _star(seed: int):
    snap = random_star(np.random.default_rng(100 + seed), 49, GPT2)
    return snap, _ra(snap, GPT2, incremental=True)


def test_planner_delay_is_the_migration_estimate():
    """Same floats as ``migration_estimate`` for every candidate pair, waves or not."""
    waves = checked = 0
    for name, snap, dims, cm, params in instances():
        cur = snap.current
        if cur is None:
            continue
        try:
            new = resource_aware(replace(snap, current=None), dims, cm, **params)
        except InfeasiblePlan:  # the limit cut leaves too little for a plan from scratch
            continue
        mixes = [replace(cur, layers=cur.layers[:l] + (new.layers[l],) + cur.layers[l + 1:])
                 for l in range(len(cur.layers))]
        memo, net = {}, Net(snap)
        for pl in [new, cur, *mixes]:
            ref = migration_estimate(cur, pl, snap, dims, cost_model=cm, net=net)
            assert planner_delay(cur, pl, snap, dims, cm, net, memo) == ref.delay_s, name
            waves += ref.waves > 1
            checked += 1
    assert checked > 300 and waves > 0


def test_planner_delay_at_other_rates_reuses_the_waves_exactly():
    """One memo, two link rates (RA's hedge weighs a plan again over slowed links): each delay is
    ``migration_estimate``'s over its own links, waves included."""
    from testbed.partition.ra.hedge import slowed

    waves = checked = 0
    for name, snap, dims, cm, params in instances():
        cur = snap.current
        if cur is None:
            continue
        try:
            new = resource_aware(replace(snap, current=None), dims, cm, **params)
        except InfeasiblePlan:
            continue
        mixes = [replace(cur, layers=cur.layers[:l] + (new.layers[l],) + cur.layers[l + 1:])
                 for l in range(len(cur.layers))]
        slow = slowed(snap, 0.5)
        memo, net, slow_net = {}, Net(snap), Net(slow)
        for pl in [new, cur, *mixes]:
            assert planner_delay(cur, pl, snap, dims, cm, net, memo) == migration_estimate(
                cur, pl, snap, dims, cost_model=cm, net=net).delay_s, name
            ref = migration_estimate(cur, pl, slow, dims, cost_model=cm, net=slow_net)
            assert planner_delay(cur, pl, slow, dims, cm, slow_net, memo) == ref.delay_s, name
            waves += ref.waves > 1
            checked += 1
    assert checked > 300 and waves > 0


def test_context_growth_alone_keeps_the_placement():
    snap, cur = _star(0)
    again = _ra(replace(snap, current=cur, context_len=snap.context_len + 8), GPT2, incremental=True)
    assert again == cur and isinstance(again.meta["ra_basis"], Basis)


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_links_dropped_give_the_full_decision(seed):
    snap, cur = _star(seed)
    re = _dropped(snap, cur, {"d5", "d17", "d30"})
    assert _ra(re, GPT2, incremental=True) == _ra(re, GPT2)


def test_a_better_link_or_other_parameters_mean_a_full_decision():
    snap, cur = _star(1)
    used = sorted(cur.devices() - {snap.source})
    re = _cut(snap, cur, used[len(used) // 2], 0.7)
    full = _ra(re, GPT2)
    inc = _ra(re, GPT2, incremental=True)
    assert inc != full and inc.meta.get("incremental_layers") == 1  # the measured case where they differ
    # other parameters than the basis was decided with: the full decision (with those parameters)
    assert _ra(re, GPT2, incremental=True, split_slack=0.2) == _ra(re, GPT2, split_slack=0.2)
    # a link that got better: the full decision
    paths = dict(re.paths)
    paths[("d3", "d0")] = LinkState(paths[("d3", "d0")].bandwidth_bytes_per_s * 2, paths[("d3", "d0")].latency_s)
    better = replace(re, paths=paths)
    assert _ra(better, GPT2, incremental=True) == _ra(better, GPT2)


def test_without_incremental_no_basis_is_attached():
    snap = random_star(np.random.default_rng(5), 9, GPT2)
    assert "ra_basis" not in resource_aware(snap, GPT2).meta
