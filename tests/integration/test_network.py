"""Real Mininet network on this machine (root): rates, in-place changes, transport delay, loss,
memory limits, the root-namespace guard route and crash-safe clean-up."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mnexec") is None or shutil.which("iperf3") is None,
                       reason="needs root, mnexec and iperf3"),
]

from testbed.emulation.cleanup import Manifest, cleanup_from_manifest, read_manifest  # noqa: E402
from testbed.spec.loader import load_topology  # noqa: E402
from testbed.emulation.netcheck import (RTT_TOL, RTT_TOL_ABS_MS, measure_loss, measure_memory, measure_rate_within,  # noqa: E402
                              expected_rtt_ms, measure_rtt, run_net_check)
from testbed.emulation.network import EmulatedNetwork, NetworkError  # noqa: E402
from testbed.spec.schema import TopologySpec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STAR = TopologySpec.model_validate({
    "name": "star-test", "hosts": [
        {"name": "h1", "mem_limit_mib": 256, "cpu_cores": 0.5, "source": True},
        {"name": "h2", "mem_limit_mib": 256, "cpu_cores": 0.5},
        {"name": "h3", "mem_limit_mib": 192, "cpu_cores": 0.25}],
    "switches": ["s1"],
    "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 50, "delay_ms": 2},
              {"a": "h2", "b": "s1", "bandwidth_mbps": 50, "delay_ms": 5},
              {"a": "h3", "b": "s1", "bandwidth_mbps": 10, "delay_ms": 5}]})


def _routes() -> str:
    return subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout


def _link_exists(dev: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", dev], capture_output=True).returncode == 0


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def _assert_nothing_left(entries: list[dict], tag: str | None = None) -> None:
    if tag:  # veth peers of host-side ends: gone with their namespaces (allow async netns teardown)
        for _ in range(50):
            if f"hr{tag}" not in _root_links():
                break
            time.sleep(0.1)
        assert f"hr{tag}" not in _root_links()
    for e in entries:
        if e["kind"] in ("host", "process"):
            assert not Path(f"/proc/{e['pid']}").exists() or \
                Path(f"/proc/{e['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", e
        elif e["kind"] == "bridge" or (e["kind"] == "veth" and e.get("netns_pid") is None):
            assert not _link_exists(e["dev"]), e
        elif e["kind"] == "cgroup":
            assert not Path(e["path"]).exists(), e
        elif e["kind"] == "route":
            assert " ".join(e["route"][:2]) + " metric " + e["route"][3] not in _routes(), e


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    manifest = Manifest(tmp_path_factory.mktemp("star") / "resources.jsonl")
    net = EmulatedNetwork(STAR, f"t{uuid.uuid4().hex[:6]}", manifest, delay_consumer="wire")
    net.start()
    try:
        yield net
    finally:
        net.stop()
        _assert_nothing_left(manifest.entries(), net.tag)


def test_guard_route_present_while_up(star):
    assert f"unreachable {STAR.subnet} metric {star.route_metric}" in _routes()
    # and the root namespace really cannot reach an emulated host
    res = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('%s', 9), 1)"
                          % star.host_ip("h2")], capture_output=True, text=True)
    assert res.returncode != 0 and ("unreachable" in res.stderr.lower() or "No route" in res.stderr)


@pytest.mark.parametrize("dst,rate", [("h2", 50), ("h3", 10)])
def test_rate_within_5pct(star, dst, rate):
    got = measure_rate_within(star, "h1", dst, rate, 0.05)  # a miss re-measured: see measure_rate_within
    assert abs(got["l2_mbps"] - rate) <= 0.05 * rate, got


def test_rate_change_in_place(star):
    before = measure_rate_within(star, "h1", "h2", 50, 0.05)
    qdiscs = subprocess.run(["nsenter", "-t", str(star.host_pid("h2")), "-n", "tc", "qdisc", "show", "dev", "h2-eth0"],
                            capture_output=True, text=True).stdout
    state = star.set_link("h2", "s1", bandwidth_mbps=20)
    try:
        assert state["h2->s1"]["bandwidth_mbps"] == 20 and state["s1->h2"]["bandwidth_mbps"] == 20
        after = measure_rate_within(star, "h1", "h2", 20, 0.05)
        assert abs(before["l2_mbps"] - 50) <= 2.5 and abs(after["l2_mbps"] - 20) <= 1.0, (before, after)
        again = subprocess.run(["nsenter", "-t", str(star.host_pid("h2")), "-n", "tc", "qdisc", "show", "dev", "h2-eth0"],
                               capture_output=True, text=True).stdout
        assert again.split("\n")[0] == qdiscs.split("\n")[0]  # same root qdisc: changed, not rebuilt
    finally:
        star.set_link("h2", "s1", bandwidth_mbps=50)


def _rtt_tolerance_ms(expected_ms: float) -> float:
    """The issue's RTT target, as `headroom net check` applies it: within 5 % or 0.3 ms."""
    return max(RTT_TOL * expected_ms, RTT_TOL_ABS_MS)


