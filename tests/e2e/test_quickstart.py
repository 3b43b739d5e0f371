"""The README's main job end to end on real Mininet and real agents (root): every algorithm's
distributed greedy tokens equal the monolithic model's, figures are drawn, nothing is left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mnexec") is None, reason="needs root and Mininet"),
]


def _pid_alive(pid: int, start_time: int | None) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (start_time is None or int(fields[19]) == int(start_time))


def manifest_leftovers(run_dir: Path) -> list[str]:
    """Everything a run's resources.jsonl recorded that still exists (scoped to that run only, so
    other networks on the machine do not disturb the check)."""
    entries = [json.loads(l) for l in (run_dir / "resources.jsonl").read_text().splitlines() if l.strip()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
    left = []
    for e in entries:
        kind = e["kind"]
        if kind in ("host", "process") and _pid_alive(e["pid"], e.get("start_time")):
            left.append(f"{kind} pid {e['pid']}")
        elif kind in ("cgroup", "socket_dir") and Path(e["path"]).exists():
            left.append(f"{kind} {e['path']}")
        elif kind == "bridge":
            prefix = e["dev"][:-2]  # the run's tag: every root-side device of the run starts with it
            left += [f"link {l.split(':')[1].strip()}" for l in links.splitlines() if f": {prefix}" in l]
        elif kind == "route" and f"{e['route'][0]} {e['route'][1]} metric {e['route'][3]}" in routes:
            left.append(f"route {' '.join(e['route'])}")
    return left


def test_quickstart_emulated_tokens_equal_monolithic(tmp_path):
    """Both points of the quickstart on real agents with SmolLM2-135M's real weights: every
    algorithm's tokens equal the monolithic model's on each repetition's prompt (and vary), the
    compute-bound point is won by a head-level placement with RA >= 25 % faster than EdgeShard, the
    link-bound point by a layer split that RA chose too; figures and report drawn, nothing left."""
    out = subprocess.run(
        [sys.executable, "-m", "testbed", "run", str(REPO / "experiments/quickstart.yaml"), "-o", str(tmp_path),
         "--print-run-dir"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    root = Path(out.stdout.strip().splitlines()[-1]).parent
    points = sorted(root.glob("point-*"))
    assert [p.name for p in points] == ["point-0", "point-1"]

    from analysis.regime_points import verdict_facts
    from node_agent.model import load_model
    from testbed.run.events import read_events
    from testbed.run.runner import prompt_for
    from testbed.spec.loader import load_experiment
    from testbed.spec.modelref import resolve_model

    spec = load_experiment(REPO / "experiments/quickstart.yaml")
    model_ref = resolve_model(spec.model)
    model = load_model(model_ref.load_arg, seed=model_ref.seed)
    expected = {r: model.generate(prompt_for(spec, model_ref, r), spec.workload.new_tokens)
                for r in range(spec.repetitions)}
    assert all(len(set(t)) > 1 for t in expected.values())  # real weights: the tokens vary
    for point in points:
        manifest = json.loads((point / "manifest.json").read_text())
        assert manifest["delay_mechanism"] in ("netem", "transport") and manifest["cpu_emulation"] == "pace"
        summary = json.loads((point / "summary.json").read_text())
        done = [e for e in read_events(point) if e["type"] == "repetition_done"]
        assert len(done) == 3 * spec.repetitions
        for e in done:
            assert not summary[e["algorithm"]]["failed"], summary[e["algorithm"]]["failure"]
            assert e["tokens"] == expected[e["repetition"]], (point.name, e["algorithm"], e["repetition"])
        assert manifest_leftovers(point) == [] or _settles(point)

    compute, links = verdict_facts(points[0]), verdict_facts(points[1])
    assert compute["kind"] == "head-level", compute
    assert compute["margins"]["edgeshard"]["faster_by"] >= 0.25 and compute["margins"]["edgeshard"]["significant"]
    assert links["kind"] == "layer-level" and "resource_aware" in links["leaders"], links

    ana = subprocess.run([sys.executable, "-m", "testbed", "analyze", str(root)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert ana.returncode == 0, ana.stderr[-3000:]
    assert list(root.glob("**/report.html")) and list(root.glob("**/*.png"))


def _settles(run_dir: Path) -> bool:
    deadline = time.time() + 10  # the kernel frees a namespace's links asynchronously
    while manifest_leftovers(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    return manifest_leftovers(run_dir) == []
