"""RA step 4c (``ra.portfolio``): the best baseline plan is taken unless RA's own plan is more than
``portfolio_slack`` better. Issue 13: at the compute-bound regime point, emulated, RA's own plan
(predicted 0.013 % faster than Galaxy's) ran 5.5 % slower than it; RA now takes Galaxy's plan there."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from testbed.partition import plan
from testbed.partition.ra.portfolio import _unless_clearly_better

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("now,slack,pick", [
    ([100.0], 0.01, 0),                  # no baseline
    ([100.0, 100.5, 101.0], 0.01, 1),    # ours 0.5 % better: not clearly, the best baseline's
    ([100.0, 100.0], 0.01, 1),           # a tie: the baseline's (regular) plan
    ([98.9, 100.0, 99.9], 0.01, 0),      # ours 1.0 % below the best baseline (99.9): kept
    ([99.0, 100.0, 99.95], 0.01, 2),     # 0.95 % below the best baseline (99.95): not more than the slack
    ([105.0, 101.0, 100.0], 0.01, 2),    # a baseline faster than ours: the fastest
    ([100.0, 100.0, 100.0], 0.0, 1),     # no slack: a tie still goes to a baseline
    ([99.0, 100.0], 0.0, 0),             # no slack: any gain keeps ours
])
def test_rule(now, slack, pick):
    assert _unless_clearly_better(now, slack) == pick


def _compute_lan_snapshot(message_overhead_s: float):
    from testbed.backends.simulated.build import build_simulated_cluster
    from testbed.run.planning import resolve_model
    from testbed.spec.loader import load_experiment

    spec = load_experiment(REPO / "experiments" / "paper" / "regime_points.yaml")  # the compute-bound point
    model = resolve_model(spec.model)
    cluster = build_simulated_cluster(spec.topology, model, host_overhead_mib=16.5,
                                      weights_from=spec.migration.weights_from, message_overhead_s=message_overhead_s)
    snap = cluster.snapshot(spec.workload.prompt_tokens, spec.repartition_every_tokens)
    return replace(snap, tokens_remaining=spec.workload.new_tokens), model.dims


def test_a_near_tie_at_the_compute_bound_point_takes_galaxys_plan():
    # 0.684 ms a message: what the emulated warm-up measured in the run where RA's own plan lost
    snap, dims = _compute_lan_snapshot(0.000684)
    ra, galaxy = plan("resource_aware", snap, dims), plan("galaxy", snap, dims)
    assert ra.placement.layers == galaxy.placement.layers
    assert ra.extra.get("portfolio") == "tensor_parallel"
    own = plan("resource_aware", snap, dims, portfolio=False)  # the greedy's own plan: barely faster
    assert own.placement.layers != galaxy.placement.layers
    assert galaxy.predicted_token_latency_s * 0.99 < own.predicted_token_latency_s <= galaxy.predicted_token_latency_s


def test_a_clear_win_keeps_ras_own_plan():
    # at 1.1 ms a message RA's own plan (fewer messages) is ~6 % faster than Galaxy's: kept
    snap, dims = _compute_lan_snapshot(0.0011)
    ra, galaxy = plan("resource_aware", snap, dims), plan("galaxy", snap, dims)
    assert "portfolio" not in ra.extra
    assert ra.predicted_token_latency_s < 0.97 * galaxy.predicted_token_latency_s
