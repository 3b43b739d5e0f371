"""``headroom run``: expand sweeps, build the backend, replay every algorithm, write run directories.

Every (algorithm, repetition) starts from a freshly reset cluster; the algorithms of one
repetition replay the identical prompt and timeline, and repetitions differ in the prompt and the
random walks' seeds (``repetition_variation``, recorded in the manifest). The run directory is
written as tokens are produced; ``--resume`` skips the (algorithm, repetition) pairs already marked
done and re-runs the one that was interrupted.
"""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from testbed.core.errors import BackendError, ConfigError
from testbed.run.controller import AlgorithmLoop, LoopSettings
from testbed.spec.modelref import ModelRef, ModelRefError, resolve_model
from testbed.core.placement import Placement
from testbed.run.events import EventTail
from testbed.run.recorder import RunRecorder, summarize
from testbed.spec.scenario import REPETITION_SEED_STRIDE, ScenarioError, Timeline, expand
from testbed.spec.schema import ExperimentSpec, RandomWalkItem, TopologySpec
from testbed.core.errors import HeadroomError

console = Console(stderr=True)


class RunError(HeadroomError):
    """The run itself could not proceed (not an algorithm's failure)."""

    code = "run"


def sweep_points(spec: ExperimentSpec, exp_path: Path) -> list[tuple[dict, ExperimentSpec]]:
    """Cartesian product of ``sweep`` (``testbed.spec.sweep``) -> validated specs, one per point."""
    from testbed.spec.sweep import points_data

    points = []
    try:
        for point, data in points_data(spec, Path(exp_path)):
            try:
                points.append((point, ExperimentSpec.model_validate(data)))
            except ValidationError as exc:  # report the point that is wrong
                raise RunError(f"sweep point {point}: {exc}") from None
    except ConfigError as exc:
        raise RunError(str(exc)) from None
    return points


def make_cluster(spec: ExperimentSpec, model: ModelRef, run_dir: Path, backend: str, recorder: RunRecorder):
    topo = spec.topology
    assert isinstance(topo, TopologySpec)
    if backend == "simulated":
        from testbed.backends.simulated.build import build_simulated_cluster

        return build_simulated_cluster(topo, model, recorder, host_overhead_mib=spec.simulation.host_overhead_mib,
                                       message_overhead_s=spec.simulation.message_overhead_ms / 1e3,
                                       weights_from=spec.migration.weights_from)
    import os

    try:
        model.require_weights()
    except ModelRefError as exc:
        raise RunError(str(exc)) from None
    if model.weight_format != "fp32":
        raise RunError(f"weight_format {model.weight_format} runs with backend: simulated only: emulated agents "
                       "hold fp32 weights, so their cgroups would be charged about "
                       f"{4 / model.dims.weight_bytes:.1f}x what the planners size in {model.weight_format}")
    if backend == "ssh":
        return _ssh_cluster(spec, topo, model, run_dir, recorder)
    if os.geteuid() != 0:
        raise RunError("the emulated backend needs root (Mininet, tc, cgroups); use --backend simulated")
    from testbed.backends.emulated.cluster import build_emulated_cluster

    try:
        return build_emulated_cluster(topo, model, run_dir, recorder, weights_from=spec.migration.weights_from,
                                      cpu_emulation=spec.emulation.cpu)
    except Exception as exc:  # a backend that cannot come up is the run's failure, reported without traceback
        raise RunError(f"could not bring up the emulated testbed: {type(exc).__name__}: {exc}") from exc


def _ssh_cluster(spec: ExperimentSpec, topo: TopologySpec, model: ModelRef, run_dir: Path, recorder: RunRecorder):
    """``backend: ssh``: the inventory's devices (``testbed.backends.ssh``); a device that cannot be
    used is the run's failure, one line per device, before anything was started on any of them."""
    from testbed.backends.ssh.cluster import build_ssh_cluster
    from testbed.backends.ssh.transport import DeviceRefused
    from testbed.spec.inventory import load_inventory

    if spec.ssh is None:
        raise RunError("backend ssh needs ssh: {inventory: FILE} in the experiment")
    inventory = load_inventory(spec.ssh.inventory)
    try:
        return build_ssh_cluster(topo, inventory, model, run_dir, recorder, weights_from=spec.migration.weights_from)
    except DeviceRefused as exc:  # bad input: one line per device, nothing was created on any
        raise ConfigError(str(exc).splitlines()) from None
    except Exception as exc:  # reported without traceback, like the emulated backend's bring-up
        raise RunError(f"could not bring up the ssh testbed: {exc}") from exc


