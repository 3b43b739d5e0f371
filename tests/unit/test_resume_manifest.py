"""Resume keeps history (issue 15 item 5): ``--resume`` appends to manifest.json — the first
attempt's fields (scenario read-backs, backend facts such as agent PIDs and calibrations) stay as
they were, the resumed attempt's go to ``attempts[k]``, nothing is rewritten."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.run.recorder import RunRecorder
from testbed.run.runner import run_experiment
from testbed.spec.loader import load_experiment

from sim_topology import TOPO  # noqa: E402  (tests/unit is on sys.path under pytest)
from test_runner_sim import EXP, _interrupt_after  # noqa: E402


def test_resume_appends_and_keeps_the_first_attempt(tmp_path: Path, monkeypatch):
    (tmp_path / "topo.yaml").write_text(TOPO)
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXP)
    spec = load_experiment(exp)
    with monkeypatch.context() as m:
        _interrupt_after(m, 23 * 5 + 7)  # in the second repetition's first algorithm
        with pytest.raises(KeyboardInterrupt):
            run_experiment(spec, exp, tmp_path / "out")
    (run_dir,) = list((tmp_path / "out" / "simexp").iterdir())
    first = json.loads((run_dir / "manifest.json").read_text())
    assert first["attempts"] == [] and 4 <= len(first["scenario_applied"]) < 8  # cut in repetition 1
    run_experiment(spec, exp, tmp_path / "out", resume=run_dir)
    after = json.loads((run_dir / "manifest.json").read_text())
    for key, value in first.items():
        if key == "scenario_applied":
            assert all(after[key][k] == v for k, v in value.items()), "first attempt's read-backs kept"
        elif key != "attempts":
            assert after[key] == value, key
    assert len(after["scenario_applied"]) == 8
    (attempt,) = after["attempts"]
    assert attempt["attempt"] == 1 and attempt["started_at"] > first["started_at"]
    assert attempt["per_core_flops"] > 0 and attempt["experiment"] == "simexp"


def test_manifest_fields_of_a_resumed_attempt_never_overwrite(tmp_path: Path):
    rec = RunRecorder(tmp_path)
    rec.write_manifest({"experiment": "x"})
    rec.update_manifest(agents={"h1": 101}, agent_calibration={"h1": 1.5})
    rec.merge_manifest("scenario_applied", {"ra/0": [{"readback": 1}]})
    rec.close()
    again = RunRecorder(tmp_path, resume=True)
    again.write_manifest({"experiment": "x"})
    again.update_manifest(agents={"h1": 202})
    again.merge_manifest("scenario_applied", {"ra/0": [{"readback": 2}], "ra/1": [{"readback": 3}]})
    again.close()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["agents"] == {"h1": 101} and m["agent_calibration"] == {"h1": 1.5}
    assert m["scenario_applied"] == {"ra/0": [{"readback": 1}], "ra/1": [{"readback": 3}]}
    assert m["attempts"][0]["agents"] == {"h1": 202}
    assert m["attempts"][0]["scenario_applied"] == {"ra/0": [{"readback": 2}]}
