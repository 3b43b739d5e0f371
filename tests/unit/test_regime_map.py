"""The regime map's analysis on a small real sweep of experiments/paper/regime_map.yaml's setting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.regime_map import analyze_map, best_threshold, hop_s, is_regime_map, layer_time_s, _dims
from testbed.run.runner import run_experiment
from testbed.spec.loader import load_experiment

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("map")
    exp = yaml.safe_load((REPO / "experiments/paper/regime_map.yaml").read_text())
    sw = exp["sweep"]
    sw["topology.profiles+topology.source_profile"] = sw["topology.profiles+topology.source_profile"][:1]  # rpi4-8gb
    sw["topology.bandwidths_mbps"] = [[5], [1000]]
    sw["topology.delay_ms"] = [2.0]
    sw["topology.n_hosts"] = [4]
    sw["model"] = [{"name": "llama-2-7b", "weight_format": "q4_0"}]
    sw["scenario+repetitions"] = sw["scenario+repetitions"][:1]
    exp["workload"]["new_tokens"] = 8
    path = tmp / "map.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    dirs = run_experiment(load_experiment(path), path, tmp / "out", jobs=1)
    return dirs[0].parent, tmp


def test_the_map_finds_both_sides_of_the_boundary(small_map):
    run, tmp = small_map
    assert is_regime_map(run)
    res = analyze_map(run, tmp / "ana")
    df = res["frame"].set_index("rate_mbps")
    # 7B Q4_0 on four Pi 4s (timed by their profile: 1314 ms a token on one board): a layer takes
    # ~40 ms; with 2 ms one-way delay a 5 Mbit/s hop costs ~11 ms (R ~3.7: the layer split), a
    # Gigabit hop ~4 ms (R ~10: head-level, 0.69x the layer split's latency in the full map)
    assert df.loc[5, "R"] < 4.5 and df.loc[1000, "R"] > 9
    assert df.loc[5, "ra_over_layer"] == pytest.approx(1.0, abs=0.02)
    assert df.loc[1000, "ra_over_layer"] < 0.75
    assert (df["ra_over_best"] <= 1.02).all()
    for name in ("regime_latency", "regime_memory", "regime_rule", "regime_devices"):
        assert Path(res["figures"][name]).stat().st_size > 10_000
    assert res["report"].read_text().count("<img") == 4


def test_layer_time_and_hop_follow_the_roofline():
    dims = _dims("llama-2-7b", "q4_0")
    # memory-bound on a Pi 4: a layer's Q4_0 weights (~0.11 GB) over 5.5 GB/s, plus call costs
    t = layer_time_s(dims, "rpi4-8gb", 24)
    assert 0.02 < t < 0.06
    assert hop_s(dims, 1000, 0.2) == pytest.approx(4e-4 + dims.d_model * 4 * 8 / 1e9, rel=0.6)


def test_best_threshold_separates_a_clean_boundary():
    import pandas as pd

    df = pd.DataFrame({"R": [1, 2, 4, 8, 16], "ra_over_layer": [1.0, 1.0, 0.99, 0.8, 0.5]})
    r_star, acc = best_threshold(df)
    assert 4 <= r_star < 8 and acc == 1.0
    assert np.isfinite(r_star)
