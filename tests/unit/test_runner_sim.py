"""The runner on the simulated backend: run directory contents, identical scenario per algorithm,
failures recorded as results, and resume after an interruption giving the same summary."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from testbed.spec.loader import load_experiment
from testbed.run.events import read_events
from testbed.run.runner import run_experiment

from sim_topology import TOPO  # noqa: E402  (tests/unit is on sys.path under pytest)

EXP = """\
name: simexp
topology: topo.yaml
model: {name: tiny-gpt2}
workload: {prompt_tokens: 8, new_tokens: 24, seed: 1}
algorithms: [resource_aware, edgeshard, galaxy, greedy]
repartition_every_tokens: 4
scenario:
  - {at_token: 6, link: [h2, s1], bandwidth_mbps: 1}
  - {at_token: 12, host: h3, mem_limit_mib: 8}
  - {ramp: {link: [h4, s1], from_token: 14, to_token: 22, from_mbps: 10, to_mbps: 40, steps: 2}}
repetitions: 2
backend: simulated
"""


@pytest.fixture
def exp_path(tmp_path: Path) -> Path:
    (tmp_path / "topo.yaml").write_text(TOPO)
    (tmp_path / "exp.yaml").write_text(EXP)
    return tmp_path / "exp.yaml"


def test_run_directory_contents(exp_path, tmp_path):
    spec = load_experiment(exp_path)
    (run_dir,) = run_experiment(spec, exp_path, tmp_path / "out")
    for name in ("config.resolved.yaml", "manifest.json", "events.jsonl", "tokens.csv", "summary.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == {"resource_aware", "edgeshard", "galaxy", "greedy"}
    for algo, s in summary.items():
        for key in ("mean_token_latency_s", "p95_token_latency_s", "tokens_generated", "migrations",
                    "migrated_bytes", "peak_mem_bytes", "failed", "failure"):
            assert key in s, (algo, key)
        if not s["failed"]:
            assert s["tokens_generated"] == 2 * 24
    with open(run_dir / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    events = read_events(run_dir)
    applied = {}
    for ev in events:
        if ev["type"] == "scenario_applied":
            applied.setdefault((ev["algorithm"], ev["repetition"]), []).append((ev["token_index"], ev["change"]))
    timelines = list(applied.values())
    assert timelines and all(t == timelines[0] for t in timelines), "every algorithm must replay the same scenario"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["per_core_flops"] > 0 and manifest["delay_mechanism"] == "simulated"
    # the manifest keeps what was applied per algorithm/repetition, with the backend's read-back
    assert set(manifest["scenario_applied"]) == {f"{a}/{r}" for a in summary for r in (0, 1)}
    first = manifest["scenario_applied"]["greedy/1"][0]
    assert first["token_index"] == 6 and first["readback"]["bandwidth_mbps"] == pytest.approx(1.0)
    links = [json.loads(r["bytes_by_link"]) for r in rows if r["bytes_by_link"]]
    assert links and all(sum(d.values()) == int(r["bytes_moved"]) for d, r in
                         zip(links, [r for r in rows if r["bytes_by_link"]]))


def _interrupt_after(monkeypatch, n_steps: int):
    from testbed.backends.simulated import cluster as sim_cluster

    real_step = sim_cluster.SimulatedCluster.step
    calls = {"n": 0}

    def step(self, token_id):
        calls["n"] += 1
        if calls["n"] == n_steps:
            raise KeyboardInterrupt
        return real_step(self, token_id)

    monkeypatch.setattr(sim_cluster.SimulatedCluster, "step", step)


def test_resume_after_interrupt_gives_the_same_summary(exp_path, tmp_path, monkeypatch):
    spec = load_experiment(exp_path)
    (full,) = run_experiment(spec, exp_path, tmp_path / "full")
    with monkeypatch.context() as m:
        _interrupt_after(m, 23 * 5 + 7)  # in the middle of the second repetition's first algorithm
        with pytest.raises(KeyboardInterrupt):
            run_experiment(spec, exp_path, tmp_path / "cut")
    (cut,) = list((tmp_path / "cut" / "simexp").iterdir())
    partial = json.loads((cut / "summary.json").read_text())
    assert any(v["tokens_generated"] for v in partial.values()), "work done before the interrupt is kept"
    run_experiment(spec, exp_path, tmp_path / "cut", resume=cut)
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert a == b
    types = [e["type"] for e in read_events(cut)]
    assert "run_interrupted" in types and "run_resumed" in types


def test_infeasible_algorithm_is_a_result_not_a_crash(exp_path, tmp_path):
    text = EXP.replace("scenario:", "scenario:\n  - {at_token: 2, host: h2, mem_limit_mib: 0.01}\n"
                                    "  - {at_token: 2, host: h3, mem_limit_mib: 0.01}\n"
                                    "  - {at_token: 2, host: h4, mem_limit_mib: 0.01}")
    exp_path.write_text(text)
    spec = load_experiment(exp_path)
    (run_dir,) = run_experiment(spec, exp_path, tmp_path / "out")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["edgeshard"]["failed"] and "OOM" in summary["edgeshard"]["failure"]
    assert summary["resource_aware"]["failed"]


def test_cli_run_and_plan(exp_path, tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "testbed", "run", str(exp_path), "-o", str(tmp_path / "o"),
                          "--print-run-dir"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (Path(out.stdout.strip().splitlines()[-1]) / "summary.json").exists()
    plan = subprocess.run([sys.executable, "-m", "testbed", "plan", str(exp_path), "--algorithm", "resource_aware",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    obj = json.loads(plan.stdout)
    assert {"algorithm", "predicted_token_latency_s", "solve_time_s", "placement"} <= set(obj)
    assert obj["predicted_token_latency_s"] > 0 and len(obj["placement"]["layers"]) == 4
    bad = subprocess.run([sys.executable, "-m", "testbed", "plan", str(exp_path), "--algorithm", "magic"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown algorithm 'magic'" in bad.stderr and "Traceback" not in bad.stderr
    exp_path.write_text(EXP.replace("new_tokens: 24", "new_tokens: -1"))
    broken = subprocess.run([sys.executable, "-m", "testbed", "run", str(exp_path)], capture_output=True, text=True,
                            timeout=120)
    assert broken.returncode == 2 and "exp.yaml:4: workload.new_tokens" in broken.stderr


def test_plan_json_carries_the_exact_solvers_certificate():
    from testbed.run.planning import plan_initial

    repo = Path(__file__).resolve().parents[2]
    obj = plan_initial(load_experiment(repo / "experiments/paper/small_scale_exact.yaml"), "optimal")
    info = obj["planner"]
    assert info["latency_certified"] is True and info["latency_gap"] == 0.0
    assert info["latency_s"] == pytest.approx(obj["predicted_token_latency_s"])


def test_clean_of_a_missing_run_directory_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "testbed", "clean", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "no such run directory" in out.stderr and "Traceback" not in out.stderr


def test_a_migration_refused_before_anything_moved_keeps_the_current_placement(tmp_path, monkeypatch):
    from testbed.core.errors import MigrationRefused
    from testbed.backends.simulated.cluster import SimulatedCluster

    def refuse(self, new):
        raise MigrationRefused("migration refused: h3 cannot receive head of layer 0 (test)")
    monkeypatch.setattr(SimulatedCluster, "migrate", refuse)
    exp = Path(__file__).resolve().parents[2] / "experiments/paper/memory_squeeze.yaml"  # RA moves at 32
    (run_dir,) = run_experiment(load_experiment(exp), exp, tmp_path / "out", backend="simulated")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = read_events(run_dir)
    refused = [e for e in events if e["type"] == "migration_refused"]
    assert refused and "h3 cannot receive" in refused[0]["reason"]
    assert not any(e["type"] == "migration" for e in events)
    algo = refused[0]["algorithm"]
    # the run went on with the placement it had: here the squeeze it could not escape is then
    # enforced and the algorithm fails with the OOM, not with the refusal
    assert summary[algo]["tokens_generated"] == refused[0]["token_index"] == 32
    assert summary[algo]["failed"] and summary[algo]["failure"].startswith("OOM on h2")


def test_delay_loss_and_one_direction_changes_run_and_are_read_back(tmp_path: Path):
    """Issue 16 items 2-3 through the runner: a one-direction delay step, a delay ramp and a loss walk
    are applied identically for every algorithm, read back per direction into the manifest, and a
    delay rise re-plans a dynamic algorithm at once (replan_threshold_pct)."""
    (tmp_path / "topo.yaml").write_text(TOPO)
    exp = EXP.split("scenario:")[0] + """scenario:
  - {at_token: 5, link: [h2, s1], delay_ms: 40, direction: b_to_a}
  - {ramp: {link: [h3, s1], from_token: 8, to_token: 16, from_ms: 2, to_ms: 20, steps: 2}}
  - {random_walk: {link: [h4, s1], min_pct: 0, max_pct: 2, every_tokens: 6, seed: 2}}
