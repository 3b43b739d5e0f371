"""The ``headroom`` command (also ``python -m testbed``): thin wrappers over the library.

Exit codes: 0 success, 2 bad input (configuration problems, printed as FILE:LINE: field: message),
1 a run that could not proceed. Heavy modules are imported inside the commands so that
``headroom validate`` stays fast.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from testbed.core.errors import ConfigError
from testbed.spec.loader import load_any, load_experiment

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Headroom: emulated edge testbed for partitioned LLM inference.")
net_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Emulated network tools.")
app.add_typer(net_app, name="net")
err = Console(stderr=True)


def _bad_input(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def validate(files: List[Path] = typer.Argument(..., help="Topology or experiment YAML files.")) -> None:
    """Check files; print FILE:LINE: field: message for every problem (exit 2), else exit 0."""
    problems = []
    for f in files:
        try:
            load_any(f)
        except ConfigError as exc:
            problems.extend(exc.problems)
        except (Exception, RecursionError) as exc:  # a check's own bug: still a located report, exit 2
            problems.append(f"{f}:1: <file>: could not be validated ({type(exc).__name__}: {exc}); "
                            "this is a bug in headroom's checks, please report it")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        raise typer.Exit(2)
    print(f"ok: {len(files)} file(s) valid")


def _jobs(backend: str, jobs: Optional[int], ray_address: Optional[str]) -> int:
    """``--jobs`` checked against ``--ray`` and the backend (bad input: exit 2), its default filled in."""
    from testbed.run import fanout

    try:
        if jobs is not None and ray_address is not None:
            raise fanout.FanoutOptionError(f"--jobs {jobs} with --ray {ray_address}: give one of them (Ray "
                                           "schedules the points on the cluster's CPUs)")
        if jobs is None:
            jobs = 1 if ray_address is not None else fanout.default_jobs(backend)
        fanout.check_options(backend, jobs, ray_address)
    except ConfigError as exc:
        _bad_input(exc)
    return jobs


@app.command()
def run(
    experiment: Path,
    out: Path = typer.Option(Path("results"), "-o", "--out", help="Results root."),
    backend: Optional[str] = typer.Option(None, "--backend", help="emulated | simulated | ssh (overrides the YAML)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Run directory to continue."),
    print_run_dir: bool = typer.Option(False, "--print-run-dir", help="Print the run directory as the last line."),
    jobs: Optional[int] = typer.Option(None, "-j", "--jobs", help="Sweep points at once, in local worker processes "
                                       "(simulated backend; default: the CPUs; 1: one after another)."),
    ray_address: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                              help="Run each sweep point as a Ray task on the cluster at ADDRESS "
                                              "(auto, ray://HOST:10001, or local to start one here; simulated "
                                              "backend; needs the ray extra)."),
) -> None:
    """Run every algorithm of an experiment through the identical scenario; write a run directory
    (one per sweep point)."""
    try:
        spec = load_experiment(experiment)
    except ConfigError as exc:
        _bad_input(exc)
    if backend is not None and backend not in ("emulated", "simulated", "ssh"):
        print(f"--backend: expected emulated, simulated or ssh, got {backend!r}", file=sys.stderr)
        raise typer.Exit(2)
    if (backend or spec.backend) == "ssh" and spec.ssh is None:
        print(f"{experiment}: backend ssh needs ssh: {{inventory: FILE}} in the experiment", file=sys.stderr)
        raise typer.Exit(2)
    from testbed.run.runner import RunError, run_experiment

    jobs = _jobs(backend or spec.backend, jobs, ray_address)
    try:
        run_dirs = run_experiment(spec, experiment, out, backend=backend, resume=resume, jobs=jobs,
                                  ray_address=ray_address)
    except ConfigError as exc:  # found at bring-up (an ssh device unfit for its assignment): bad input
        _bad_input(exc)
    except RunError as exc:
        err.print(f"[red]run failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1)
    for d in run_dirs:
        err.print(f"run directory: {d}")
    if print_run_dir:
        print(run_dirs[-1])


@app.command()
def plan(
    experiment: Path,
    algorithm: str = typer.Option(..., "--algorithm", "-a"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Place the model for the experiment's initial snapshot, without any network."""
    try:
        spec = load_experiment(experiment)
    except ConfigError as exc:
        _bad_input(exc)
    from testbed.run.planning import PlanningError, plan_initial

    try:
        result = plan_initial(spec, algorithm)
    except PlanningError as exc:
        print(f"{experiment}: algorithm {algorithm}: {exc}", file=sys.stderr)
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if k not in ("placement", "regime"):
                print(f"{k}: {v}")
        if "regime" in result:
            r = result["regime"]
            print(f"regime: {r['verdict']} (one layer {r['layer_ms']:.3g} ms on {r['fastest_device']}, "
                  f"one hop {r['hop_ms']:.3g} ms to {r['peer']})")