def prompt_for(spec: ExperimentSpec, model: ModelRef, repetition: int) -> list[int]:
    """The prompt of ``repetition``: ``prompt_tokens`` ids drawn with seed ``workload.seed + repetition``."""
    rng = np.random.default_rng(spec.workload.seed + repetition)
    return [int(t) for t in rng.integers(0, model.config.vocab_size, spec.workload.prompt_tokens)]


@dataclass(frozen=True)
class PointJob:
    """One sweep point, self-contained: what a worker process or a Ray task needs to run it without
    the experiment's directory (the driver resolves the model config and the scenario's timelines,
    which read files next to the experiment: checkpoints' config.json, trace CSVs)."""

    index: int
    sweep_point: dict
    spec: ExperimentSpec
    model: ModelRef
    timelines: tuple
    run_dir: Path
    backend: str
    resume: bool


def point_job(index: int, sweep_point: dict, spec: ExperimentSpec, exp_path: Path, run_dir: Path, backend: str,
              resume: bool) -> PointJob:
    try:
        model = resolve_model(spec.model, exp_path.parent)
        timelines = tuple(expand(spec, exp_path.parent, rep) for rep in range(spec.repetitions))
    except (ModelRefError, ScenarioError) as exc:
        raise RunError(str(exc)) from None
    return PointJob(index, sweep_point, spec, model, timelines, Path(run_dir), backend, resume)


def _run_point(job: PointJob, *, bars: bool = True, write_to: Path | None = None) -> Path:
    """Run one sweep point into ``job.run_dir`` (or ``write_to``, a stand-in directory whose files
    the caller moves to ``job.run_dir``: the manifest names ``job.run_dir`` either way). ``bars``:
    rich per-token progress bars (off in worker processes, where the driver prints one line a point)."""
    spec, model, timelines, backend = job.spec, job.model, job.timelines, job.backend
    run_dir = Path(write_to or job.run_dir)
    rec = RunRecorder(run_dir, resume=job.resume)
    done = rec.completed() if job.resume else set()
    resolved = spec.model_dump(mode="json")
    resolved.update(backend=backend, sweep_point=job.sweep_point, model_resolved=model.to_json())
    rec.write_config(resolved)
    rec.write_manifest({"experiment": spec.name, "backend": backend, "run_dir": str(job.run_dir),
                        "scenario_timeline": [c.describe() for c in timelines[0]],
                        "scenario_timeline_by_repetition": {str(r): [c.describe() for c in t]
                                                            for r, t in enumerate(timelines) if r},
                        "repetition_variation": repetition_variation(spec),
                        "weight_format_simulated": model.weight_format, "agents_compute": "fp32"})
    rec.event("run_started" if not done else "run_resumed", experiment=spec.name, backend=backend,
              skipping=[list(d) for d in sorted(done)])
    algos = spec.algorithm_specs()
    tail, varied = EventTail(run_dir), json.loads(json.dumps(repetition_variation(spec), default=str))
    fold = lambda: summarize(run_dir, [a.name for a in algos], spec.topology.source, tail, varied)  # noqa: E731
    cluster = None
    try:
        cluster = make_cluster(spec, model, run_dir, backend, rec)
        with _progress(disable=not bars) as progress:
            for rep in range(spec.repetitions):
                for algo in algos:
                    if (algo.name, rep) in done:
                        continue
                    _run_one(cluster, rec, spec, model, algo, rep, timelines[rep], progress)
                    rec.write_summary(fold())
        rec.event("run_done")
    except KeyboardInterrupt:
        rec.event("run_interrupted")
        raise
    finally:
        if cluster is not None:
            cluster.close()
        rec.write_summary(fold())
        rec.close()
    return job.run_dir