def test_transport_delay_measured_by_wire_probe(star):
    assert star.delay_mechanism == "transport"
    assert star.one_way_delay_s("h2", "h3") == pytest.approx(0.010)
    rtt = measure_rtt(star, "h2", "h3")["rtt_ms"]
    expected = expected_rtt_ms(star, "h2", "h3")
    assert 20.0 < expected < 20.3 and abs(rtt - expected) <= _rtt_tolerance_ms(expected), rtt
    star.set_link("h3", "s1", delay_ms=15)
    try:
        assert star.delays.get("h2", "h3") == pytest.approx(0.020)
        rtt = measure_rtt(star, "h2", "h3")["rtt_ms"]
        expected = expected_rtt_ms(star, "h2", "h3")
        assert 40.0 < expected < 40.3 and abs(rtt - expected) <= _rtt_tolerance_ms(expected), rtt
    finally:
        star.set_link("h3", "s1", delay_ms=5)


def test_one_direction_rate_and_delay(star):
    """Issue 16: h3 -> s1 alone drops to 5 Mbit/s and gains 10 ms; s1 -> h3 keeps 10 Mbit/s and 5 ms,
    measured both ways (iperf3 each way, the wire probe's round trip)."""
    back = star.set_link("h3", "s1", bandwidth_mbps=5, delay_ms=15, direction="h3")
    try:
        assert back["h3->s1"]["bandwidth_mbps"] == 5 and back["s1->h3"]["bandwidth_mbps"] == 10
        assert back["h3->s1"]["delay_ms"] == 15 and back["s1->h3"]["delay_ms"] == 5
        assert star.one_way_delay_s("h3", "h2") == pytest.approx(0.020)
        assert star.one_way_delay_s("h2", "h3") == pytest.approx(0.010)
        up, down = measure_rate_within(star, "h3", "h1", 5, 0.05), measure_rate_within(star, "h1", "h3", 10, 0.05)
        assert abs(up["l2_mbps"] - 5) <= 0.25 and abs(down["l2_mbps"] - 10) <= 0.5, (up, down)
        expected = expected_rtt_ms(star, "h2", "h3")
        assert 30.0 < expected < 30.5
        rtt = measure_rtt(star, "h2", "h3")["rtt_ms"]
        assert abs(rtt - expected) <= _rtt_tolerance_ms(expected), rtt
    finally:
        star.set_link("h3", "s1", bandwidth_mbps=10, delay_ms=5)


def test_jitter_spreads_round_trips_as_specified(tmp_path):
    """Issue 16 item 4: 2 ms of uniform jitter on each of the 4 hops of an h1 -> s1 -> h2 round trip
    gives a standard deviation of sqrt(4 x 2^2 / 3) = 2.31 ms around the 16 ms median, and net check
    reports it next to the spec."""
    topo = TopologySpec.model_validate({
        "name": "jit", "hosts": [{"name": "h1", "mem_limit_mib": 128, "cpu_cores": 0.5, "source": True},
                                 {"name": "h2", "mem_limit_mib": 128, "cpu_cores": 0.5}],
        "switches": ["s1"],
        "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 50, "delay_ms": 4, "jitter_ms": 2},
                  {"a": "h2", "b": "s1", "bandwidth_mbps": 50, "delay_ms": 4, "jitter_ms": 2}]})
    report = run_net_check(topo, json=True, rate_seconds=1, memory=False, manifest_path=str(tmp_path / "r.jsonl"))
    for row in report["links"]:
        assert row["expected_jitter_ms"] == pytest.approx(2.309, abs=1e-3), row
        assert row["jitter_ok"] and row["rtt_ok"], row
        assert row["mechanism"] == "transport"
    assert report["ok"]


