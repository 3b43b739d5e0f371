"""Topology and experiment YAML: good files load; every kind of bad file gives FILE:LINE: field: message."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed.core.errors import ConfigError
from testbed.spec.loader import load_experiment, load_topology

REPO = Path(__file__).resolve().parents[2]

GOOD_TOPO = """\
name: t
hosts:
  - {name: h1, mem_limit_mib: 1024, cpu_cores: 0.5, source: true}
  - {name: h2, mem_limit_mib: 512, cpu_cores: 0.25}
switches: [s1]
links:
  - {a: h1, b: s1, bandwidth_mbps: 50, delay_ms: 2}
  - {a: h2, b: s1, bandwidth_mbps: 10, delay_ms: 5, b_to_a: {bandwidth_mbps: 2}}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(fn, path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fn(path)
    return [str(p) for p in info.value.problems]


def test_good_topology_loads_with_per_direction_override(tmp_path):
    topo = load_topology(write(tmp_path, "t.yaml", GOOD_TOPO))
    assert topo.source == "h1"
    link = topo.find_link("h2", "s1")
    assert link.direction("h2").bandwidth_mbps == 10
    assert link.direction("s1").bandwidth_mbps == 2
    assert link.direction("s1").delay_ms == 5


def test_specs_are_frozen(tmp_path):
    topo = load_topology(write(tmp_path, "t.yaml", GOOD_TOPO))
    with pytest.raises(Exception):
        topo.hosts[0].mem_limit_mib = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("mem_limit_mib: 512", "mem_limit_mib: 0"), "t.yaml:4: hosts[1].mem_limit_mib: Input should be greater than 0"),
        (("bandwidth_mbps: 50", "bandwidth_mbps: -5"), "t.yaml:7: links[0].bandwidth_mbps: Input should be greater than 0"),
        (("cpu_cores: 0.25}", "cpu_cores: 0.25, colour: red}"), "t.yaml:4: hosts[1].colour: unknown key"),
        (("{a: h2, b: s1", "{a: h2, b: s9"), "t.yaml:8: links[1].b: unknown node 's9'"),
        (("cpu_cores: 0.5,", "cpu_cores: fast,"), "t.yaml:3: hosts[0].cpu_cores: Input should be a valid number"),
        (("loss_pct: 0", "loss_pct: 0"), None),
        (("delay_ms: 2}", "delay_ms: 2, loss_pct: 150}"), "t.yaml:7: links[0].loss_pct: Input should be less than or equal to 100"),
        (("source: true", "source: false"), "hosts: exactly one host must have source: true"),
    ],
)
def test_bad_topology_reports_file_line_field(tmp_path, edit, expected):
    text = GOOD_TOPO.replace(*edit)
    path = write(tmp_path, "t.yaml", text)
    if expected is None:
        load_topology(path)
        return
    found = problems_of(load_topology, path)
    assert any(expected in p for p in found), found
    assert all(p.startswith(str(path) + ":") for p in found)


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "t.yaml", "name: t\nhosts:\n  - {name: h1, mem_limit_mib: [\n")
    (p,) = problems_of(load_topology, path)
    assert p.startswith(f"{path}:") and "syntax error" in p


def test_missing_file(tmp_path):
    (p,) = problems_of(load_topology, tmp_path / "nope.yaml")
    assert "cannot read" in p


def experiment(tmp_path: Path, body: str) -> Path:
    write(tmp_path, "topo.yaml", GOOD_TOPO)
    return write(tmp_path, "exp.yaml", "name: e\ntopology: topo.yaml\nmodel: {name: tiny-gpt2}\n" + body)


def test_good_experiment_resolves_topology_relative_to_file(tmp_path):
    spec = load_experiment(experiment(tmp_path, "algorithms: [resource_aware, edgeshard]\n"
                                                "scenario:\n  - {at_token: 4, link: [h2, s1], bandwidth_mbps: 2}\n"))
    assert spec.topology.name == "t"
    assert [a.name for a in spec.algorithm_specs()] == ["resource_aware", "edgeshard"]


@pytest.mark.parametrize(
    "body, expected",
    [
        ("algorithms: [resource_aware]\nscenario:\n  - {at_token: 4, link: [h2, h9], bandwidth_mbps: 2}\n",
         "exp.yaml:6: scenario[0].link: no link between 'h2' and 'h9'"),
        ("algorithms: [resource_aware]\nscenario:\n  - {at_token: 4, host: h7, mem_limit_mib: 2}\n",
         "exp.yaml:6: scenario[0].host: unknown host 'h7'"),
        ("algorithms: [resource_aware, magic]\n", "exp.yaml:4: algorithms[1]: unknown algorithm 'magic'"),
        ("algorithms: [resource_aware]\nscenario:\n  - {at_token: 4, link: [h2, s1], mem_limit_mib: 2}\n",
         "exp.yaml:6: scenario[0]: a link event changes"),
        ("algorithms: [resource_aware]\nworkload: {prompt_tokens: 0}\n", "exp.yaml:5: workload.prompt_tokens"),
        ("algorithms: [resource_aware]\nrepartition_every: 3\n", "exp.yaml:5: repartition_every: unknown key"),
        ("algorithms: []\n", "exp.yaml:4: algorithms"),
    ],
)
def test_bad_experiment(tmp_path, body, expected):
    found = problems_of(load_experiment, experiment(tmp_path, body))
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_at_once_field_errors_and_references(tmp_path):
    body = ("algorithms: [resource_aware, magic]\nworkload: {prompt_tokens: 0}\nscenario:\n"
            "  - {at_token: 4, link: [h2, h9], bandwidth_mbps: 2}\n  - {at_token: 4, host: h7, mem_limit_mib: 0}\n")
    found = problems_of(load_experiment, experiment(tmp_path, body))
    expected = ["exp.yaml:4: algorithms[1]: unknown algorithm 'magic'", "exp.yaml:5: workload.prompt_tokens",
                "exp.yaml:7: scenario[0].link: no link between 'h2' and 'h9'",
                "exp.yaml:8: scenario[1].mem_limit_mib", "exp.yaml:8: scenario[1].host: unknown host 'h7'"]
    for e in expected:
        assert any(e in p for p in found), (e, found)
    assert [int(p.split(":")[1]) for p in found] == sorted(int(p.split(":")[1]) for p in found)  # in file order


