"""Agents on a real emulated network (root): forked into the host's network namespace, placed in
the host's cgroup by the controller, a small idle memory charge, control only over Unix sockets,
transport delay updates reaching the receivers, and exit statuses reported by the fork server."""
from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mnexec") is None, reason="needs root and mnexec"),
]

from testbed.backends.emulated.agents import AgentPool  # noqa: E402
from testbed.emulation.cleanup import Manifest  # noqa: E402
from testbed.emulation.network import EmulatedNetwork  # noqa: E402
from testbed.core.placement import Placement, uniform_layer  # noqa: E402
from testbed.spec.schema import TopologySpec  # noqa: E402

TOPO = TopologySpec.model_validate({
    "name": "ag-star", "hosts": [
        {"name": "h1", "mem_limit_mib": 256, "cpu_cores": 1.0, "source": True},
        {"name": "h2", "mem_limit_mib": 128, "cpu_cores": 0.5},
        {"name": "h3", "mem_limit_mib": 128, "cpu_cores": 0.5}],
    "switches": ["s1"],
    "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 50, "delay_ms": 1},
              {"a": "h2", "b": "s1", "bandwidth_mbps": 20, "delay_ms": 1},
              {"a": "h3", "b": "s1", "bandwidth_mbps": 20, "delay_ms": 1}]})


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    run = tmp_path_factory.mktemp("agents")
    manifest = Manifest(run / "resources.jsonl")
    net = EmulatedNetwork(TOPO, f"a{uuid.uuid4().hex[:5]}", manifest, delay_consumer="wire")
    net.start()
    p = None
    try:
        p = AgentPool(net, manifest, run, {"arg": "tiny-gpt2", "seed": 0})
        p.start()
        yield p
    finally:
        if p is not None:
            p.close()
        net.stop()


def test_agent_lives_in_host_netns_and_cgroup(pool):
    for host, a in pool.agents.items():
        ns = os.readlink(f"/proc/{a.pid}/ns/net")
        assert ns == os.readlink(f"/proc/{pool.net.host_pid(host)}/ns/net")
        assert ns != os.readlink("/proc/self/ns/net")
        assert a.pid in pool.net.cgroups[host].pids()
        assert a.control_path.startswith(pool.sock_dir)  # the controller reaches it by Unix socket only
        assert not pool.net.cgroups[host].pids() == []


def test_idle_agent_charge_is_small(pool):
    for host in pool.agents:
        usage = pool.net.cgroups[host].usage_bytes()
        st = pool.call(host, "stats", 10.0)
        assert usage <= 30 * 2**20, (host, usage)
        assert st["cgroup_usage_bytes"] == pytest.approx(usage, abs=2 * 2**20)
        assert st["rss_bytes"] > usage  # most of the RSS is shared with the fork server


def test_delay_change_reaches_receivers(pool):
    pl = Placement("h1", tuple(uniform_layer("h2", 4, 256) for _ in range(4)))
    pool.each(lambda h: pool.call(h, "load", 30.0, placement=pl.to_json(), pv=1))
    r0 = pool.call("h1", "forward", 30.0, ids=[1, 2], start_pos=0, seq=1)
    pool.net.set_link("h2", "s1", delay_ms=20)
    pool.push_delays()
    r1 = pool.call("h1", "forward", 30.0, ids=[3], start_pos=2, seq=2)
    assert r1["transfer_s"] - r0["transfer_s"] > 2 * 0.019 - 0.003  # h1 -> h2 and back, +19 ms each way
    assert r1["transfer_s"] < r0["transfer_s"] + 2 * 0.019 + 0.03
    pool.net.set_link("h2", "s1", delay_ms=1)
    pool.push_delays()


def test_killed_agent_status_and_respawn(pool):
    a = pool.agents["h3"]
    pool.kill(a)
    for _ in range(50):
        if pool.dead():
            break
        time.sleep(0.02)
    assert pool.dead() == {"h3": -9}
    pool.respawn("h3")
    pool.configure_all()
    assert pool.dead() == {}
    assert pool.call("h3", "ping", 5.0)["pid"] == pool.agents["h3"].pid
