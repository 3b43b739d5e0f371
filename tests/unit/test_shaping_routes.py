"""Routing and path computation of testbed.emulation.network on specs alone (no root, nothing started)."""
from pathlib import Path

import pytest

from testbed.emulation.cleanup import Manifest
from testbed.spec.loader import load_topology
from testbed.emulation.network import EmulatedNetwork, NetworkError
from testbed.spec.schema import TopologySpec

TOPO = Path(__file__).resolve().parents[2] / "topologies"


def _net(topo, tmp_path):
    return EmulatedNetwork(topo, "unit", Manifest(tmp_path / "r.jsonl"))


def test_star_paths_cross_the_switch(tmp_path):
    net = _net(load_topology(TOPO / "star4.yaml"), tmp_path)
    assert net.path("h1", "h4") == [("h1", "s1"), ("s1", "h4")]
    assert net.host_ip("h1") == "10.0.0.1" and net.host_ip("h4") == "10.0.0.4"


def test_two_tier_path_goes_through_regional(tmp_path):
    net = _net(load_topology(TOPO / "two_tier.yaml"), tmp_path)
    assert net.path("e1", "e4") == [("e1", "edge1"), ("edge1", "regional"), ("regional", "edge2"), ("edge2", "e4")]
    assert net.path("e1", "e2") == [("e1", "edge1"), ("edge1", "e2")]


def test_mesh_uses_direct_links(tmp_path):
    net = _net(load_topology(TOPO / "mesh4.yaml"), tmp_path)
    for a in "1234":
        for b in "1234":
            if a != b:
                assert net.path(f"h{a}", f"h{b}") == [(f"h{a}", f"h{b}")]


def test_line_of_hosts_routes_through_a_forwarding_host(tmp_path):
    topo = TopologySpec.model_validate({
        "name": "line", "hosts": [{"name": n, "mem_limit_mib": 64, "cpu_cores": 0.1, "source": n == "a"} for n in "abc"],
        "links": [{"a": "a", "b": "b", "bandwidth_mbps": 10}, {"a": "b", "b": "c", "bandwidth_mbps": 10}]})
    net = _net(topo, tmp_path)
    assert net.path("a", "c") == [("a", "b"), ("b", "c")]
    assert net._routes["a"]["c"][1] == "b"  # next hop is host b


def test_switch_loop_is_rejected(tmp_path):
    topo = TopologySpec.model_validate({
        "name": "loop", "hosts": [{"name": "h1", "mem_limit_mib": 64, "cpu_cores": 0.1, "source": True}],
        "switches": ["s1", "s2", "s3"],
        "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 10}, {"a": "s1", "b": "s2", "bandwidth_mbps": 10},
                  {"a": "s2", "b": "s3", "bandwidth_mbps": 10}, {"a": "s3", "b": "s1", "bandwidth_mbps": 10}]})
    with pytest.raises(NetworkError, match="loop"):
        _net(topo, tmp_path)
