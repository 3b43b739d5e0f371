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
    out = subprocess.run(
        [sys.executable, "-m", "testbed", "run", str(REPO / "experiments/quickstart.yaml"), "-o", str(tmp_path),
         "--print-run-dir"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["delay_mechanism"] in ("netem", "transport")

    from node_agent.model import load_model
    from testbed.spec.loader import load_experiment
    from testbed.spec.modelref import resolve_model
    from testbed.run.events import read_events
    from testbed.run.runner import prompt_for

    spec = load_experiment(REPO / "experiments/quickstart.yaml")
    model_ref = resolve_model(spec.model)
    prompt = prompt_for(spec, model_ref, 0)
    expected = load_model(spec.model.name, seed=spec.model.seed).generate(prompt, spec.workload.new_tokens)
    done = {e["algorithm"]: e for e in read_events(run_dir) if e["type"] == "repetition_done"}
    for algo in ("resource_aware", "edgeshard", "galaxy"):
        assert not summary[algo]["failed"], summary[algo]["failure"]
        assert summary[algo]["tokens_generated"] == spec.workload.new_tokens
        assert done[algo]["tokens"] == expected, algo
        assert summary[algo]["mean_token_latency_s"] > 0

    ana = subprocess.run([sys.executable, "-m", "testbed", "analyze", str(run_dir)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert ana.returncode == 0, ana.stderr[-3000:]
    assert (run_dir / "figures" / "report.html").exists()
    assert list((run_dir / "figures").glob("*.png"))
    deadline = time.time() + 10  # the kernel frees a namespace's links asynchronously
    while manifest_leftovers(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert manifest_leftovers(run_dir) == []
