"""Argv builders and parsers of testbed.emulation.shaping (no root, nothing executed)."""
import pytest

from testbed.emulation import shaping as sh


def test_in_netns_wraps_with_nsenter_and_root_is_plain():
    assert sh.in_netns(None, ["tc", "qdisc"]) == ["tc", "qdisc"]
    assert sh.in_netns(42, ["tc", "qdisc"]) == ["nsenter", "-t", "42", "-n", "--", "tc", "qdisc"]


def test_veth_add_places_peer_in_namespace():
    assert sh.veth_add("a", "b") == ["ip", "link", "add", "name", "a", "type", "veth", "peer", "name", "b"]
    assert sh.veth_add("a", "b", peer_netns_pid=7)[-2:] == ["netns", "7"]


def test_htb_class_add_and_in_place_change():
    add = sh.htb_class("d0", 10e6)
    assert add[:3] == ["tc", "class", "add"] and "10000000bit" in add
    change = sh.htb_class("d0", 2.5e6, change=True)
    assert change[:3] == ["tc", "class", "change"]
    assert change[change.index("rate") + 1] == change[change.index("ceil") + 1] == "2500000bit"
    assert "classid" in change and change[change.index("classid") + 1] == "1:1"


def test_queue_limit_is_a_few_ms_but_at_least_a_few_frames():
    assert sh.queue_limit_bytes(100e6) == int(100e6 / 8 * sh.QUEUE_TARGET_S)
    assert sh.queue_limit_bytes(1e6) == sh.MIN_QUEUE_PACKETS * sh.MTU_FRAME_BYTES
    leaf = sh.leaf_queue("d0", 50e6)
    assert leaf[leaf.index("bfifo") + 2] == str(sh.queue_limit_bytes(50e6))


def test_shape_commands_limit_gso_before_the_qdisc():
    cmds = sh.shape_commands("d0", 20e6)
    assert cmds[0] == ["ip", "link", "set", "dev", "d0", "gso_max_segs", "1"]
    assert [c[1] for c in cmds[1:]] == ["qdisc", "class", "qdisc"]


def test_quantum_bounded():
    assert sh.htb_quantum(1e5) == sh.MTU_FRAME_BYTES
    assert sh.htb_quantum(1e6) == 12500
    assert sh.htb_quantum(10e9) == 60000


def test_unreachable_route_add_and_delete_share_metric():
    add = sh.unreachable_route("10.0.0.0/8", 4242)
    dele = sh.unreachable_route("10.0.0.0/8", 4242, delete=True)
    assert add == ["ip", "route", "add", "unreachable", "10.0.0.0/8", "metric", "4242"]
    assert dele[2] == "del" and add[3:] == dele[3:]


def test_route_batch_direct_and_via_gateway():
    text = sh.route_batch([("10.0.0.2/32", "h1-eth0", None), ("10.0.0.3/32", "h1-eth1", "10.0.0.4")])
    assert text.splitlines() == ["route add 10.0.0.2/32 dev h1-eth0",
                                 "route add 10.0.0.3/32 dev h1-eth1 via 10.0.0.4 onlink"]


def test_loss_rules_restore_and_delete_round_trip():
    rule = sh.iptables_loss_rule("10.0.0.1", 0.01)
    assert rule.startswith("-A INPUT -s 10.0.0.1/32 -m statistic --mode random --probability 0.010000")
    text = sh.iptables_loss_restore([("10.0.0.1", 0.01)])
    assert text.splitlines() == ["*filter", rule, "COMMIT"]
    dele = sh.iptables_delete(rule)
    assert dele[:3] == ["iptables", "-D", "INPUT"] and dele[-2:] == ["-j", "DROP"]
    with pytest.raises(ValueError):
        sh.iptables_loss_rule("10.0.0.1", 0)
    with pytest.raises(ValueError):
        sh.iptables_delete("-I INPUT -j DROP")


def test_netem_leaf_only_lists_loss_when_asked():
    assert "loss" not in sh.netem_qdisc("d0", 5, 0)
    assert sh.netem_qdisc("d0", 5, 0, jitter_ms=1.5)[-3:] == ["delay", "5ms", "1.5ms"]
    argv = sh.netem_qdisc("d0", 5, 1.5, change=True)
    assert argv[2] == "change" and argv[-2:] == ["loss", "1.5%"]


def test_bridge_and_link_builders():
    assert sh.bridge_add("br0")[:6] == ["ip", "link", "add", "name", "br0", "type"]
    assert sh.link_master("v0", "br0") == ["ip", "link", "set", "dev", "v0", "master", "br0"]
    assert sh.link_set_state("v0", False)[-1] == "down"
    assert sh.offloads_off("v0") == ["ethtool", "-K", "v0", "tso", "off", "gso", "off"]


@pytest.mark.parametrize("text,bps", [("10Mbit", 10e6), ("500Kbit", 5e5), ("12bit", 12), ("1.5Gbit", 1.5e9)])
def test_parse_rate(text, bps):
    assert sh.parse_rate(text) == pytest.approx(bps)


def test_parse_tc_output():
    cls = "class htb 1:1 root leaf 10: prio 0 rate 20Mbit ceil 20Mbit burst 1600b cburst 1600b \n"
    assert sh.parse_htb_class(cls) == {"rate_bps": 20e6, "ceil_bps": 20e6}
    assert sh.parse_htb_class("") is None
    qd = "qdisc htb 1: root refcnt 2 r2q 10 default 0x1\nqdisc bfifo 10: parent 1:1 limit 6250b\n"
    assert sh.parse_leaf(qd) == {"kind": "bfifo", "limit": 6250}
    assert sh.parse_link_up("5: v0@if4: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500")
    assert not sh.parse_link_up("5: v0@if4: <BROADCAST,MULTICAST> mtu 1500 state DOWN")


def test_executor_raises_with_stderr(tmp_path):
    ex = sh.Executor(log=[])
    with pytest.raises(sh.ShapingError, match="exit"):
        ex.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert ex.run(["true"]).returncode == 0 and len(ex.log) == 2


def test_parse_leaf_drops_reads_the_leaf_not_the_root():
    text = ("qdisc htb 1: root refcnt 2 r2q 10 default 0x1 direct_packets_stat 0 direct_qlen 1000\n"
            " Sent 1813550 bytes 1757 pkt (dropped 120, overlimits 1450 requeues 0)\n"
            " backlog 0b 0p requeues 0\n"
            "qdisc bfifo 10: parent 1:1 limit 6250b\n"
            " Sent 1813550 bytes 1757 pkt (dropped 46, overlimits 0 requeues 0)\n"
            " backlog 0b 0p requeues 0\n")
    assert sh.parse_leaf_drops(text) == 46
    assert sh.parse_leaf_drops("qdisc noqueue 0: root refcnt 2\n Sent 0 bytes 0 pkt (dropped 0)\n") == 0
