"""Ingress shaping on SSH devices, against real sshd in namespaces (``tests.ssh.rig``): h3's link has
``shape: true`` at 4 Mbit/s (the rig's "real" link is 10). With ``ingress_shaping: ifb`` the hop into
h3 is an HTB class on an IFB at h3: the rate measured h1 -> h3 is the shaped one, two senders at
once share it (unlike per-path shaping at the senders, measured side by side), a scenario change
goes in place and reads back from ``tc -s class show`` (h3's own uplink, one egress class for
all its peers, is shared too), and nothing is left (no IFB, no ingress
qdisc, GRO back on) after the tear-down — or after a SIGKILLed orchestrator and ``headroom clean
RUN_DIR``."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.ssh.conftest import NEEDS
from tests.ssh.test_ssh_bad_input import assert_nothing_left, topo
from testbed.backends.ssh.fleet import SshFleet
from testbed.backends.ssh.measure import measure_pair
from testbed.emulation.cleanup import Manifest
from testbed.spec.inventory import load_inventory

pytestmark = [pytest.mark.ssh, pytest.mark.root, NEEDS]
REPO = Path(__file__).resolve().parents[2]
SHAPED_MBPS = 4.0
SECONDS = 3.0


def shaped_topology():
    t = topo()
    links = tuple(l.model_copy(update={"shape": True, "bandwidth_mbps": SHAPED_MBPS}) if l.a == "h3" else l
                  for l in t.links)
    return t.model_copy(update={"links": links})


def in_host(rig, h: str, argv: list[str]) -> str:
    """``argv`` run in device ``h``'s network namespace (read-only inspection)."""
    return subprocess.run(["nsenter", "-t", str(rig.net.host_pid(h)), "-n", "--", *argv], capture_output=True,
                          text=True, timeout=30).stdout


def leftovers(rig, h: str = "h3") -> tuple[str, str]:
    """(IFB devices, ingress qdiscs) in ``h``'s namespace: both empty when nothing is left."""
    return (in_host(rig, h, ["ip", "-o", "link", "show", "type", "ifb"]).strip(),
            in_host(rig, h, ["tc", "qdisc", "show", "dev", f"{h}-eth0", "ingress"]).strip())


def gro(rig, h: str = "h3", to: str | None = None) -> str:
    """GRO of ``h``'s interface (the rig turns it off; a real NIC has it on): set it ``to``, read it."""
    if to is not None:
        subprocess.run(["nsenter", "-t", str(rig.net.host_pid(h)), "-n", "--", "ethtool", "-K", f"{h}-eth0", "gro",
                        to], check=True, capture_output=True, timeout=30)
    out = in_host(rig, h, ["ethtool", "-k", f"{h}-eth0"])
    return next(l.split(":")[1].split()[0] for l in out.splitlines() if l.startswith("generic-receive-offload"))


def concurrent_rate(fleet, pairs: list[tuple[str, str]]) -> float:
    """Mbit/s of all ``(src, dst)`` transfers run at once: all bytes over the union of the receivers'
    windows (the rig's devices share one clock)."""
    got: dict[tuple, dict] = {}
    port0 = fleet.inventory.data_port + 10

    def run(i, p):
        got[p] = measure_pair(fleet, *p, port=port0 + i, seconds=SECONDS)
    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = (max(m["rx_window_unix"][1] for m in got.values()) - min(m["rx_window_unix"][0] for m in got.values()))
    return sum(m["rx_bytes"] for m in got.values()) * 8 / span / 1e6


def shared_rate(fleet, pairs: list[tuple[str, str]], tries: int = 3) -> tuple[float, list[float]]:
    """``concurrent_rate`` of flows that share one shaped class: never above 1.1x the class's rate
    (asserted on every run: that is what sharing one class means), measured again while below
    0.6x (at most ``tries`` runs): TCP flows into a few-frame FIFO sometimes stall on a
    retransmission timeout (a suite run read 1.29 of 4 Mbit/s once; 2.8-3.3 otherwise), a shaper
    set too low misses every run. Returns the best run and all of them."""
    runs = []
    for _ in range(tries):
        runs.append(concurrent_rate(fleet, pairs))
        assert runs[-1] <= 1.1 * SHAPED_MBPS, runs
        if runs[-1] >= 0.6 * SHAPED_MBPS:
            break
    return max(runs), runs


def bring_up(rig, tmp: Path, mode: str) -> tuple[SshFleet, Path]:
    inv = load_inventory(rig.inventory(tmp / f"inv-{mode}.yaml", measure=False, ingress_shaping=mode))
    run = tmp / f"run-{mode}"
    run.mkdir()
    return SshFleet(shaped_topology(), inv, f"ing{mode[:3]}", Manifest(run / "resources.jsonl"), run).start(), run


