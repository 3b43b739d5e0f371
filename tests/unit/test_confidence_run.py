"""Repetitions end to end on the simulated backend: what varies between repetitions, the summary's
statistics and capacity numbers, and the report's significance marking and figures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.compare import significance_table
from analysis.load import Run, load_run
from analysis.report import analyze, render_report
from testbed.run import stats
from testbed.run.events import TOKEN_COLUMNS, read_events
from testbed.run.runner import prompt_for, run_experiment
from testbed.spec.modelref import resolve_model
from testbed.spec.loader import load_experiment

from sim_topology import TOPO  # noqa: E402  (the 4-host star test_runner_sim uses)

EXP = """\
name: {name}
topology: topo.yaml
model: {{name: tiny-gpt2}}
workload: {{prompt_tokens: 8, new_tokens: 24, seed: 1}}
algorithms: [resource_aware, edgeshard, galaxy, greedy]
repartition_every_tokens: 4
scenario:
  - {{random_walk: {{all_links: true, every_tokens: 4, min_mbps: 2, max_mbps: 40, step_pct: 60, seed: 3}}}}
{extra}
repetitions: 3
backend: simulated
"""
# every host's limit below what it holds at token 12: every algorithm runs out of memory there
SQUEEZE = "\n".join(f"  - {{at_token: 12, host: {h}, mem_limit_mib: 0.01}}" for h in ("h1", "h2", "h3", "h4"))


def _run(tmp: Path, name: str, extra: str) -> Path:
    (tmp / "topo.yaml").write_text(TOPO)
    (tmp / f"{name}.yaml").write_text(EXP.format(name=name, extra=extra))
    spec = load_experiment(tmp / f"{name}.yaml")
    (run_dir,) = run_experiment(spec, tmp / f"{name}.yaml", tmp / "out")
    return run_dir


@pytest.fixture(scope="module")
def walk_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("walk"), "walk3", "")


@pytest.fixture(scope="module")
def squeeze_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("squeeze"), "squeeze3", SQUEEZE)


def _strict_json(path: Path) -> dict:
    def no_constant(name):
        raise AssertionError(f"{path.name} holds {name}")
    return json.loads(path.read_text(), parse_constant=no_constant)


def test_repetitions_vary_prompt_and_walk_and_say_so(walk_run):
    manifest = _strict_json(walk_run / "manifest.json")
    varied = manifest["repetition_variation"]
    assert varied["repetitions"] == 3 and "workload.seed + r" in varied["prompt"]
    assert "1000003" in varied["random_walk_seed"]
    by_rep = manifest["scenario_timeline_by_repetition"]
    assert set(by_rep) == {"1", "2"}
    assert manifest["scenario_timeline"][0] == by_rep["1"][0]  # the walk starts at the same rate ...
    assert manifest["scenario_timeline"] != by_rep["1"] != by_rep["2"]  # ... and then goes elsewhere
    applied: dict[tuple, list] = {}
    for ev in read_events(walk_run):
        if ev["type"] == "scenario_applied":
            applied.setdefault((ev["repetition"], ev["algorithm"]), []).append(ev["change"])
    for rep in range(3):  # within a repetition every algorithm replays the same timeline
        assert len({tuple(v) for (r, _), v in applied.items() if r == rep}) == 1
    summary = _strict_json(walk_run / "summary.json")
    assert summary["resource_aware"]["varied_across_repetitions"] == varied


def test_prompt_per_repetition_is_derived_from_the_base_seed(tmp_path):
    (tmp_path / "topo.yaml").write_text(TOPO)
    (tmp_path / "e.yaml").write_text(EXP.format(name="p", extra=""))
    spec = load_experiment(tmp_path / "e.yaml")
    model = resolve_model(spec.model, tmp_path)
    prompts = [prompt_for(spec, model, r) for r in range(3)]
    assert len({tuple(p) for p in prompts}) == 3 and all(len(p) == 8 for p in prompts)
    expected = np.random.default_rng(1 + 2).integers(0, model.config.vocab_size, 8)
    assert prompts[2] == [int(t) for t in expected]
    assert prompt_for(spec, model, 2) == prompts[2]  # deterministic


def test_summary_statistics_from_repetitions(walk_run):
    summary = _strict_json(walk_run / "summary.json")
    tokens = pd.read_csv(walk_run / "tokens.csv")
    for algo, s in summary.items():
        assert not s["failed"], (algo, s["failure"])
        dec = tokens[(tokens["algorithm"] == algo) & (tokens["phase"] == "decode")]
        assert s["repetitions"] == 3 and len(s["per_repetition"]) == 3
        assert s["mean_token_latency_s"] == pytest.approx(dec["latency_s"].mean())
        assert s["p50_token_latency_s"] == pytest.approx(dec["latency_s"].median())
        assert s["p95_token_latency_s"] == pytest.approx(dec["latency_s"].quantile(0.95))
        means = dec.groupby("repetition")["latency_s"].mean().to_list()
        assert [r["mean_token_latency_s"] for r in s["per_repetition"]] == pytest.approx(means)
        sd = pd.Series(means).std(ddof=1)
        ci = s["latency_ci95_s"]
        assert ci["n"] == 3 and ci["half_width"] == pytest.approx(4.3027 * sd / math.sqrt(3), abs=1e-12)
        assert ci["low"] <= ci["mean"] <= ci["high"]
        peaks = [r["max_worker_peak_mem_bytes"] for r in s["per_repetition"]]
        assert s["peak_memory"]["mean_bytes"] == pytest.approx(sum(peaks) / 3)
        assert s["max_peak_mem_bytes"] == max(s["peak_mem_bytes"].values()) >= max(peaks)
        assert s["memory_ran_out"] is False and s["context_reached"] is None
        assert s["null_reasons"]["context_reached"] == "memory did not run out"
    # the walk on every link makes at least one algorithm's latency differ between repetitions
    assert any(s["latency_ci95_s"]["half_width"] > 0 for s in summary.values())


def test_summary_capacity_where_memory_ran_out(squeeze_run):
    summary = _strict_json(squeeze_run / "summary.json")
    for algo, s in summary.items():
        assert s["failed"] and s["memory_ran_out"], (algo, s["failure"])
        reached = s["context_reached"]
        rep = next(r for r in s["per_repetition"] if r["repetition"] == reached["repetition"])
        assert reached["tokens_generated"] == rep["tokens_generated"] == 12
        assert reached["context_len"] == 8 + 12  # prompt + tokens generated before the failure
        assert all(r["memory_ran_out"] for r in s["per_repetition"])
        assert set(s["peak_mem_bytes"]) == {"h1", "h2", "h3", "h4"}


def test_report_marks_significance_and_renders_figures(walk_run, squeeze_run, tmp_path):
    for run_dir in (walk_run, squeeze_run):
        out = analyze([run_dir], tmp_path / run_dir.name)
        for name in ("pareto", "memory_tokens", "latency_breakdown"):
            assert out["figures"][name]["png"].stat().st_size > 5000, name
        html = out["report"].read_text()
        assert "Differences: significant or within noise" in html and "(best other)" in html
        assert "Repetitions varied" in html and "± " in html
    run = load_run(walk_run)
    table = significance_table(run)
    assert set(table["b"]) == {"edgeshard", "galaxy", "greedy"} and table.iloc[0]["best_other"]
    for _, row in table[table["metric"] == "latency"].iterrows():
        a = [r["mean_token_latency_s"] for r in run.summary[row["a"]]["per_repetition"]]
        b = [r["mean_token_latency_s"] for r in run.summary[row["b"]]["per_repetition"]]
        assert row["verdict"] == stats.welch(a, b).verdict
    squeezed = analyze([squeeze_run], tmp_path / "sq2")["report"].read_text()
    assert "20 tokens" not in squeezed and "12 tokens (context 20)" in squeezed


def _fake_run(tmp_path: Path, ra: list[float], other: list[float]) -> Run:
    def entry(values):
        return {"mean_token_latency_s": sum(values) / len(values), "tokens_generated": 10 * len(values),
                "failed": False, "started": True,
                "per_repetition": [{"repetition": i, "mean_token_latency_s": v, "max_worker_peak_mem_bytes": 1 << 20}
                                   for i, v in enumerate(values)]}
    summary = {"resource_aware": entry(ra), "edgeshard": entry(other)}
    return Run(tmp_path, {"algorithms": list(summary)}, {}, summary, pd.DataFrame(columns=TOKEN_COLUMNS), [])


@pytest.mark.parametrize("ra, other, verdict", [
    ([0.010, 0.011, 0.012], [0.020, 0.021, 0.019], "significant"),
    ([0.010, 0.014, 0.012], [0.011, 0.015, 0.010], "within noise"),
    ([0.010], [0.020, 0.021], "not testable"),
])
def test_report_html_marks_each_verdict(tmp_path, ra, other, verdict):
    html = render_report([_fake_run(tmp_path, ra, other)], [], tmp_path).read_text()
    css = verdict.replace(" ", "-")
    assert f'<span class="verdict {css}">{verdict}</span>' in html
    assert "resource_aware vs edgeshard <b>(best other)</b>" in html
