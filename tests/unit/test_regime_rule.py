"""The regime map's rule on one snapshot (``testbed.partition.regime``, ``headroom plan``): the ratio
equals the map analysis' R for the map's own setting, and the verdict sides with the map."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from analysis.regime_map import _dims, hop_s, layer_time_s
from testbed.cli import app
from testbed.partition.regime import R_STAR

REPO = Path(__file__).resolve().parents[2]


def map_point(tmp_path: Path, mbps: float, delay_ms: float, n: int = 4) -> Path:
    """experiments/paper/regime_map.yaml at one point: n Pi 4 boards, Llama-2-7B Q4_0, static."""
    exp = yaml.safe_load((REPO / "experiments/paper/regime_map.yaml").read_text())
    exp.pop("sweep")
    exp["topology"].update(profiles=["rpi4-8gb"], bandwidths_mbps=[mbps], delay_ms=delay_ms, n_hosts=n)
    path = tmp_path / f"point-{mbps}-{delay_ms}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.mark.parametrize("mbps,delay_ms,side", [(5, 2.0, "layer-level"), (1000, 0.2, "head-level"),
                                                (20, 0.2, "head-level")])
def test_plan_reports_the_maps_ratio_and_side(tmp_path, mbps, delay_ms, side):
    out = CliRunner().invoke(app, ["plan", str(map_point(tmp_path, mbps, delay_ms)), "-a", "edgeshard", "--json"])
    assert out.exit_code == 0, out.output
    regime = json.loads(out.output)["regime"]
    dims = _dims("llama-2-7b", "q4_0")
    expected = layer_time_s(dims, "rpi4-8gb", 16) / hop_s(dims, mbps, delay_ms)  # prompt_tokens: 16
    assert regime["R"] == pytest.approx(expected, rel=1e-9)
    assert regime["R_star"] == R_STAR
    assert f"predicts {side}" in regime["verdict"]


def test_text_output_prints_the_verdict_line(tmp_path):
    out = CliRunner().invoke(app, ["plan", str(map_point(tmp_path, 5, 2.0)), "-a", "resource_aware"])
    assert out.exit_code == 0, out.output
    line = next(l for l in out.output.splitlines() if l.startswith("regime: "))
    assert "vs R* = 4.96" in line and "layer-level" in line and "one hop" in line