repetitions: 1
backend: simulated
"""
    (tmp_path / "exp.yaml").write_text(exp)
    (run_dir,) = run_experiment(load_experiment(tmp_path / "exp.yaml"), tmp_path / "exp.yaml", tmp_path / "out")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not any(s["failed"] for s in summary.values()), summary
    applied = json.loads((run_dir / "manifest.json").read_text())["scenario_applied"]
    runs = list(applied.values())
    assert len(runs) == 4 and all([a["change"] for a in r] == [a["change"] for a in runs[0]] for r in runs)
    (step,) = [a for a in runs[0] if "h2" in a["change"]]
    assert step["change"] == "token 5: link s1->h2 delay_ms=40.0"
    assert step["readback"]["s1->h2"]["delay_ms"] == 40 and step["readback"]["h2->s1"]["delay_ms"] == 2
    losses = [a["readback"]["loss_pct"] for a in runs[0] if "h4" in a["change"]]
    assert len(losses) == 4 and losses[0] == 1.0 and all(0 <= v <= 2 for v in losses)
    delays = [a["readback"]["delay_ms"] for a in runs[0] if "h3" in a["change"]]
    assert delays == [2, 11, 20]
    events = [e for e in read_events(run_dir / "events.jsonl") if e.get("algorithm") == "resource_aware"]
    plans = [e["token_index"] for e in events if e["type"] == "plan"]
    assert 5 in plans  # the 40 ms rise re-planned at once (decisions are scheduled every 4 tokens)
