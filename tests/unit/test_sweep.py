"""Sweep expansion: the cartesian product, zipped axes (``a+b``) and generated topologies."""
from __future__ import annotations

from pathlib import Path

import pytest

import yaml

from testbed.core.errors import ConfigError
from testbed.run.runner import RunError, sweep_points
from testbed.spec.loader import load_experiment

BASE = {"name": "s", "model": {"name": "llama-2-7b", "weight_format": "q4_0"}, "algorithms": ["edgeshard"],
        "topology": {"generate": "star", "n_hosts": 3, "profiles": ["rpi5-8gb"], "source_profile": None,
                     "bandwidths_mbps": [100]},
        "backend": "simulated"}


def _write(sweep: dict, tmp: Path) -> Path:
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump({**BASE, "sweep": sweep}, sort_keys=False))
    return path


def points(sweep: dict, tmp: Path):
    path = _write(sweep, tmp)
    return sweep_points(load_experiment(path), path)


def test_zipped_axis_moves_its_paths_together_inside_the_product(tmp_path):
    pts = points({"topology.profiles+topology.source_profile": [[["rpi4-8gb"], None], [["rpi5-8gb"], "laptop"]],
                  "topology.n_hosts": [2, 4]}, tmp_path)
    assert len(pts) == 4
    profiles = [[h.profile for h in spec.topology.hosts] for _, spec in pts]
    assert profiles == [["rpi4-8gb"] * 2, ["rpi4-8gb"] * 4, ["laptop", "rpi5-8gb"], ["laptop"] + ["rpi5-8gb"] * 3]
    assert [spec.topology.source for _, spec in pts] == ["h1"] * 4


def test_zipped_scenario_and_repetitions(tmp_path):
    walk = {"random_walk": {"all_links": True, "min_frac": 0.2, "max_frac": 1.0}}
    pts = points({"scenario+repetitions": [[[], 1], [[walk], 3]]}, tmp_path)
    assert [(len(s.scenario), s.repetitions) for _, s in pts] == [(0, 1), (1, 3)]


def test_a_zipped_value_of_the_wrong_length_names_the_axis(tmp_path):
    # validation expands every point, so loading the experiment already reports it (at the axis)
    with pytest.raises(ConfigError, match=r"exp.yaml:\d+: sweep.topology.n_hosts\+repetitions: each value must be "
                                          "a list of 2"):
        points({"topology.n_hosts+repetitions": [[2, 1], [4]]}, tmp_path)
    spec = load_experiment(_write({"topology.n_hosts": [2]}, tmp_path))
    object.__setattr__(spec, "sweep", {"topology.n_hosts+repetitions": [[2, 1], [4]]})
    with pytest.raises(RunError, match=r"sweep.topology.n_hosts\+repetitions: each value must be a list of 2"):
        sweep_points(spec, tmp_path / "exp.yaml")


def test_source_profile_null_makes_the_source_one_of_the_devices(tmp_path):
    (_, spec), = points({"topology.n_hosts": [3]}, tmp_path)
    assert [(h.name, h.profile, h.source) for h in spec.topology.hosts] == [
        ("h1", "rpi5-8gb", True), ("h2", "rpi5-8gb", False), ("h3", "rpi5-8gb", False)]
