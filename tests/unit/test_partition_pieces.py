"""The planners' migration estimate counts exactly what the runtime ships (``migration_items``):
KV groups, projections and FFN column pieces, bytes per (sender, receiver) pair."""
import numpy as np
import pytest

from testbed.core.moves import item_bytes, migration_items
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import paper_constants
from testbed.partition.cost.migration import migration_estimate
from testbed.partition.synthetic import star_snapshot
from testbed.core.placement import FfnShard, LayerPlacement, Placement
from testbed.core.moves import item_block_id, moved_blocks
from testbed.backends.simulated.cluster import SimulatedCluster
from testbed.core.snapshot import ModelDims

G1 = ModelDims("gpt2-1", 1, 768, 12, 12, 64, 3072, 50257)
COL = B.ffn_bytes(G1, 1)  # bytes per FFN column
SNAP = star_snapshot([1e9] * 4, [2**30] * 4, [1e6, 2e6, 4e6, 8e6], [1e-3, 2e-3, 3e-3, 4e-3], context_len=40)


def layer(*shards, heads=("d1",) * 12, proj="d1"):
    return Placement("d0", (LayerPlacement(tuple(heads), proj, tuple(FfnShard(*s) for s in shards)),))


def test_a_shard_growing_on_its_first_columns_device_brings_the_columns_it_gains():
    old = layer(("d3", 0, 1536), ("d2", 1536, 3072))
    new = layer(("d3", 0, 2304), ("d2", 2304, 3072))
    est = migration_estimate(old, new, SNAP, G1)
    assert est.pair_bytes == {("d2", "d3"): 768 * COL}
    assert est.moves == [("L0.ffn1536-2304", "d2", "d3")] == moved_blocks(old, new)
    path = SNAP.path("d2", "d3")
    assert est.delay_s == pytest.approx(path.latency_s + 768 * COL / path.bandwidth_bytes_per_s)


def test_a_split_change_moves_only_the_columns_that_change_device():
    old = layer(("d3", 0, 1536), ("d2", 1536, 3072))
    new = layer(("d3", 0, 1024), ("d2", 1024, 3072))  # d2's new shard is mostly its old one
    est = migration_estimate(old, new, SNAP, G1)
    assert est.pair_bytes == {("d3", "d2"): 512 * COL}
    # a new three-way split: d1 takes [1024, 2048) from both old holders
    new = layer(("d3", 0, 1024), ("d1", 1024, 2048), ("d2", 2048, 3072))
    est = migration_estimate(old, new, SNAP, G1)
    assert est.pair_bytes == {("d3", "d1"): 512 * COL, ("d2", "d1"): 512 * COL}
    # the same columns on the same devices in another shard order (a new aggregator): nothing moves
    assert migration_estimate(old, layer(("d2", 1536, 3072), ("d3", 0, 1536)), SNAP, G1).pair_bytes == {}


def random_layer(rng, dims, devs):
    heads = tuple(rng.choice(devs) for _ in range(dims.n_kv_heads))
    k = int(rng.integers(1, 5))
    cuts = sorted(set(rng.integers(1, dims.ffn_dim, size=k - 1).tolist()))
    bounds = list(zip([0] + cuts, cuts + [dims.ffn_dim]))
    shards = [FfnShard(str(rng.choice(devs)), a, b) for a, b in bounds]
    rng.shuffle(shards)  # any shard may be the aggregator
    return LayerPlacement(heads, str(rng.choice(devs)), tuple(shards))


def sender_sizes(pl: Placement, dims: ModelDims, T: int, cost_model: str) -> dict[str, dict[str, int]]:
    """Per-device block sizes of ``pl`` as an agent reports them (what ``item_bytes`` reads)."""
    k = paper_constants(dims, T) if cost_model == "paper" else None
    out: dict[str, dict[str, int]] = {}
    for block_id, dev in pl.blocks():
        _, kind, cols = B.block_kind_of(block_id)
        if k is not None:
            n = k[f"{kind}_bytes"] * (cols or dims.ffn_dim) // dims.ffn_dim if kind == "ffn" else k[f"{kind}_bytes"]
        else:
            n = B.block_memory_bytes(dims, kind, T, cols)
        out.setdefault(dev, {})[block_id] = n
    return out


@pytest.mark.parametrize("cost_model", ["decode", "paper"])
def test_estimate_equals_migration_items_on_random_placements(cost_model):
    dims = ModelDims("r", 3, 128, 8, 4, 16, 960, 100, gated_ffn=True)
    devs = ["d1", "d2", "d3", "d4"]
    snap = star_snapshot([1e9] * 5, [2**30] * 5, [1e6, 2e6, 3e6, 5e6, 8e6], [1e-3] * 5, context_len=57)
    rng = np.random.default_rng(7)
    for _ in range(200):
        old = Placement("d0", tuple(random_layer(rng, dims, devs) for _ in range(dims.n_layers)))
        new = Placement("d0", tuple(random_layer(rng, dims, devs) for _ in range(dims.n_layers)))
        items = migration_items(old, new)
        sizes = sender_sizes(old, dims, 57, cost_model)
        expect = {pair: sum(item_bytes(it, sizes[pair[0]]) for it in its) for pair, its in items.items()}
        est = migration_estimate(old, new, snap, dims, cost_model=cost_model)
        assert est.pair_bytes == expect
        listed = sorted((item_block_id(it), a, b) for (a, b), its in items.items() for it in its)
        assert sorted(est.moves) == listed == sorted(moved_blocks(old, new))
        # the pieces of each layer's FFN tile exactly the columns that change device
        for l, (a, b) in enumerate(zip(old.layers, new.layers)):
            changed = sum(1 for c in range(dims.ffn_dim)
                          if next(s.device for s in a.ffn if s.col_start <= c < s.col_end)
                          != next(s.device for s in b.ffn if s.col_start <= c < s.col_end))
            pieces = [it for its in items.values() for it in its if it["kind"] == "ffn" and it["layer"] == l]
            assert sum(it["c1"] - it["c0"] for it in pieces) == changed


