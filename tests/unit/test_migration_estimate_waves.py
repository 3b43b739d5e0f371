"""Migration delay with memory-safe waves: a full host is evacuated before it is refilled (the
delays add up), two full hosts cannot swap (no order: inf, refused by the simulated backend)."""
import pytest

from testbed.core.errors import MigrationRefused
from testbed.partition.cost.latency import placement_memory
from testbed.partition.cost.migration import migration_estimate
from testbed.partition.synthetic import star_snapshot
from testbed.core.placement import Placement, uniform_layer
from testbed.backends.simulated.cluster import SimulatedCluster
from testbed.core.snapshot import ModelDims

DIMS = ModelDims("small", 2, 256, 4, 4, 64, 1024, 1000)
T = 32


def on(*devs):
    return Placement("d0", tuple(uniform_layer(d, DIMS.n_kv_heads, DIMS.ffn_dim) for d in devs))


def snap(room_layers):
    """d1..d3 each with room for ``room_layers[i]`` layers (plus 1 % slack)."""
    layer = placement_memory(on("d1", "d1"), star_snapshot([1e9] * 4, [2**30] * 4, [1e6] * 4, [1e-3] * 4),
                             DIMS, T)["d1"] // 2
    mems = [2**30] + [int(k * layer * 1.01) for k in room_layers]
    return star_snapshot([1e9] * 4, mems, [1e6] * 4, [1e-3] * 4, context_len=T)


def test_a_full_host_is_evacuated_before_it_is_refilled_and_the_waves_add_up():
    s = snap([2, 1, 2])
    old, new = on("d1", "d2"), on("d2", "d3")  # full d2 must send layer 1 to d3 before taking layer 0
    est = migration_estimate(old, new, s, DIMS)
    assert est.waves == 2 and est.blocked is None
    one = migration_estimate(on("d1", "d2"), on("d3", "d2"), s, DIMS).delay_s  # one layer d1 -> d3
    assert est.delay_s == pytest.approx(2 * one, rel=1e-9)  # not max(...) of parallel senders
    roomy = migration_estimate(old, new, snap([2, 2, 2]), DIMS)  # d2 has room for both: one wave
    assert roomy.waves == 1 and roomy.delay_s == pytest.approx(one, rel=1e-9)


def test_two_full_hosts_cannot_swap():
    s = snap([1, 1, 0])
    old, new = on("d1", "d2"), on("d2", "d1")
    est = migration_estimate(old, new, s, DIMS)
    assert est.delay_s == float("inf") and est.waves == 0 and "cannot receive" in est.blocked
    hosts = [("d0", 2**30, 1.0, True)] + [(d.name, d.mem_budget_bytes, 1.0, False) for d in s.devices[1:]]
    cluster = SimulatedCluster(hosts, [(h[0], "s1", 1e6, 1e-3) for h in hosts], DIMS, 1e9)
    cluster.load(old, list(range(T)))
    with pytest.raises(MigrationRefused, match="migration refused"):
        cluster.migrate(new)
    assert cluster.placement == old  # nothing moved
