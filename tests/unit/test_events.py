"""The one fold over a run's records (``testbed.run.events``): torn lines, attempts, peaks, and the
recorder and analysis giving the same summary; an out-of-scope exact plan recorded as a failure."""
from __future__ import annotations

import json
from pathlib import Path

from analysis.load import load_run
from testbed.run.events import fold_summary, latest_attempts, read_events
from testbed.run.recorder import RunRecorder, summarize
from testbed.run.runner import run_experiment
from testbed.spec.loader import load_experiment


def _record(run_dir: Path, *, resume: bool = False, done: bool = True) -> None:
    rec = RunRecorder(run_dir, resume=resume)
    rec.event("algorithm_started", algorithm="a", repetition=0)
    rec.event("mem_sample", algorithm="a", repetition=0, token_index=4, host_mem_bytes={"h1": 5, "h2": 7},
              host_peak_mem_bytes={"h1": 6, "h2": 9})
    for i in range(3):
        rec.token({"algorithm": "a", "repetition": 0, "token_index": i, "latency_s": 0.1 * (i + 1),
                   "phase": "prefill" if i == 0 else "decode"})
    if done:
        rec.event("repetition_done", algorithm="a", repetition=0, failed=False, peak_mem_bytes={"h1": 8, "h2": 9})
    rec.close()


def test_torn_line_then_resume_keeps_later_events(tmp_path):
    _record(tmp_path, done=False)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"t_s": 1.5, "type": "repetition_do')  # torn by a crash
    _record(tmp_path, resume=True)  # the resumed run appends after the torn line
    problems: list[str] = []
    events = read_events(tmp_path, problems)
    assert [e["type"] for e in events][-1] == "repetition_done"
    assert problems == ["events.jsonl:3: torn or malformed line skipped"]
    latest = latest_attempts(events)
    assert [e["type"] for e in latest] == ["algorithm_started", "mem_sample", "repetition_done"]


def test_peaks_include_samples_of_an_interrupted_repetition(tmp_path):
    _record(tmp_path, done=False)
    s = summarize(tmp_path, ["a"], source="h1")["a"]
    assert s["peak_mem_bytes"] == {"h1": 6, "h2": 9} and s["max_worker_peak_mem_bytes"] == 9


def test_recorder_and_analysis_fold_alike(tmp_path):
    _record(tmp_path)
    written = summarize(tmp_path, ["a"], source="h1")["a"]
    run = load_run(tmp_path)
    assert fold_summary(run.tokens, run.events, "a", "h1") == written
    assert written["peak_mem_bytes"] == {"h1": 8, "h2": 9} and written["tokens_generated"] == 3
    assert written["mean_token_latency_s"] == (0.2 + 0.3) / 2


WORKERS = [f"h{i}" for i in range(2, 8)]  # 4 layers x 6^3 devices, 3 FFN chunks not dividing 256
# columns (no chain search): beyond optimal's decode MILP scope
TOPO = "name: t7\nhosts:\n  - {name: h1, mem_limit_mib: 64, cpu_cores: 1, source: true}\n" + "".join(
    f"  - {{name: {h}, mem_limit_mib: 16, cpu_cores: 0.5}}\n" for h in WORKERS) + \
    "switches: [s1]\nlinks:\n" + "".join(f"  - {{a: {h}, b: s1, bandwidth_mbps: 20, delay_ms: 2}}\n"
                                         for h in ["h1"] + WORKERS)

EXP = """\
name: scope
topology: topo.yaml
model: {name: tiny-gpt2}
workload: {prompt_tokens: 4, new_tokens: 6, seed: 1}
algorithms: [{name: optimal, params: {ffn_chunks: 3}}, greedy]
backend: simulated
"""


def test_out_of_scope_optimal_is_a_recorded_failure(tmp_path):
    (tmp_path / "topo.yaml").write_text(TOPO)
    (tmp_path / "exp.yaml").write_text(EXP)  
    (run_dir,) = run_experiment(load_experiment(tmp_path / "exp.yaml"), tmp_path / "exp.yaml", tmp_path / "out")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimal"]["failed"] and "exceeds the MILP scope limit" in summary["optimal"]["failure"]
    assert not summary["greedy"]["failed"] and summary["greedy"]["tokens_generated"] == 6
    (fail,) = [e for e in read_events(run_dir) if e["type"] == "algorithm_failed"]
    assert fail["code"] == "out_of_scope"