def test_missing_topology_file_is_reported_at_the_reference(tmp_path):
    path = write(tmp_path, "exp.yaml", "name: e\ntopology: gone.yaml\nmodel: {name: tiny-gpt2}\nalgorithms: [greedy]\n")
    (p,) = problems_of(load_experiment, path)
    assert p.startswith(f"{path}:2: topology: file not found")


def test_errors_in_referenced_topology_name_that_file(tmp_path):
    write(tmp_path, "topo.yaml", GOOD_TOPO.replace("mem_limit_mib: 512", "mem_limit_mib: -1"))
    path = write(tmp_path, "exp.yaml", "name: e\ntopology: topo.yaml\nmodel: {name: tiny-gpt2}\nalgorithms: [greedy]\n")
    found = problems_of(load_experiment, path)
    assert any(p.startswith(f"{tmp_path / 'topo.yaml'}:4: hosts[1].mem_limit_mib") for p in found), found


def test_cli_validate_exit_codes(tmp_path):
    bad = experiment(tmp_path, "algorithms: [nope]\n")
    out = subprocess.run([sys.executable, "-m", "testbed", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert f"{bad}:4: algorithms[0]: unknown algorithm 'nope'" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "testbed", "validate", str(REPO / "experiments/quickstart.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_shipped_files_validate():
    files = sorted(REPO.glob("topologies/*.yaml")) + sorted(REPO.glob("experiments/**/*.yaml"))
    out = subprocess.run([sys.executable, "-m", "testbed", "validate", *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_scenario_generators_validate_and_report(tmp_path):
    good = ("algorithms: [greedy]\nscenario:\n"
            "  - {ramp: {link: [h2, s1], from_token: 0, to_token: 8, from_mbps: 10, to_mbps: 2}}\n"
            "  - {random_walk: {link: [h1, s1], min_mbps: 1, max_mbps: 50, seed: 3}}\n")
    spec = load_experiment(experiment(tmp_path, good))
    assert spec.scenario[0].ramp.to_mbps == 2 and spec.scenario[1].random_walk.seed == 3
    bad = ("algorithms: [greedy]\nscenario:\n"
           "  - {at_token: 1, link: [h2, s1], bandwidth_mbps: 3}\n"
           "  - {ramp: {link: [h2, s1], from_token: 0, to_token: 8, from_mbps: 10, to_mbps: 2, speed: 4}}\n")
    found = problems_of(load_experiment, experiment(tmp_path, bad))
    assert any("exp.yaml:7: scenario[1].ramp.speed: unknown key" in p for p in found), found


def test_device_profile_fills_limits(tmp_path):
    text = GOOD_TOPO.replace("{name: h2, mem_limit_mib: 512, cpu_cores: 0.25}", "{name: h2, profile: rpi4}")
    topo = load_topology(write(tmp_path, "t.yaml", text))
    assert (topo.host("h2").mem_limit_mib, topo.host("h2").cpu_cores) == (1536, 0.5)
    bad = write(tmp_path, "b.yaml", GOOD_TOPO.replace("{name: h2, mem_limit_mib: 512, cpu_cores: 0.25}",
                                                      "{name: h2, profile: cray}"))
    (p,) = problems_of(load_topology, bad)
    assert p.startswith(f"{bad}:4: hosts[1]: unknown profile 'cray'"), p


def test_generated_topology(tmp_path):
    path = write(tmp_path, "g.yaml", "name: g\ntopology: {generate: two_tier, n_hosts: 20, hosts_per_edge: 8, seed: 2}\n"
                                     "model: {name: tiny-gpt2}\nalgorithms: [greedy]\n"
                                     "scenario:\n  - {at_token: 3, link: [h20, e3], bandwidth_mbps: 1}\n")
    spec = load_experiment(path)
    assert len(spec.topology.hosts) == 20 and spec.topology.source == "h1"
    assert spec.topology_generated.n_hosts == 20
    assert load_experiment(path).topology == spec.topology  # seeded: identical on reload
    bad = write(tmp_path, "b.yaml", "name: g\ntopology:\n  generate: star\n  n_hosts: 1\n"
                                    "model: {name: tiny-gpt2}\nalgorithms: [greedy]\n")
    found = problems_of(load_experiment, bad)
    assert any(p.startswith(f"{bad}:4: topology.n_hosts: Input should be greater than or equal to 2") for p in found), found


def test_unknown_model_name(tmp_path):
    path = experiment(tmp_path, "algorithms: [greedy]\n").read_text().replace("tiny-gpt2", "gpt5")
    p = write(tmp_path, "m.yaml", path)
    (found,) = problems_of(load_experiment, p)
    assert found.startswith(f"{p}:3: model.name: unknown model 'gpt5'")
