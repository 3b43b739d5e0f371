"""Cost models and migration delay against hand-computed numbers on a tiny instance."""
import pytest

from testbed.partition.cost.blocks import block_flops, block_memory_bytes
from testbed.partition.cost.latency import decode_cost, paper_cost
from testbed.partition.cost.migration import migration_estimate, pair_delay
from testbed.partition.cost.latency import Net
from testbed.partition.synthetic import star_snapshot
from testbed.core.placement import FfnShard, LayerPlacement, Placement, uniform_layer
from testbed.core.snapshot import ModelDims

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


def snap4(T=3):
    # every path: 100 B/s, 0.01 s; speeds 100 (source), 10, 10, 10 FLOP/s
    return star_snapshot([100, 10, 10, 10], [10**6] * 4, [100] * 4, [0.005] * 4, context_len=T)


def test_decode_serialises_fan_out_hand_computed():
    pl = Placement("d0", (LayerPlacement(("d2", "d3"), "d1", (FfnShard("d1", 0, 8),)),))
    # x (16 B, 0.16 s on the wire) leaves d0 in the runtime's order proj, heads: d1 at 0.17,
    # d2 at 0.16 + 0.17 = 0.33, d3 at 0.32 + 0.17 = 0.49. Heads 7.2 s -> d3 done 7.69, its output
    # (8 B: 0.08 + 0.01) reaches d1 at 7.78 (d2's at 7.62, no queueing behind it: 7.62 + 0.08 < 7.78).
    # proj 3.2, FFN 12.8 on d1, x to d0 0.17, LM head 0.8.
    r = decode_cost(pl, snap4(), DIMS)
    assert r.token_latency_s == pytest.approx(7.78 + 3.2 + 12.8 + 0.17 + 0.8)
    assert r.compute_s == pytest.approx(7.2 + 3.2 + 12.8 + 0.8)
    assert r.transfer_s == pytest.approx(0.49 + 0.09 + 0.17)
    # independent transfers (no NIC sharing): d3 gets x at 0.17 -> 0.32 s less
    par = decode_cost(pl, snap4(), DIMS, serial_nics=False)
    assert par.token_latency_s == pytest.approx(r.token_latency_s - 0.32)


def test_decode_serialises_ffn_fan_out():
    # proj on d1 sends h to the shard devices in shard order (aggregator d1 is local, then d2, d3):
    # d2 gets h 0.17 s after proj, d3 0.33 s. Shards: d1 2 columns (32 FLOPs: 3.2 s), d2 and d3 3
    # columns (4.8 s). Partials (16 B, 0.16 s on the wire): d2's reaches d1 at 0.17 + 4.8 + 0.17 =
    # 5.14, d3's at 5.30 (it needs d1's downlink after d2's: 5.14 + 0.16 = 5.30, no extra wait).
    pl = Placement("d0", (LayerPlacement(("d1", "d1"), "d1",
                                         (FfnShard("d1", 0, 2), FfnShard("d2", 2, 5), FfnShard("d3", 5, 8))),))
    r = decode_cost(pl, snap4(), DIMS)
    pd = 0.17 + 2 * 7.2 + 3.2  # x to d1, both heads serial on d1, proj
    assert r.token_latency_s == pytest.approx(pd + 5.30 + 0.17 + 0.8)
    par = decode_cost(pl, snap4(), DIMS, serial_nics=False)
    assert par.token_latency_s == pytest.approx(pd + 5.14 + 0.17 + 0.8)


def test_fan_in_queue_hand_computed():
    from testbed.partition.cost.latency import _Nics

    nics = _Nics(Net(snap()), serial=True)
    # alone they would arrive at 1.0, 1.2, 0.5 (total times); each needs 0.5 s of the downlink:
    # 0.5 -> 0.5, 1.0 -> max(1.0, 1.0) = 1.0, 1.2 -> max(1.2, 1.5) = 1.5
    got = nics.fan_in([((0.2, 0.8), 0.5), ((0.2, 1.0), 0.5), ((0.0, 0.5), 0.5)])
    assert got == pytest.approx((0.2, 1.3))
    assert _Nics(Net(snap()), serial=False).fan_in([((0.2, 0.8), 0.5), ((0.2, 1.0), 0.5)]) == (0.2, 1.0)


def test_uplink_serialisation_order():
    from testbed.partition.cost.latency import _Nics

    nics = _Nics(Net(snap()), serial=True)
    a = nics.send("d0", "d1", 16, (0.0, 0.0))
    b = nics.send("d0", "d2", 16, (0.0, 0.0))
    c = nics.send("d1", "d2", 16, (0.0, 0.0))  # another sender: its own uplink
    assert a == pytest.approx((0.0, 0.17)) and b == pytest.approx((0.0, 0.33)) and c == pytest.approx((0.0, 0.17))
    assert nics.send("d0", "d0", 16, (1.0, 2.0)) == (1.0, 2.0)


def test_decode_adds_each_blocks_call_overhead_on_the_critical_path():
    from dataclasses import replace

    s = snap()
    with_calls = replace(s, devices=tuple(replace(d, call_overhead_s=0.5) for d in s.devices))
    r0, r1 = decode_cost(PL, s, DIMS), decode_cost(PL, with_calls, DIMS)
    # the critical path of test_decode_hand_computed: attention on d1, proj on d1, d1's FFN shard,
    # the LM head on d0 -> four calls
    assert r1.compute_s == pytest.approx(r0.compute_s + 4 * 0.5)
    assert r1.transfer_s == pytest.approx(r0.transfer_s)
    assert paper_cost(Placement("d0", (uniform_layer("d1", 2, 8),)), with_calls, DIMS).token_latency_s == \
        pytest.approx(paper_cost(Placement("d0", (uniform_layer("d1", 2, 8),)), s, DIMS).token_latency_s)