def test_simulated_migration_charges_the_pieces():
    hosts = [("d0", 2**32, 1.0, True)] + [(f"d{i}", 2**31, 1.0, False) for i in (1, 2, 3)]
    links = [(f"d{i}", "s1", 1e6 * (i + 1), 1e-3) for i in range(4)]
    c = SimulatedCluster(hosts, links, G1, per_core_flops=1e9)
    old = layer(("d3", 0, 1536), ("d2", 1536, 3072))
    new = layer(("d3", 0, 2304), ("d2", 2304, 3072))
    c.load(old, list(range(40)))
    rec = c.migrate(new)
    assert rec.bytes_moved == 768 * COL and rec.moves == [("L0.ffn1536-2304", "d2", "d3")]
    path = c.snapshot(40, 8).path("d2", "d3")
    assert rec.duration_s == pytest.approx(path.latency_s + 768 * COL / path.bandwidth_bytes_per_s)


def test_with_weights_from_the_destination_only_kv_caches_are_charged():
    from dataclasses import replace

    from testbed.partition import plan

    old = layer(("d3", 0, 1536), ("d2", 1536, 3072), heads=("d1",) * 6 + ("d2",) * 6)
    new = layer(("d3", 0, 3072), heads=("d1",) * 3 + ("d3",) * 9, proj="d2")
    kv_only = replace(SNAP, weights_shipped=False)
    full, kv = migration_estimate(old, new, SNAP, G1), migration_estimate(old, new, kv_only, G1)
    assert kv.moves == full.moves  # the same items move ...
    # ... but a head ships only its cache (3 from d1, 6 from d2 to d3), the FFN piece and proj nothing
    assert kv.pair_bytes == {("d1", "d3"): 3 * B.head_kv_bytes(G1, 40), ("d2", "d3"): 6 * B.head_kv_bytes(G1, 40),
                             ("d1", "d2"): 0}
    assert kv.delay_s < full.delay_s / 10
    # the planner's view: leaving the current plan is cheap now, so RA takes a faster plan that
    # does not pay for itself when the weights have to travel
    ra_kv = plan("resource_aware", replace(kv_only, current=old, tokens_until_next_decision=8), G1)
    ra_full = plan("resource_aware", replace(SNAP, current=old, tokens_until_next_decision=8), G1)
    assert ra_full.placement == old and ra_kv.placement != old
    assert ra_kv.predicted_token_latency_s < ra_full.predicted_token_latency_s
    assert ra_kv.migration_delay_s < migration_estimate(old, ra_kv.placement, SNAP, G1).delay_s / 10


def _items_by_definition(old: Placement, new: Placement) -> dict:
    """``migration_items`` spelled out as its docstring defines it (the order included)."""
    out: dict = {}
    for l, (a, b) in enumerate(zip(old.layers, new.layers)):
        for g, (da, db) in enumerate(zip(a.heads, b.heads)):
            if da != db:
                out.setdefault((da, db), []).append({"kind": "head", "layer": l, "group": g})
        if a.proj != b.proj:
            out.setdefault((a.proj, b.proj), []).append({"kind": "proj", "layer": l})
        for s in b.ffn:
            if s in a.ffn:
                continue
            for o in a.ffn:
                lo, hi = max(o.col_start, s.col_start), min(o.col_end, s.col_end)
                if lo < hi and o.device != s.device:
                    out.setdefault((o.device, s.device), []).append({"kind": "ffn", "layer": l, "c0": lo, "c1": hi})
    return out


def test_migration_items_are_their_definition_in_order():
    """Random layers with 1-4 shards, and tensor-parallel ones (FFN over up to 40 devices, what a
    Galaxy candidate of a 128-device plan looks like), against each other and themselves."""
    dims = ModelDims("r", 4, 128, 8, 4, 16, 960, 100, gated_ffn=True)
    devs = [f"d{i}" for i in range(1, 41)]
    rng = np.random.default_rng(11)

    def wide_layer():
        n = int(rng.integers(5, 41))
        cuts = sorted(rng.choice(np.arange(1, dims.ffn_dim), size=n - 1, replace=False).tolist())
        bounds = list(zip([0] + cuts, cuts + [dims.ffn_dim]))
        shards = tuple(FfnShard(d, a, b) for d, (a, b) in zip(rng.permutation(devs)[:n].tolist(), bounds))
        return LayerPlacement(tuple(rng.choice(devs[:6]) for _ in range(dims.n_kv_heads)), devs[0], shards)

    for i in range(150):
        make = [lambda: random_layer(rng, dims, devs[:6]), wide_layer]
        old = Placement("d0", tuple(make[int(rng.integers(2))]() for _ in range(dims.n_layers)))
        new = Placement("d0", tuple(make[int(rng.integers(2))]() for _ in range(dims.n_layers)))
        assert migration_items(old, new) == _items_by_definition(old, new)
        assert list(migration_items(old, new)) == list(_items_by_definition(old, new))  # pair order
        assert migration_items(new, new) == {}
