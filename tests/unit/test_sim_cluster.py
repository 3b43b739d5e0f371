"""SimulatedCluster: paths, step/migrate records from the cost model, limits, OOM, determinism."""
import pytest

from testbed.core.errors import AlgorithmFailure
from testbed.partition import plan
from testbed.partition.cost.latency import decode_cost
from testbed.core.placement import Placement, uniform_layer
from testbed.backends.simulated.cluster import SimulatedCluster
from testbed.core.snapshot import ModelDims

DIMS = ModelDims("tiny", 2, 64, 4, 2, 16, 128, 100, gated_ffn=True)
MB = 2**20


def make(mem=64 * MB, bw=1e6):
    hosts = [("h1", 512 * MB, 1.0, True), ("h2", mem, 0.5, False), ("h3", mem, 0.5, False)]
    links = [("h1", "s1", bw, 0.001), ("h2", "s1", bw, 0.002), ("h3", "s2", bw / 2, 0.003), ("s1", "s2", bw, 0.001)]
    return SimulatedCluster(hosts, links, DIMS, per_core_flops=1e8)


def whole(dev):
    return Placement("h1", (uniform_layer(dev, 2, 128),) * 2)


def test_paths_bottleneck_and_latency():
    snap = make().snapshot(4, 8)
    p = snap.path("h1", "h3")
    assert p.bandwidth_bytes_per_s == 5e5 and p.latency_s == pytest.approx(0.005)
    assert snap.device("h2").flops_per_s == 5e7 and snap.source == "h1"


def test_step_matches_cost_model_and_is_deterministic():
    c = make()
    c.load(whole("h2"), [1, 2, 3])
    rec = c.step(5)
    expect = decode_cost(whole("h2"), c.snapshot(4, 1), DIMS, context_len=4)
    assert rec.latency_s == pytest.approx(expect.token_latency_s)
    assert rec.compute_s + rec.transfer_s == pytest.approx(rec.latency_s)
    c2 = make()
    c2.load(whole("h2"), [1, 2, 3])
    assert c2.step(5).token_id == rec.token_id and 0 <= rec.token_id < DIMS.vocab_size


def test_link_change_slows_tokens():
    c = make()
    c.load(whole("h2"), [1, 2, 3])
    fast = c.step(1).latency_s
    rb = c.apply_link("h2", "s1", bandwidth_mbps=0.01)
    assert rb["before"]["bandwidth_mbps"] == pytest.approx(8.0)
    assert c.step(1).latency_s > fast


def test_migrate_record():
    c = make()
    c.load(whole("h2"), [1, 2, 3])
    rec = c.migrate(whole("h3"))
    assert rec.bytes_moved > 0 and rec.duration_s > 0 and len(rec.moves) == 2 * (2 + 1 + 1)
    assert c.snapshot(3, 1).current == whole("h3")


def test_oom_on_load_and_on_kv_growth():
    c = make(mem=200 * 1024)
    with pytest.raises(AlgorithmFailure, match=r"OOM on h2: needs \d+ bytes, limit 204800"):
        c.load(whole("h2"), [1, 2, 3])
    c = make()
    c.load(whole("h2"), [1])
    used = c.peak_mem_bytes()["h2"]
    c.set_host_limits("h2", mem_limit_mib=(used + 2 * 16 * 4 * 4 * 3) / MB)  # room for 3 more tokens
    for _ in range(3):
        c.step(0)
    with pytest.raises(AlgorithmFailure, match="OOM on h2"):
        c.step(0)


def test_current_memory_follows_migrations_while_the_peak_stays():
    c = make()
    c.load(whole("h2"), [1, 2, 3])
    on_h2 = c.mem_bytes()["h2"]
    assert on_h2 == c.peak_mem_bytes()["h2"] > c.mem_bytes()["h3"]
    c.migrate(whole("h3"))
    c.step(0)
    assert c.mem_bytes()["h2"] < on_h2 // 4 and c.peak_mem_bytes()["h2"] == on_h2
    assert c.mem_bytes()["h3"] >= on_h2


def test_planner_on_sim_snapshot_and_reset():
    c = make()
    r = plan("resource_aware", c.snapshot(3, 8), DIMS)
    c.load(r.placement, [1, 2, 3])
    assert max(c.peak_mem_bytes().values()) > 0
    c.reset()
    assert c.peak_mem_bytes() == {"h1": 0, "h2": 0, "h3": 0} and c.snapshot(0, 1).current is None


