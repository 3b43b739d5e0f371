"""The algorithm registry: one table, params models that match the planners, validation at load time."""
from __future__ import annotations

import inspect

import pytest

from testbed.core.errors import ConfigError
from testbed.partition import registry
from testbed.spec.loader import load_experiment


@pytest.mark.parametrize("name", registry.PLANNERS)
def test_params_model_defaults_are_the_planners_defaults(name):
    entry = registry.get(name, planner=True)
    fn = entry.planner()
    if name == "static":  # forwards its params to resource_aware
        fn = registry.get("resource_aware").planner()
    sig = {k: p.default for k, p in inspect.signature(fn).parameters.items()
           if k not in ("snapshot", "dims", "cost_model") and p.kind is p.POSITIONAL_OR_KEYWORD}
    assert entry.validate({}) == sig


def test_unknown_algorithm_and_bad_params():
    with pytest.raises(registry.AlgorithmError, match="expected one of"):
        registry.get("nope")
    with pytest.raises(registry.AlgorithmError, match="fixed"):
        registry.get("fixed", planner=True)
    with pytest.raises(registry.AlgorithmError, match="max_groups: Extra inputs"):
        registry.get("galaxy").validate({"max_groups": 2})


def test_params_are_validated_when_the_config_is_loaded(tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\nhosts:\n  - {name: h1, mem_limit_mib: 64, cpu_cores: 1, source: true}\n"
                                     "  - {name: h2, mem_limit_mib: 64, cpu_cores: 1}\nswitches: [s1]\nlinks:\n"
                                     "  - {a: h1, b: s1, bandwidth_mbps: 10}\n  - {a: h2, b: s1, bandwidth_mbps: 10}\n")
    (tmp_path / "e.yaml").write_text("name: e\ntopology: t.yaml\nmodel: {name: tiny-gpt2}\nalgorithms:\n"
                                     "  - greedy\n  - {name: resource_aware, params: {headroom_epochs: -1}}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(tmp_path / "e.yaml")
    (problem,) = [str(p) for p in info.value.problems]
    assert "e.yaml:6: algorithms[1].params" in problem and "headroom_epochs" in problem