@net_app.command("check")
def net_check(topology: Path, as_json: bool = typer.Option(False, "--json"),
              compute_model: str = typer.Option("mini-gpt2", "--compute-model",
                                                help="Model the paced agents calibrate on (registry name)."),
              no_compute: bool = typer.Option(False, "--no-compute", help="Links and limits only: no agents.")) -> None:
    """Bring a topology up, measure every link, host limit and (with agents paced as experiments run
    them) the compute fidelity against the spec, tear down."""
    try:
        load_any(topology)
    except ConfigError as exc:
        _bad_input(exc)
    from testbed.emulation.netcheck import net_check as check

    if no_compute:
        ok, report = check(topology, as_json)
    else:
        from functools import partial

        from testbed.backends.emulated.computecheck import compute_fidelity

        ok, report = check(topology, as_json, cpu_emulation="pace",
                           compute=partial(compute_fidelity, model=compute_model))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    raise typer.Exit(0 if ok else 1)


@app.command()
def analyze(run_dirs: List[Path], out: Optional[Path] = typer.Option(None, "-o", "--out")) -> None:
    """Draw figures (PNG + PDF) and report.html from run directories."""
    missing = [d for d in run_dirs if not (d / "events.jsonl").exists() and not any(d.glob("point-*/events.jsonl"))]
    if missing:
        print(f"{missing[0]}: not a run directory (no events.jsonl)", file=sys.stderr)
        raise typer.Exit(2)
    from analysis.regime_map import analyze_map, is_regime_map, render

    if len(run_dirs) == 1 and is_regime_map(run_dirs[0]):  # 1200 points: the map's figures, not one set per run
        result = analyze_map(run_dirs[0], out)
        print(render(result["summary"]))
        print(f"report: {result['report']}")
        return
    from analysis.report import analyze as do_analyze

    result = do_analyze(list(run_dirs), out)
    print(f"report: {result['report']}")


@app.command()
def clean(run_dir: Optional[Path] = typer.Argument(None), all_runs: bool = typer.Option(False, "--all"),
          results: Path = typer.Option(Path("results"), "--results")) -> None:
    """Remove exactly what run manifests recorded (namespaces, links, qdiscs, cgroups, processes; on
    SSH devices: agents, cgroups, qdiscs and files, over SSH as recorded)."""
    from testbed.emulation.cleanup import REMOTE_KINDS, cleanup_from_manifest, read_manifest

    if run_dir is None and not all_runs:
        print("give a RUN_DIR or --all", file=sys.stderr)
        raise typer.Exit(2)
    if run_dir is not None and not run_dir.is_dir():
        print(f"{run_dir}: no such run directory", file=sys.stderr)
        raise typer.Exit(2)
    manifests = sorted(results.glob("**/resources.jsonl")) if all_runs else [run_dir / "resources.jsonl"]
    for m in manifests:
        if not m.exists():
            print(f"{m}: no resource manifest", file=sys.stderr)
            continue
        for line in cleanup_from_manifest(m):
            print(line)
        entries = list(read_manifest(m))
        if any(e.get("kind") in REMOTE_KINDS for e in entries):
            from testbed.backends.ssh.clean import cleanup_remote

            for line in cleanup_remote(entries):
                print(line)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