def test_loss_via_iptables_statistic(star):
    star.set_link("h3", "s1", loss_pct=5)
    try:
        got = measure_loss(star, "h1", "h3", rate_mbps=5, seconds=2)
        # the rule's share within ±3.2 sigma of 5 % (1250 datagrams); queue-overflow drops of a
        # stalled sender's catch-up burst are counted on the path and reported apart
        assert got["packets"] > 1000 and 3.0 <= got["rule_loss_pct"] <= 7.0, got
        assert got["loss_pct"] >= got["rule_loss_pct"] - 1e-9, got
    finally:
        star.set_link("h3", "s1", loss_pct=0)
    assert not star._loss_rules


def test_link_down_and_up(star):
    assert star.set_link("h3", "s1", up=False)["up"] is False
    assert star.set_link("h3", "s1", up=True)["up"] is True


def test_memory_limit_kills_probe(star):
    got = measure_memory(star, "h3")
    assert got["killed"] and got["ok"], got
    assert [h for h, _ in star.poll_oom()] == ["h3"]
    assert star.cgroups["h3"].stats()["cpu_cores"] == 0.25


def test_delay_without_consumer_raises(tmp_path):
    net = EmulatedNetwork(STAR, "noconsumer", Manifest(tmp_path / "r.jsonl"), netem=False)
    with pytest.raises(NetworkError, match="no transport-delay consumer"):
        net.start()
    assert not any(e["kind"] != "meta" for e in read_manifest(tmp_path / "r.jsonl"))


def test_multi_hop_topologies_route_and_delay(tmp_path):
    for name, src, dst, hops in (("mesh4", "h1", "h4", 1), ("two_tier", "e1", "r1", 3), ("two_tier", "e2", "e4", 4)):
        topo = load_topology(REPO / "topologies" / f"{name}.yaml")
        m = Manifest(tmp_path / f"{name}.jsonl")
        net = EmulatedNetwork(topo, f"mh{uuid.uuid4().hex[:4]}", m, delay_consumer="wire", limits=False)
        with net:
            assert len(net.path(src, dst)) == hops, net.path(src, dst)
            expected = expected_rtt_ms(net, src, dst)
            rtt = measure_rtt(net, src, dst, count=20)["rtt_ms"]
            assert abs(rtt - expected) <= max(RTT_TOL_ABS_MS, RTT_TOL * expected), (name, rtt, expected)
        _assert_nothing_left(m.entries(), net.tag)


def test_link_down_up_restores_explicit_routes(tmp_path):
    """On a mesh, hosts route by explicit /32 routes; taking a link down drops those through it and
    bringing it up must put them back (and traffic must flow again)."""
    topo = load_topology(REPO / "topologies" / "mesh4.yaml")
    m = Manifest(tmp_path / "mesh.jsonl")
    with EmulatedNetwork(topo, f"ud{uuid.uuid4().hex[:4]}", m, delay_consumer="wire", limits=False) as net:
        link = topo.links[0]

        def table(host: str) -> list[str]:
            out = subprocess.run(["nsenter", "-t", str(net.host_pid(host)), "-n", "ip", "route"],
                                 capture_output=True, text=True, check=True).stdout
            return sorted(out.splitlines())

        before = {h: table(h) for h in (link.a, link.b)}
        net.set_link(link.a, link.b, up=False)
        assert any(table(h) != before[h] for h in before), "taking the link down should drop routes"
        net.set_link(link.a, link.b, up=True)
        assert {h: table(h) for h in before} == before
        assert measure_rtt(net, link.a, link.b, count=5)["rtt_ms"] > 0
    _assert_nothing_left(m.entries(), net.tag)


