"""analysis on synthetic run directories written by the real recorder: a completed dynamic algorithm
with migrations, a static one, one that runs out of memory half-way, a torn last events line and a
summary.json that is stale for the failed algorithm; plus a two-point sweep and a bare directory."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.load import latency_table, load_run, plan_vs_measured
from analysis.report import analyze
from testbed.run.recorder import RunRecorder, summarize

ALGOS = ["resource_aware", "edgeshard", "greedy", "galaxy"]
NEW_TOKENS = 20
FAIL_AT = 9
OOM_REASON = "agent on h3 killed by the OOM killer (rc -9) while loading kv cache"
INFEASIBLE = "infeasible: greedy: block L0.ffn needs 9437184 bytes, largest free 8388608 (memory)"
TOPOLOGY = {"name": "star3", "switches": ["s1"], "hosts": [
    {"name": "h1", "mem_limit_mib": 64, "cpu_cores": 1, "source": True},
    {"name": "h2", "mem_limit_mib": 16, "cpu_cores": 0.5, "source": False},
    {"name": "h3", "mem_limit_mib": 8, "cpu_cores": 0.25, "source": False}],
    "links": [{"a": "h1", "b": "s1", "bandwidth_mbps": 50, "delay_ms": 1, "loss_pct": 0},
              {"a": "h2", "b": "s1", "bandwidth_mbps": 20, "delay_ms": 2, "loss_pct": 0},
              {"a": "h3", "b": "s1", "bandwidth_mbps": 10, "delay_ms": 5, "loss_pct": 0}]}


def latency(algo: str, i: int, bw: float = 20.0) -> tuple[float, float, float]:
    """(compute, transfer, wait) of token i; transfer grows after the bandwidth drop at token 8."""
    base = {"resource_aware": 0.010, "edgeshard": 0.016, "galaxy": 0.013}[algo] * (20.0 / bw)
    transfer = base * (2.5 if i >= 8 and algo != "resource_aware" else 1.0) + 0.0005 * (i % 3)
    return 0.001 + 0.0001 * i, transfer, 0.0002


def _mig(algo: str, i: int) -> tuple[float, int]:
    return (0.05, 3 * 2 ** 20) if algo == "resource_aware" and i in (8, 16) else (0.0, 0)


def _mem(algo: str, i: int) -> dict[str, int]:
    return {"h1": 2 ** 20, "h2": (4 + i // 4) * 2 ** 20, "h3": (6 if algo == "galaxy" else 2) * 2 ** 20}


def _one_algorithm(rec: RunRecorder, algo: str, bw: float) -> None:
    rec.event("algorithm_started", algorithm=algo, repetition=0)
    rec.event("plan", algorithm=algo, repetition=0, token_index=0, placement={"blocks": {}},
              predicted_token_latency_s=latency(algo, 1, bw)[1] * 0.9, solve_time_s=0.01)
    last = FAIL_AT if algo == "galaxy" else NEW_TOKENS
    for i in range(last):
        if i == 8:
            rec.event("scenario_applied", algorithm=algo, repetition=0, token_index=8,
                      change="token 8: link h2-s1 bandwidth_mbps=4.0", readback={"bandwidth_mbps": 4.0})
        if i and i % 8 == 0 and algo == "resource_aware":
            rec.event("plan", algorithm=algo, repetition=0, token_index=i, placement={"blocks": {}},
                      predicted_token_latency_s=latency(algo, i, bw)[1], solve_time_s=0.002)
            rec.event("mem_sample", algorithm=algo, repetition=0, token_index=i, host_mem_bytes=_mem(algo, i))
        mig_s, mig_b = _mig(algo, i)
        if mig_b:
            rec.event("migration", algorithm=algo, repetition=0, token_index=i, duration_s=mig_s,
                      bytes_moved=mig_b, moves=[["L0.kv0", "h2", "h3"], ["L0.kv1", "h2", "h3"]])
        c, t, w = latency(algo, i, bw)
        rec.token({"algorithm": algo, "repetition": 0, "token_index": i, "token_id": 7, "context_len": 8 + i,
                   "latency_s": c + t + w + mig_s, "compute_s": c, "transfer_s": t, "wait_s": w, "migration_s": mig_s,
                   "bytes_moved": 512, "migrated_bytes": mig_b, "phase": "prefill" if i == 0 else "decode"})
    if algo == "galaxy":
        rec.event("algorithm_failed", algorithm=algo, repetition=0, token_index=FAIL_AT, reason=OOM_REASON)
    rec.event("repetition_done", algorithm=algo, repetition=0, failed=algo == "galaxy",
              peak_mem_bytes=_mem(algo, last))


def make_run(run_dir: Path, bw: float = 20.0, sweep_point: dict | None = None) -> Path:
    rec = RunRecorder(run_dir)
    rec.write_config({"name": "synthetic", "topology": TOPOLOGY, "model": {"name": "tiny-gpt2"},
                      "workload": {"prompt_tokens": 8, "new_tokens": NEW_TOKENS, "seed": 0},
                      "algorithms": ALGOS, "repartition_every_tokens": 8, "backend": "simulated",
                      "sweep_point": sweep_point or {}})
    rec.write_manifest({"experiment": "synthetic", "backend": "simulated", "delay_mechanism": "netem",
                        "scenario_timeline": ["token 8: link h2-s1 bandwidth_mbps=4.0"]})
    rec.event("run_started", experiment="synthetic", backend="simulated")
    for algo in ALGOS:
        if algo == "greedy":  # no placement at all: fails before its first token
            rec.event("algorithm_started", algorithm=algo, repetition=0)
            rec.event("algorithm_failed", algorithm=algo, repetition=0, token_index=0, reason=INFEASIBLE)
            rec.event("repetition_done", algorithm=algo, repetition=0, failed=True, peak_mem_bytes={})
            continue
        _one_algorithm(rec, algo, bw)
        if algo == "edgeshard":  # the run dies before later summaries are written: stale for the rest
            rec.write_summary(summarize(run_dir, ALGOS))
    rec.close()
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"t_s": 1.5, "type": "run_do')  # torn by the crash
    return run_dir


def decode_latencies(algo: str, bw: float = 20.0) -> list[float]:
    last = FAIL_AT if algo == "galaxy" else NEW_TOKENS
    return [sum(latency(algo, i, bw)) + _mig(algo, i)[0] for i in range(1, last)]  # includes migration stalls


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "results" / "synthetic" / "run-1")


def test_loader_numbers_equal_hand_computed(run_dir: Path) -> None:
    run = load_run(run_dir)
    assert run.algorithms == ALGOS
    assert any("torn" in p for p in run.problems)
    table = latency_table(run).set_index("algorithm")
    assert pd.isna(table.loc["greedy", "mean_token_latency_s"])
    assert run.summary["greedy"]["failed"] and run.summary["greedy"]["tokens_generated"] == 0
    for algo in ("resource_aware", "edgeshard", "galaxy"):
        lat = decode_latencies(algo)
        assert table.loc[algo, "mean_token_latency_s"] == pytest.approx(sum(lat) / len(lat), rel=1e-12)
        assert run.summary[algo]["tokens_generated"] == len(lat) + 1
    ra = run.summary["resource_aware"]
    assert ra["migrations"] == 4 and ra["migrated_bytes"] == 6 * 2 ** 20
    assert table.loc["resource_aware", "mean_migration_s"] == pytest.approx(0.1 / (NEW_TOKENS - 1))
    lat = decode_latencies("resource_aware")
    assert table.loc["resource_aware", "mean_excl_migration_s"] == pytest.approx((sum(lat) - 0.1) / len(lat))
    g = run.summary["galaxy"]  # summary.json was stale for galaxy: derived from the tables
    assert g["failed"] and g["failure"] == OOM_REASON and g["failed_at_token"] == FAIL_AT
    assert g["peak_mem_bytes"]["h3"] == 6 * 2 ** 20
    ratio = table.loc["edgeshard", "ratio_to_resource_aware"]
    assert ratio == pytest.approx(table.loc["edgeshard", "mean_token_latency_s"] /
                                  table.loc["resource_aware", "mean_token_latency_s"])
    assert len(plan_vs_measured(run)) == 3 + 1 + 1  # ra: 3 plans, edgeshard 1, galaxy 1


def _assert_files(paths: list[Path]) -> None:
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 2000, p
        assert data.startswith(b"\x89PNG" if p.suffix == ".png" else b"%PDF"), p


def test_analyze_writes_figures_and_report(run_dir: Path) -> None:
    out = analyze([run_dir], None)
    assert out["report"] == run_dir / "figures" / "report.html"
    expected = {"latency_tokens", "latency_cdf", "latency_breakdown", "peak_memory", "memory_tokens",
                "migrations", "plan_accuracy"}
    assert expected <= set(out["figures"])
    _assert_files([p for f in out["figures"].values() for p in (f["png"], f["pdf"])])
    html = out["report"].read_text()
    run = load_run(run_dir)
    for algo in ("resource_aware", "edgeshard", "galaxy"):
        s = run.summary[algo]
        assert f"{s['mean_token_latency_s'] * 1e3:.3f}" in html
        assert f"{s['p95_token_latency_s'] * 1e3:.3f}" in html
    ratio = run.summary["edgeshard"]["mean_token_latency_s"] / run.summary["resource_aware"]["mean_token_latency_s"]
    assert f"{ratio:.2f}×" in html
    assert OOM_REASON in html and f"OOM at token {FAIL_AT}" in html
    assert INFEASIBLE in html and "infeasible at token 0" in html
    assert "netem" in html and "star3" in html
    assert 'src="latency_tokens.png"' in html  # relative paths


def test_sweep_and_bare_directories(tmp_path: Path) -> None:
    top = tmp_path / "synthetic" / "sweep"
    for k, bw in enumerate((10.0, 20.0, 40.0)):
        make_run(top / f"point-{k}", bw=bw, sweep_point={"topology.links.1.bandwidth_mbps": bw})
    out = analyze([top], tmp_path / "out")
    assert "sweep" in out["figures"]
    _assert_files([out["figures"]["sweep"]["png"], out["figures"]["sweep"]["pdf"]])
    assert "latency_tokens__topology.links.1.bandwidth_mbps=10.0" in out["figures"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "events.jsonl").write_text('{"t_s": 0, "type": "run_started"}\n{"t_s": 0.1, "ty')
    out = analyze([bare], None)
    assert out["report"].exists() and "tokens table: missing" in out["report"].read_text()