def test_simulated_host_overhead_from_the_experiment_is_charged():
    from pathlib import Path

    from testbed.spec.loader import load_experiment
    from testbed.spec.modelref import resolve_model
    from testbed.backends.simulated.build import build_simulated_cluster

    spec = load_experiment(Path(__file__).resolve().parents[2] / "experiments/paper/bandwidth_drop.yaml")
    assert spec.simulation.host_overhead_mib == 6
    c = build_simulated_cluster(spec.topology, resolve_model(spec.model),
                                host_overhead_mib=spec.simulation.host_overhead_mib)
    snap = c.snapshot(32, 8)
    assert all(d.mem_overhead_bytes == 6 * 2**20 for d in snap.devices)
    assert all(d.mem_budget_bytes == d.mem_limit_bytes - 6 * 2**20 for d in snap.devices)


def test_paths_through_a_single_link_equal_a_dijkstra_from_every_host():
    """``shortest_paths`` derives the paths of hosts with one link from their switch's; a
    Dijkstra from every host (``_tree``) must give the same latency, bandwidth and reachability,
    on stars, two tiers and meshes with host-to-host links and links down."""
    import random

    from testbed.backends.simulated.cluster import _tree, shortest_paths

    rng = random.Random(0)
    for trial in range(60):
        n = rng.randint(2, 10)
        hosts = [f"h{i}" for i in range(n)]
        one = lambda: {"bandwidth": rng.choice([1e6, 2e6, 5e6]), "latency_s": rng.choice([1e-3, 2e-3])}  # noqa: E731
        link = lambda a, b: {"up": rng.random() > 0.1, "dir": {a: one(), b: one()}}  # noqa: E731  directions differ
        links = {(h, f"s{i % 3}"): link(h, f"s{i % 3}") for i, h in enumerate(hosts)}
        links.update({(f"s{k}", f"s{(k + 1) % 3}"): link(f"s{k}", f"s{(k + 1) % 3}") for k in range(3)})
        if trial % 2:
            links.update({(a, b): link(a, b) for a, b in (rng.sample(hosts, 2) for _ in range(n // 2))})
        nodes = list(dict.fromkeys(hosts + [x for k in links for x in k]))
        got = shortest_paths(nodes, links, hosts)
        adj = {v: [] for v in nodes}
        for (a, b), st in links.items():
            if st["up"]:
                adj[a].append((b, st["dir"][a]))
                adj[b].append((a, st["dir"][b]))
        for s in hosts:
            ref = _tree(adj, s)
            for t in hosts:
                if t != s:
                    p = got[(s, t)]
                    assert p.up == (t in ref)
                    if p.up:
                        assert p.latency_s == pytest.approx(ref[t][0], abs=1e-12)
                        assert p.bandwidth_bytes_per_s == ref[t][2]


def test_a_one_direction_change_changes_only_that_direction():
    """Issue 16: link h3-s2's b_to_a direction (s2 -> h3) slows and gains delay; h1 -> h3 pays it,
    h3 -> h1 does not; the read-back reports both directions and the state before."""
    c = make()
    back = c.apply_link("h3", "s2", bandwidth_mbps=0.8, delay_ms=10, direction="s2")
    assert back["before"]["delay_ms"] == pytest.approx(3.0)
    assert back["s2->h3"]["delay_ms"] == 10 and back["h3->s2"]["delay_ms"] == pytest.approx(3.0)
    snap = c.snapshot(4, 8)
    there, home = snap.path("h1", "h3"), snap.path("h3", "h1")
    assert there.latency_s == pytest.approx(0.012) and there.bandwidth_bytes_per_s == pytest.approx(1e5)
    assert home.latency_s == pytest.approx(0.005) and home.bandwidth_bytes_per_s == 5e5
    c.apply_link("h3", "s2", delay_ms=1)  # both directions again
    snap = c.snapshot(4, 8)
    assert snap.path("h1", "h3").latency_s == snap.path("h3", "h1").latency_s == pytest.approx(0.003)
    with pytest.raises(Exception, match="direction must leave h3 or s2"):
        c.apply_link("h3", "s2", delay_ms=1, direction="h1")


def test_per_direction_topology_overrides_are_kept():
    from testbed.backends.simulated.build import topology_as_plain
    from testbed.spec.schema import TopologySpec

    topo = TopologySpec.model_validate({
        "name": "t", "hosts": [{"name": "h1", "mem_limit_mib": 64, "cpu_cores": 1, "source": True},
                               {"name": "h2", "mem_limit_mib": 64, "cpu_cores": 1}],
        "links": [{"a": "h1", "b": "h2", "bandwidth_mbps": 8, "delay_ms": 2, "b_to_a": {"bandwidth_mbps": 2, "delay_ms": 7}}]})
    hosts, links = topology_as_plain(topo)
    c = SimulatedCluster([h[:4] for h in hosts], links, DIMS, per_core_flops=1e8)
    snap = c.snapshot(4, 8)
    assert snap.path("h1", "h2").bandwidth_bytes_per_s == 1e6 and snap.path("h1", "h2").latency_s == pytest.approx(0.002)
    assert snap.path("h2", "h1").bandwidth_bytes_per_s == 2.5e5 and snap.path("h2", "h1").latency_s == pytest.approx(0.007)
