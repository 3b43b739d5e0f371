"""The SSH backend's pure parts, without root or sshd: inventory validation (FILE:LINE errors, hosts
mapped to devices, caps overriding the topology's), the agent bundle (deterministic, node_agent's
import closure only), the shaping argv builders, the device checks' one-line messages, the
per-run token in the data plane's hello."""
from __future__ import annotations

import tarfile
import io
from types import SimpleNamespace

import pytest

from node_agent import protocol as P
from node_agent.wire import Frame
from testbed.backends.ssh import shaping
from testbed.backends.ssh.bundle import build_bundle
from testbed.backends.ssh.fleet import SshFleet
from testbed.core.errors import ConfigError, ProtocolError
from testbed.spec.inventory import InventorySpec, check_hosts_mapped, effective_topology, load_inventory
from testbed.spec.loader import load_any
from testbed.spec.schema import TopologySpec

TOPO = TopologySpec.model_validate({
    "name": "t", "switches": ["s1"],
    "hosts": [{"name": "h1", "mem_limit_mib": 512, "cpu_cores": 1, "source": True},
              {"name": "h2", "mem_limit_mib": 256, "cpu_cores": 0.5}],
    "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 50}, {"a": "h2", "b": "s1", "bandwidth_mbps": 10, "shape": True}]})


def inventory(**dev2) -> InventorySpec:
    return InventorySpec.model_validate({"devices": [
        {"name": "h1", "address": "192.0.2.1", "key_file": "/k", "interface": "eth0"},
        {"name": "h2", "address": "192.0.2.2", "agent": True, "interface": "eth1", **dev2}]})


def test_inventory_errors_have_file_and_line(tmp_path):
    f = tmp_path / "inv.yaml"
    f.write_text("name: x\ndevices:\n  - name: h1\n    address: a\n    interface: eth0\n"
                 "  - name: h2\n    address: b\n    interface: eth0\n    key_file: k\n    colour: red\n")
    with pytest.raises(ConfigError) as exc:
        load_inventory(f)
    text = str(exc.value)
    assert f"{f}:3:" in text and "key_file or agent" in text
    assert f"{f}:10:" in text and "colour" in text


def test_inventory_paths_resolved_and_load_any(tmp_path):
    f = tmp_path / "inv.yaml"
    f.write_text("devices:\n  - {name: h1, address: a, interface: eth0, key_file: keys/id}\nknown_hosts: kh\n")
    inv = load_any(f)
    assert isinstance(inv, InventorySpec)
    assert inv.devices[0].key_file == str(tmp_path / "keys/id") and inv.known_hosts == str(tmp_path / "kh")


def test_hosts_mapped_and_caps_override():
    assert check_hosts_mapped(TOPO, inventory()) == []
    one = InventorySpec.model_validate({"devices": [{"name": "h1", "address": "a", "agent": True, "interface": "e"}]})
    assert check_hosts_mapped(TOPO, one) == ["host 'h2' has no device in inventory 'fleet' (devices: ['h1'])"]
    eff = effective_topology(TOPO, inventory(mem_limit_mib=1024))
    assert eff.host("h2").mem_limit_mib == 1024 and eff.host("h2").cpu_cores == 0.5
    assert eff.host("h1").mem_limit_mib == 512


def test_bundle_is_deterministic_and_only_the_agent():
    a, b = build_bundle(), build_bundle()
    assert a.version == b.version and a.data == b.data
    names = tarfile.open(fileobj=io.BytesIO(a.data)).getnames()
    assert "node_agent/remote.py" in names and "testbed/backends/ssh/device.py" in names
    assert "testbed/core/placement.py" in names
    assert not [n for n in names if n.startswith(("testbed/run/", "testbed/emulation/network", "analysis/", "tests/"))]


def test_shaping_builders():
    assert shaping.class_command("eth0", 11, 5e6, change=True) == [
        "tc", "class", "change", "dev", "eth0", "parent", "1:", "classid", "1:11", "htb", "rate", "5000000bit",
        "ceil", "5000000bit", "quantum", str(shaping.htb_quantum(5e6))]
    assert shaping.leaf_command("eth0", 11, 5e6, None)[-3:-1] == ["bfifo", "limit"]
    assert shaping.leaf_command("eth0", 11, 5e6, (20.0, 1.0))[-7:] == ["netem", "delay", "20.0ms", "loss", "1.0%",
                                                                         "limit", "1000"]
    assert shaping.filter_command("eth0", 11, "10.0.0.3")[-3:] == ["10.0.0.3/32", "flowid", "1:11"]
    assert shaping.filter_command("hrifb1", 10, "10.0.0.3", field="src")[-5:-2] == ["ip", "src", "10.0.0.3/32"]
    assert shaping.redirect_command("eth0", "10.0.0.3", "hrifb1") == [
        "tc", "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
        "src", "10.0.0.3/32", "action", "mirred", "egress", "redirect", "dev", "hrifb1"]
    name = shaping.ifb_name("a-very-long-run-id-20261206", "h3")
    assert len(name) <= 15 and name.startswith("hrifb") and name != shaping.ifb_name("a-very-long-run-id-20261206", "h2")


def test_where_each_shaped_hop_is_enforced():
    """ifb: the hop into a device is shaped at its ingress, the rest at the sender's egress; senders:
    everything per path at the sender (the pure decision, then the fleet's use of it on TOPO)."""
    hops = [("h1", "s1"), ("s1", "s2"), ("s2", "h2")]
    assert shaping.split_hops(hops, "h2", ingress=True) == (hops[:2], ("s2", "h2"))
    assert shaping.split_hops(hops, "h2", ingress=False) == (hops, None)
    assert shaping.split_hops(hops[:2], "h2", ingress=True) == (hops[:2], None)  # last hop not shaped
    assert shaping.hop_figures([{"bandwidth_mbps": 10, "delay_ms": 2, "loss_pct": 10},
                                {"bandwidth_mbps": 4, "delay_ms": 3, "loss_pct": 10}]) == pytest.approx((4e6, 5, 19))
    ifb = SshFleet(TOPO, inventory(), "r", manifest=None, run_dir=".").shaper
    assert ifb.pairs() == [("h2", "h1")] and ifb.ingress_hops() == {("s1", "h2"): ["h1"]}
    assert ifb.wants_ifb("h2") and not ifb.wants("h1")
    senders = SshFleet(TOPO, InventorySpec.model_validate({**inventory().model_dump(), "ingress_shaping": "senders"}),
                       "r", manifest=None, run_dir=".").shaper
    assert senders.pairs() == [("h1", "h2"), ("h2", "h1")] and senders.ingress_hops() == {}
    assert senders.wants("h1") and not senders.wants_ifb("h2")


def test_device_helper_program_runs_without_the_project(tmp_path):
    """Piped to a bare interpreter (no testbed importable), the helper carries testbed.core.cgroupfs."""
    import subprocess
    import sys

    from testbed.backends.ssh.helper import helper_program

    group = tmp_path / "not-a-cgroup"
    r = subprocess.run([sys.executable, "-I", "-S", "-", "rmcg", str(group)], input=helper_program(),
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == '{"removed": []}', r.stderr


def _check(**over) -> dict:
    base = {"python": "3.11.2", "missing_modules": [], "tools": {"ip": "/sbin/ip", "tc": "/sbin/tc"},
            "cgroup": {"version": "v2", "roots": {"unified": "/sys/fs/cgroup"}, "writable": True},
            "interface_addr": "192.0.2.2", "mem_available_bytes": 8 << 30, "cpus": 4, "ifb": True,
            "ingress_qdisc": False, "gro": "on"}
    return {**base, **over}


@pytest.mark.parametrize("over, says", [
    ({"python": "3.8.10"}, "Python 3.8.10 is too old"),
    ({"tools": {"ip": "/sbin/ip", "tc": None}}, "iproute2 (ip, tc) is missing"),
    ({"cgroup": {"version": None, "roots": {}, "writable": False}}, "no cgroup memory+cpu controllers"),
    ({"cgroup": {"version": "v1", "roots": {"memory": "/m"}, "writable": False}}, "connect as root"),
    ({"interface_addr": None}, "interface 'eth1' has no IPv4 address"),
    ({"cgroup": {"version": "v2", "roots": {"unified": "/sys/fs/cgroup"}, "writable": True, "delegated": False}},
     "does not delegate memory and cpu"),
    ({"mem_available_bytes": 100 << 20}, "too small for its assignment: mem_limit_mib 256 but only 100 MiB"),
    ({"ifb": False}, "cannot redirect ingress to an IFB device (needs ifb, act_mirred, cls_u32)"),
    ({"ingress_qdisc": True}, "interface 'eth1' already has an ingress qdisc, which ingress shaping would replace"),
    ({"gro": None}, "ethtool is missing or cannot read the offloads of 'eth1': install ethtool"),
])
def test_device_problems_say_what_to_do(over, says):
    fleet = SshFleet(TOPO, inventory(), "r", manifest=None, run_dir=".")
    msg = fleet._device_problem("h2", _check(**over))
    assert says in msg and ":" in msg and "\n" not in msg
    assert fleet._device_problem("h2", _check()) is None


def test_device_must_hold_an_agent_and_the_whole_model():
    from node_agent.model import load_model
    from testbed.backends.ssh.cluster import AGENT_RUNTIME_BYTES, model_weight_bytes

    cfg = load_model("mini-gpt2").config
    floor = AGENT_RUNTIME_BYTES + model_weight_bytes(cfg)
    assert 160 << 20 < floor < 256 << 20
    fleet = SshFleet(TOPO, inventory(), "r", manifest=None, run_dir=".", agent_floor_bytes=floor)
    msg = fleet._device_problem("h2", _check())  # h2: 256 MiB
    assert msg is None or "cannot hold an agent" in msg
    small = TOPO.model_copy(update={"hosts": (TOPO.hosts[0], TOPO.hosts[1].model_copy(update={"mem_limit_mib": 100}))})
    msg = SshFleet(small, inventory(), "r", None, ".", agent_floor_bytes=floor)._device_problem("h2", _check())
    assert msg.startswith("too small for its assignment: mem_limit_mib 100 cannot hold an agent") and "raise" in msg


def test_hello_token():
    def frame(h):
        return Frame(h, b"", 0.0, 0.0, 0.0)
    assert P.check_hello(frame(P.hello_frame("h2", "s3cret")), "s3cret") == "h2"
    assert P.check_hello(frame(P.hello_frame("h2")), None) == "h2"
    for bad in (P.hello_frame("h2"), P.hello_frame("h2", "other")):
        with pytest.raises(ProtocolError, match="not of this run") as exc:
            P.check_hello(frame(bad), "s3cret")
        assert "s3cret" not in str(exc.value)
