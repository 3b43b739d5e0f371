"""Cost models and migration delay against hand-computed numbers on a tiny instance."""
import pytest

from testbed.partition.blocks import block_flops, block_memory_bytes
from testbed.partition.cost import decode_cost, paper_cost
from testbed.partition.migration import migration_estimate, pair_delay
from testbed.partition.cost import Net
from testbed.partition.synthetic import star_snapshot
from testbed.placement import FfnShard, LayerPlacement, Placement, uniform_layer
from testbed.snapshot import ModelDims

DIMS = ModelDims("tiny", 1, 4, 2, 2, 2, 8, 10)  # D=4, 2 heads (MHA), d=2, F=8, V=10, fp32


def snap(T=3):
    # every path: 100 B/s, 0.01 s; speeds 100, 10, 20 FLOP/s
    return star_snapshot([100, 10, 20], [10**6] * 3, [100] * 3, [0.005] * 3, context_len=T)


PL = Placement("d0", (LayerPlacement(("d1", "d2"), "d1", (FfnShard("d2", 0, 4), FfnShard("d1", 4, 8))),))


def test_block_numbers():
    assert block_memory_bytes(DIMS, "head", 3) == 96 + 48
    assert block_memory_bytes(DIMS, "proj", 3) == 64
    assert block_memory_bytes(DIMS, "ffn", 3, cols=4) == 128
    assert block_flops(DIMS, "head", 3) == 72
    assert block_flops(DIMS, "proj", 3) == 32


def test_decode_hand_computed():
    r = decode_cost(PL, snap(), DIMS)
    # att: head d1 7.2 s compute + 0.17 s input; proj 3.2 s; FFN shard on d1 6.4 s + 0.17 in + 0.17 to
    # aggregator d2; back to source 0.17 s; LM head 0.8 s
    assert r.compute_s == pytest.approx(7.2 + 3.2 + 6.4 + 0.8)
    assert r.transfer_s == pytest.approx(0.17 + 0.17 + 0.17)
    assert r.token_latency_s == pytest.approx(18.11)
    assert r.mem_bytes == {"d0": 160, "d1": 144 + 64 + 128, "d2": 144 + 128}
    assert r.bytes_by_link["d0->d1"] == 16 and r.bytes_by_link["d2->d1"] == 8


def test_decode_kv_growth():
    assert decode_cost(PL, snap(T=10), DIMS).mem_bytes["d2"] - decode_cost(PL, snap(T=3), DIMS).mem_bytes["d2"] == 7 * 16


def test_paper_hand_computed():
    pl = Placement("d0", (LayerPlacement(("d1", "d2"), "d1", (FfnShard("d2", 0, 8),)),))
    r = paper_cost(pl, snap(), DIMS)
    assert r.token_latency_s == pytest.approx(9 + 0.24 + 4.8 + 0.48 + 9.6)
    assert r.mem_bytes["d1"] == 168 + 48 and r.mem_bytes["d2"] == 168 + 96


def test_paper_rejects_multilayer():
    two = ModelDims("two", 2, 4, 2, 2, 2, 8, 10)
    with pytest.raises(ValueError):
        paper_cost(Placement("d0", (uniform_layer("d1", 2, 8),) * 2), snap(), two)


def test_migration_single_pair():
    old = Placement("d0", (uniform_layer("d1", 2, 8),))
    new = Placement("d0", (LayerPlacement(("d1", "d2"), "d1", (FfnShard("d2", 0, 8),)),))
    est = migration_estimate(old, new, snap(), DIMS)
    assert est.bytes_moved == 144 + 256
    assert est.delay_s == pytest.approx(0.01 + 400 / 100)


def test_migration_aggregation_per_sender_sum_then_max():
    net = Net(snap())
    d = pair_delay({("d0", "d1"): 100, ("d0", "d2"): 100, ("d1", "d2"): 300}, net)
    assert d == pytest.approx(max(2 * 1.01, 3.01))