def repetition_variation(spec: ExperimentSpec) -> dict:
    """What differs between repetitions (recorded in the manifest and in every summary entry)."""
    walks = [item.random_walk for item in spec.scenario if isinstance(item, RandomWalkItem)]
    out = {"repetitions": spec.repetitions,
           "prompt": f"token ids drawn with numpy default_rng(workload.seed + r) = {spec.workload.seed} + r",
           "fixed": "model weights, topology, scenario events, ramps and traces; every algorithm of a "
                    "repetition replays that repetition's identical prompt and timeline"}
    if walks:
        out["random_walk_seed"] = (f"seed + {REPETITION_SEED_STRIDE}·r for repetition r "
                                   f"(configured seeds {[w.seed for w in walks]} at r = 0)")
    else:
        out["random_walk_seed"] = None
        out["random_walk_seed_reason"] = "the scenario has no random walk"
    return out


def _run_one(cluster, rec, spec, model, algo, rep, changes, progress) -> None:
    task = progress.add_task(f"{algo.name} rep {rep}", total=spec.workload.new_tokens)
    cluster.reset()
    rec.event("algorithm_started", algorithm=algo.name, repetition=rep)
    settings = LoopSettings(
        algorithm=algo.name, repetition=rep, params=dict(algo.params), prompt_ids=prompt_for(spec, model, rep),
        new_tokens=spec.workload.new_tokens, repartition_every=spec.repartition_every_tokens,
        cost_model=spec.cost_model, allow_blocks_on_source=spec.allow_blocks_on_source,
        fixed_placement=Placement.from_json(spec.placement) if spec.placement else None,
        threshold_drop_pct=spec.replan_threshold_pct,
    )
    loop = AlgorithmLoop(cluster, rec, model.dims, settings, Timeline(changes),
                         on_token=lambda i: progress.update(task, completed=i + 1))
    ok = loop.run()
    rec.merge_manifest("scenario_applied", {f"{algo.name}/{rep}": loop.applied})
    rec.event("repetition_done", algorithm=algo.name, repetition=rep, failed=not ok,
              peak_mem_bytes=cluster.peak_mem_bytes(), tokens=loop.state.tokens)


def _progress(disable: bool = False) -> Progress:
    """Per-token bars; ``disable`` in worker processes, where bars of parallel points would interleave."""
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("tokens"), TimeElapsedColumn(), console=console, transient=False, disable=disable)


def run_experiment(spec: ExperimentSpec, exp_path: Path, out: Path, *, backend: str | None = None,
                   resume: Path | None = None, jobs: int = 1, ray_address: str | None = None) -> list[Path]:
    """Run every sweep point; return the run directories (one per point).

    ``jobs`` > 1 runs the points in that many local worker processes, ``ray_address`` as Ray tasks on
    a cluster (``testbed.run.fanout``; simulated backend only). Results are identical to a serial run."""
    from testbed.run import fanout

    backend = backend or spec.backend
    fanout.check_options(backend, jobs, ray_address)
    if ray_address is not None:
        fanout.require_ray()
    points = sweep_points(spec, Path(exp_path))
    if resume is not None:
        top = Path(resume)
        if not (top / "events.jsonl").exists() and not any(top.glob("point-*/events.jsonl")):
            raise RunError(f"--resume {top}: not a run directory")
    else:
        top = Path(out) / spec.name / time.strftime("%Y%m%d-%H%M%S")
    dirs = [top] if len(points) == 1 else [top / f"point-{k}" for k in range(len(points))]
    todo = [point_job(k, point, point_spec, Path(exp_path), run_dir, backend, resume is not None)
            for k, ((point, point_spec), run_dir) in enumerate(zip(points, dirs))]
    old = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if ray_address is not None:
            fanout.run_ray(todo, ray_address, top)
        elif jobs > 1 and len(todo) > 1:
            fanout.run_pool(todo, jobs)
        else:
            for job in todo:
                _run_point(job)
    except BackendError as exc:
        raise RunError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, old)
    return dirs


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt
