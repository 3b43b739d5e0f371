"""RA step 4b: the best contiguous layer split is a candidate on small clusters."""
import numpy as np
import pytest

from testbed.partition import plan
from testbed.partition.common import evaluate
from testbed.partition.layer.edgeshard import layer_level
from testbed.partition.ra.planner import resource_aware as _ra
from testbed.partition.synthetic import random_star
from testbed.core.snapshot import ModelDims

DIMS = ModelDims("s", 4, 256, 4, 4, 64, 1024, 1000)


def resource_aware(snap, dims, **kw):
    """RA up to step 5: these tests are about step 4b, before step 6 (leveling) may trade up to
    2 % of latency for a lower peak (tests/unit/test_partition_leveling.py)."""
    return _ra(snap, dims, level_tol=0.0, **kw)


def random_instance(seed: int):
    """3-5 workers holding 1.2-3x the model."""
    rng = np.random.default_rng(seed)
    return random_star(rng, int(rng.integers(4, 7)), DIMS, mem_slack=float(rng.uniform(1.2, 3)), context_len=64)


def latency(pl, snap):
    return evaluate(pl, snap, DIMS, "decode").token_latency_s


def test_a_chain_the_greedy_splits_at_a_full_device_is_replaced_by_the_layer_split():
    # 5 devices; the greedy starts on the device nearest the source (small), splits the second
    # and third layers at full devices and pays two extra hops; the layer split puts three
    # layers on the big device
    snap = random_instance(165)
    greedy = resource_aware(snap, DIMS, layer_split=False)
    assert not layer_level(greedy, DIMS)
    best = resource_aware(snap, DIMS, split_slack=0.0)
    assert best.meta.get("layer_split") and layer_level(best, DIMS)
    assert latency(best, snap) < 0.8 * latency(greedy, snap)


@pytest.mark.parametrize("slack", [0.0, 0.1])
def test_first_plans_never_lose_more_than_the_slack_and_the_split_is_layer_level(slack):
    worse = 0
    for seed in range(40):
        snap = random_instance(seed)
        # step 4b alone: step 4c (``portfolio``) may take a baseline's plan up to its own slack
        # worse (tests/unit/test_ra_hedge.py)
        greedy = resource_aware(snap, DIMS, layer_split=False, portfolio=False)
        pl = resource_aware(snap, DIMS, split_slack=slack, portfolio=False)
        assert latency(pl, snap) <= (1 + slack) * latency(greedy, snap) * (1 + 1e-12)
        if pl.meta.get("layer_split"):
            assert layer_level(pl, DIMS)
            worse += latency(pl, snap) > latency(greedy, snap)
            if worse and slack == 0.0:
                pytest.fail("with no slack the split is only taken when faster")
        else:
            assert pl.layers == greedy.layers
    if slack:
        assert worse > 0  # the slack is used: fewer bytes per token bought with a little latency


def test_big_clusters_too():
    # 20 workers (not ``thorough``): the DP runs on device orders cut to 2 x n_layers devices
    snap = random_star(np.random.default_rng(16), 21, DIMS, mem_slack=6.0, context_len=64)
    greedy = resource_aware(snap, DIMS, layer_split=False)
    pl = plan("resource_aware", snap, DIMS, split_slack=0.0, level_tol=0.0).placement
    assert pl.meta.get("layer_split") and layer_level(pl, DIMS)
    assert latency(pl, snap) < 0.9 * latency(greedy, snap)