def test_cleanup_after_orchestrator_sigkill(tmp_path):
    manifest = tmp_path / "resources.jsonl"
    script = textwrap.dedent(f"""
        import time
        from testbed.emulation.cleanup import Manifest
        from testbed.spec.loader import load_topology
        from testbed.emulation.network import EmulatedNetwork
        net = EmulatedNetwork(load_topology("{REPO}/topologies/star3.yaml"), "killed-{uuid.uuid4().hex[:6]}",
                              Manifest("{manifest}"), delay_consumer="wire").start()
        net.popen_in_host("h2", ["sleep", "300"])
        print("up", flush=True)
        time.sleep(300)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "up"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    entries = list(read_manifest(manifest))
    kinds = {e["kind"] for e in entries}
    assert {"host", "bridge", "veth", "route", "cgroup", "process"} <= kinds
    removed = cleanup_from_manifest(manifest)
    assert not [r for r in removed if r.startswith("FAILED")], removed
    assert any("bridge" in r for r in removed) and any("route" in r for r in removed)
    time.sleep(0.2)
    _assert_nothing_left(entries)
    assert cleanup_from_manifest(manifest) == []  # idempotent


def test_net_check_report(tmp_path):
    topo = load_topology(REPO / "topologies" / "star3.yaml")
    from functools import partial

    from testbed.backends.emulated.computecheck import compute_fidelity

    report = run_net_check(topo, json=True, rate_seconds=1, links=[("h3", "s1")],
                           manifest_path=str(tmp_path / "resources.jsonl"), cpu_emulation="pace",
                           compute=partial(compute_fidelity, model="mini-gpt2"))
    assert report["ok"], _misses(report)
    # compute fidelity: paced agents (cgroups relaxed) step at their device's time, equal cores alike
    comp = report["compute"]
    assert comp["ok"] and [r["host"] for r in comp["hosts"]] == ["h1", "h2", "h3"], comp
    for r in comp["hosts"]:
        assert r["step_over_device"] == pytest.approx(1.0, abs=0.1) and r["step_p95_over_median"] <= 1.3
        assert r["same_cores_spread"] <= 0.1
    assert all(h["cpu_cores"] == h["cgroup_cpu_cores_expected"] >= 1 for h in report["hosts"])
    assert report["delay_mechanism"] == "transport" and len(report["hosts"]) == 3
    _assert_nothing_left(list(read_manifest(tmp_path / "resources.jsonl")))


def _missed(row: dict) -> str:
    """One failing net-check row, short enough to survive pytest's truncation: what missed, by how much."""
    what = [f"{row.get('link') or row.get('pair')}:"]
    if not row.get("rate_ok", True):
        what.append(f"rate {row['measured_mbps']} vs {row['expected_mbps']} Mbit/s in {row['rate_tries']} tries "
                    f"{row.get('rate_runs')}")
    if not row.get("rtt_ok", True):
        what.append(f"rtt added {row['added_rtt_ms']} vs {row['expected_rtt_ms']} ms (measured {row['measured_rtt_ms']}, "
                    f"probe {row.get('probe_rtt_ms')})")
    if not row.get("jitter_ok", True):
        what.append(f"jitter {row['measured_jitter_ms']} vs {row['expected_jitter_ms']} ms")
    if not (row.get("rtt_ok", True) and row.get("jitter_ok", True)):
        what.append(f"in {row.get('rtt_tries')} tries {row.get('rtt_runs')}")
    if not row.get("loss_ok", True):
        what.append(f"loss {row['measured_loss_pct']} vs {row['expected_loss_pct']} %")
    return " ".join(what)


def _misses(report: dict) -> list:
    """Everything a net-check report failed on, each short (``_missed``; hosts and compute as rows)."""
    rows = [r for r in report["links"] + report["paths"]
            if not (r.get("rate_ok", True) and r["rtt_ok"] and r.get("loss_ok", True) and r.get("jitter_ok", True))]
    return ([_missed(r) for r in rows] + [h for h in report["hosts"] if not h["ok"]]
            + ([report["compute"]] if not report.get("compute", {}).get("ok", True) else []))


SHIPPED = sorted(p.name for p in (REPO / "topologies").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_net_check_passes_on_every_shipped_topology(name, tmp_path):
    """Issue 16: every link direction's rate (1 s iperf3), RTT and jitter, and every host pair's round
    trip over its routed path (up to 4 hops through 3 switches on two_tier and chain3), within
    tolerance: rates ±5 %, RTTs ±5 % or 0.3 ms, jitter ±30 % or 0.2 ms. (The memory probe of each host
    is exercised by test_memory_limit_kills_probe and test_net_check_report.)"""
    topo = load_topology(REPO / "topologies" / name)
    report = run_net_check(topo, json=True, rate_seconds=1, memory=False, manifest_path=str(tmp_path / "r.jsonl"))
    bad = [r for r in report["links"] if not (r["rate_ok"] and r["rtt_ok"] and r.get("loss_ok", True)
                                              and r.get("jitter_ok", True))]
    bad += [r for r in report["paths"] if not (r["rtt_ok"] and r.get("jitter_ok", True))]
    assert report["ok"] and not bad, _misses(report)
    n = len(topo.hosts)
    assert len(report["paths"]) == n * (n - 1) // 2
    _assert_nothing_left(list(read_manifest(tmp_path / "r.jsonl")))
