"""Runtime failures are results, never NaN (issue 15 item 3): a simulated path with no route is an
algorithm's recorded failure at the token it happened, and neither tokens.csv nor summary.json holds
a non-finite number."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from testbed.core.cluster import TokenRecord
from testbed.core.errors import AlgorithmFailure
from testbed.run.events import read_events
from testbed.run.runner import run_experiment
from testbed.spec.loader import load_experiment

from sim_topology import TOPO  # noqa: E402  (tests/unit is on sys.path under pytest)

EXP = """\
name: noroute
topology: topo.yaml
model: {name: tiny-gpt2}
workload: {prompt_tokens: 4, new_tokens: 12, seed: 0}
algorithms: [resource_aware, edgeshard, galaxy, greedy]
repartition_every_tokens: 100
scenario:
  - {at_token: 4, link: [h2, s1], up: false}
  - {at_token: 4, link: [h3, s1], up: false}
  - {at_token: 4, link: [h4, s1], up: false}
backend: simulated
"""


def _no_nan(text: str) -> dict:
    def refuse(name):
        raise AssertionError(f"summary.json holds {name}")
    return json.loads(text, parse_constant=refuse)


def test_no_route_is_a_recorded_failure_and_nothing_is_nan(tmp_path: Path):
    (tmp_path / "topo.yaml").write_text(TOPO)
    (tmp_path / "exp.yaml").write_text(EXP)
    (run_dir,) = run_experiment(load_experiment(tmp_path / "exp.yaml"), tmp_path / "exp.yaml", tmp_path / "out")
    summary = _no_nan((run_dir / "summary.json").read_text())
    with open(run_dir / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("latency_s", "compute_s", "transfer_s", "wait_s", "migration_s"):
            assert math.isfinite(float(r[k])), (k, r)
    failed = {e["algorithm"]: e for e in read_events(run_dir) if e["type"] == "algorithm_failed"}
    done = {e["algorithm"]: e for e in read_events(run_dir) if e["type"] == "repetition_done"}
    for algo, s in summary.items():
        if not any(r["algorithm"] == algo and r["token_index"] == "4" for r in rows) and algo in failed:
            assert s["failed"] and "no route" in s["failure"], (algo, s["failure"])
            assert failed[algo]["token_index"] == 4 and done[algo]["failed"] is True
        else:  # a plan that kept every block on reachable hosts finishes
            assert not s["failed"] and s["tokens_generated"] == 12
    assert failed, "every planner put blocks on a worker: some algorithm must lose its route"


def test_controller_refuses_a_nan_token_from_any_backend():
    from testbed.run.controller import AlgorithmLoop

    class Rec:
        def token(self, row):
            raise AssertionError("a NaN row was recorded")

    loop = AlgorithmLoop.__new__(AlgorithmLoop)
    loop.rec, loop.state = Rec(), type("S", (), {"tokens": [], "elapsed_s": 0.0})()
    loop.s = type("S", (), {"algorithm": "greedy", "repetition": 0, "prompt_ids": [1]})()
    with pytest.raises(AlgorithmFailure, match="non-finite"):
        loop._record_token(3, TokenRecord(1, float("nan"), 0.0, 0.0), 0.0, 0, phase="decode")
    assert loop.state.tokens == []
