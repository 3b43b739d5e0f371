"""Sweep points fanned out (testbed.run.fanout): a 4-point simulated sweep run serially, in a
2-process pool and as Ray tasks on a local instance (written in place, and with the files returned
to the driver as on a cluster without a shared filesystem) gives identical run directories except
for wall-clock fields; the emulated backend refuses to fan out."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.run import fanout
from testbed.run.runner import RunError, run_experiment
from testbed.core.errors import ConfigError
from testbed.spec.loader import load_experiment

from sim_topology import TOPO  # noqa: E402  (tests/unit is on sys.path under pytest)

EXP = """\
name: fan
topology: topo.yaml
model: {name: tiny-gpt2}
workload: {prompt_tokens: 8, new_tokens: 16, seed: 1}
algorithms: [resource_aware, edgeshard_dynamic, galaxy]
repartition_every_tokens: 4
scenario:
  - {random_walk: {all_links: true, min_mbps: 2, max_mbps: 40, every_tokens: 4, step_pct: 60, seed: 5}}
  - {at_token: 8, host: h3, mem_limit_mib: 6}
repetitions: 1
backend: simulated
sweep: {simulation.message_overhead_ms: [0.0, 0.5], workload.new_tokens: [12, 16]}
"""
WALL_CLOCK = {"t_s", "wall", "solve_time_s", "started_at"}


@pytest.fixture
def exp_path(tmp_path: Path) -> Path:
    (tmp_path / "topo.yaml").write_text(TOPO)
    (tmp_path / "exp.yaml").write_text(EXP)
    return tmp_path / "exp.yaml"


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in WALL_CLOCK}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _record(run_dir: Path) -> dict:
    events = [_strip(json.loads(line)) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    with open(run_dir / "tokens.csv") as f:
        tokens = list(csv.DictReader(f))
    manifest = _strip(json.loads((run_dir / "manifest.json").read_text()))
    manifest.pop("run_dir")
    return {"tokens": tokens, "events": events, "summary": json.loads((run_dir / "summary.json").read_text()),
            "placements": [e["placement"] for e in events if e["type"] == "plan"], "manifest": manifest,
            "config": (run_dir / "config.resolved.yaml").read_text()}


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            todo += [k for k in kids if k not in out]
            out.update(kids)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_serial_pool_and_ray_runs_are_identical(exp_path, tmp_path, capsys, monkeypatch):
    spec = load_experiment(exp_path)
    serial = run_experiment(spec, exp_path, tmp_path / "serial")
    assert len(serial) == 4 and [d.name for d in serial] == [f"point-{k}" for k in range(4)]
    pool = run_experiment(spec, exp_path, tmp_path / "pool", jobs=2)
    assert not multiprocessing.active_children(), "the pool's workers exit with the run"
    runs = {"pool": pool}
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None:  # scripts/setup.sh installs the ray extra; without it only the pool is compared
        monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        before = _descendants(os.getpid())  # (the pool's multiprocessing resource tracker lives on)
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=fanout.ray_runtime_env())
        started = {p: _cmdline(p) for p in _descendants(os.getpid()) - before}
        try:
            capsys.readouterr()
            runs["ray"] = run_experiment(spec, exp_path, tmp_path / "ray", ray_address="auto")
            assert capsys.readouterr().err.count("shared fs") == 4
            monkeypatch.setattr(fanout, "SHARED_FS", False)  # as on a cluster that does not see our disk
            runs["ray_files"] = run_experiment(spec, exp_path, tmp_path / "ray_files", ray_address="auto")
            assert capsys.readouterr().err.count("files returned") == 4
        finally:
            ray.shutdown()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [started[p] for p in started if _alive(p)]
        assert not left, f"ray.shutdown() left {left}"
    for name, dirs in runs.items():
        assert [d.name for d in dirs] == [d.name for d in serial] and dirs[0].parent.parent == tmp_path / name / "fan"
        assert not list((tmp_path / name).rglob(fanout.PROBE_NAME)), "the driver removes its token"
        for k, (a, b) in enumerate(zip(serial, dirs)):
            ra, rb = _record(a), _record(b)
            assert ra["tokens"] and ra["placements"]
            for key in ra:
                assert ra[key] == rb[key], (name, k, key)
    # the points differ from each other (the sweep is not degenerate)
    assert len({json.dumps(_record(d)["summary"], sort_keys=True) for d in serial}) == 4


def test_a_point_that_fails_in_a_worker_lets_the_others_finish(exp_path, tmp_path):
    from testbed.run.runner import point_job, sweep_points

    points = sweep_points(load_experiment(exp_path), exp_path)[:3]
    dirs = [tmp_path / f"point-{k}" for k in range(3)]
    dirs[1].write_text("a file where the run directory goes")
    todo = [point_job(k, p, s, exp_path, d, "simulated", False) for k, ((p, s), d) in enumerate(zip(points, dirs))]
    with pytest.raises(FileExistsError):  # not a project error: raised as it is, the worker's traceback chained
        fanout.run_pool(todo, 2)
    assert (dirs[0] / "summary.json").exists() and (dirs[2] / "summary.json").exists()


def test_a_bad_sweep_point_fails_before_any_worker_starts(exp_path, tmp_path):
    exp_path.write_text(EXP.replace("sweep: {", "sweep: {model.name: [tiny-gpt2, no-such-model], "))
    # every sweep point is validated when the experiment loads (issue 15 item 2): nothing starts
    with pytest.raises(ConfigError, match=r"sweep.model.name: point .*unknown model 'no-such-model'"):
        run_experiment(load_experiment(exp_path), exp_path, tmp_path / "out", jobs=2)
    assert not (tmp_path / "out").exists()


def _cli(*args: str):
    return CliRunner().invoke(app, ["run", *args])


@pytest.mark.parametrize("args, message", [
    (["--backend", "emulated", "--jobs", "2"], "--jobs 2: backend emulated runs its sweep points one at a time"),
    (["--backend", "emulated", "--ray", "local"], "--ray local: backend emulated runs its sweep points one at a"),
    (["--jobs", "0"], "--jobs 0: expected a positive number"),
    (["--jobs", "2", "--ray", "auto"], "--jobs 2 with --ray auto: give one of them"),
])
def test_bad_fanout_options_exit_2_with_the_reason(exp_path, tmp_path, args, message):
    res = _cli(str(exp_path), "-o", str(tmp_path / "o"), *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists(), "nothing ran"


def test_the_yaml_backend_decides_too(exp_path, tmp_path):
    exp_path.write_text(EXP.replace("backend: simulated", "backend: emulated"))
    res = _cli(str(exp_path), "-o", str(tmp_path / "o"), "--jobs", "2")
    assert res.exit_code == 2 and "backend emulated" in res.output
    assert fanout.default_jobs("emulated") == 1 and fanout.default_jobs("simulated") >= 1


def test_ray_missing_names_the_extra(exp_path, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = _cli(str(exp_path), "-o", str(tmp_path / "o"), "--ray", "local")
    assert res.exit_code == 1 and "headroom[ray]" in res.output, res.output
    assert not (tmp_path / "o").exists()