def test_ifb_ingress_rate_contention_change_and_teardown(rig, tmp_path):
    assert gro(rig, to="on") == "on"
    fleet, run = bring_up(rig, tmp_path, "ifb")
    try:
        assert gro(rig) == "off"  # for the run: merged packets would not fit the few-frame leaf FIFO
        assert fleet.shaper.ifb.keys() == {"h3"} and not fleet.shaper.wants("h1")
        read = fleet.read_link("h3", "s1")
        assert read["ingress"] == {"s1->h3": SHAPED_MBPS}
        assert read["classes"] == {"h3->h1": SHAPED_MBPS, "h3->h2": SHAPED_MBPS}
        alone = measure_pair(fleet, "h1", "h3", seconds=SECONDS)["rate_mbps"]
        assert alone == pytest.approx(SHAPED_MBPS, rel=0.2)  # measured 3.6-3.8: TCP into a 4-frame FIFO
        # one shared downlink: two TCP flows into one class's short FIFO share it unevenly and do not
        # always keep it full (measured 2.8-3.3 of 4), but never get more than it (senders mode: ~2x)
        both, runs = shared_rate(fleet, [("h1", "h3"), ("h2", "h3")])
        assert 0.6 * SHAPED_MBPS <= both, runs
        out, runs = shared_rate(fleet, [("h3", "h1"), ("h3", "h2")])  # h3's uplink: one egress class for both
        assert 0.6 * SHAPED_MBPS <= out, runs
        after = fleet.set_link("h3", "s1", bandwidth_mbps=2.0)
        assert after["ingress"] == {"s1->h3": 2.0} and after["classes"] == {"h3->h1": 2.0, "h3->h2": 2.0}
        changed = measure_pair(fleet, "h2", "h3", seconds=SECONDS)["rate_mbps"]
        assert changed == pytest.approx(2.0, rel=0.2)
        assert leftovers(rig)[0] and leftovers(rig)[1]
        print(f"ifb: alone {alone:.2f}, two senders {both:.2f}, h3 to two peers {out:.2f} (shaped {SHAPED_MBPS}); "
              f"changed to 2: {changed:.2f} Mbit/s")
    finally:
        removed = fleet.stop()
    assert not [l for l in removed if l.startswith("FAILED")], removed
    assert any("deleted IFB device hrifb" in l for l in removed) and "h3: deleted ingress qdisc of h3-eth0" in removed
    assert leftovers(rig) == ("", "") and gro(rig) == "on" and "h3: turned GRO back on for h3-eth0" in removed
    assert_nothing_left(rig, run)


def test_senders_mode_shapes_per_path_without_contention(rig, tmp_path):
    """The older mechanism, kept for kernels without IFB: each sender has its own 4 Mbit/s class
    toward h3, so two senders together get about twice the shaped rate (what IFB fixes)."""
    fleet, run = bring_up(rig, tmp_path, "senders")
    try:
        assert not fleet.shaper.ifb and fleet.shaper.wants("h1")
        assert fleet.read_link("h3", "s1")["ingress"] == {}
        assert measure_pair(fleet, "h1", "h3", seconds=SECONDS)["rate_mbps"] == pytest.approx(SHAPED_MBPS, rel=0.2)
        runs = []  # measured again while short (a TCP stall into the short FIFO, as in ``shared_rate``)
        while len(runs) < 3 and (not runs or runs[-1] < 1.6 * SHAPED_MBPS):
            runs.append(concurrent_rate(fleet, [("h1", "h3"), ("h2", "h3")]))
        print(f"senders: two senders {runs} Mbit/s (shaped {SHAPED_MBPS})")
        assert max(runs) >= 1.6 * SHAPED_MBPS, runs
        assert leftovers(rig) == ("", "")
    finally:
        removed = fleet.stop()
    assert not [l for l in removed if l.startswith("FAILED")], removed
    assert_nothing_left(rig, run)


HOLD = """
import sys, time
from testbed.backends.ssh.fleet import SshFleet
from testbed.emulation.cleanup import Manifest
from testbed.spec.inventory import load_inventory
from testbed.spec.schema import TopologySpec
from pathlib import Path
run = Path(sys.argv[3])
topo = TopologySpec.model_validate_json(Path(sys.argv[2]).read_text())
SshFleet(topo, load_inventory(sys.argv[1]), "ingkill", Manifest(run / "resources.jsonl"), run).start()
print("up", flush=True)
time.sleep(600)
"""


def test_sigkilled_bring_up_then_clean_removes_ifb_and_ingress_qdisc(rig, tmp_path):
    inv = rig.inventory(tmp_path / "inv.yaml", measure=False)
    (tmp_path / "topo.json").write_text(shaped_topology().model_dump_json())
    run = tmp_path / "run"
    run.mkdir()
    gro(rig, to="on")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(inv), str(tmp_path / "topo.json"), str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "up", proc.stderr.read() if proc.poll() is not None else line
        assert leftovers(rig)[0] and leftovers(rig)[1] and gro(rig) == "off"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    journal = [json.loads(l) for l in (run / "resources.jsonl").read_text().splitlines()]
    assert {e.get("what") for e in journal if e.get("kind") == "remote"} >= {"ifb", "qdisc", "cgroup", "dir"}
    out = subprocess.run([sys.executable, "-m", "testbed", "clean", str(run)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert not [l for l in out.stdout.splitlines() if l.startswith("FAILED")], out.stdout
    assert "h3: deleted ingress qdisc of h3-eth0" in out.stdout and "h3: deleted IFB device hrifb" in out.stdout
    assert "h3: turned GRO back on for h3-eth0" in out.stdout
    assert leftovers(rig) == ("", "") and gro(rig) == "on"
    assert_nothing_left(rig, run)
