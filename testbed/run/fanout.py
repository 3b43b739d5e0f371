"""Sweep points off the one process: a local process pool, or Ray tasks on a cluster.

Every sweep point is independent (its own cluster, recorder and run directory ``TOP/point-K``) and
the simulated backend is deterministic, so running points at once changes the wall clock only. The
emulated backend stays serial: one Mininet at a time on a machine (``check_options``).

- ``run_pool``: ``concurrent.futures.ProcessPoolExecutor`` with the spawn start method (torch is
  imported by then, and a forked child of a threaded parent can deadlock), one task a point; the
  workers write their run directories themselves.
- ``run_ray``: one ``@ray.remote`` task a point (``num_cpus=1``; ``max_retries=0``: a retried point
  would append to the run directory its first attempt half wrote). A task writes straight into the
  driver's run directory when it can see it — it reads back a token the driver left in ``TOP``: a
  local instance, or a cluster on a shared filesystem. Otherwise it runs into a temporary directory
  on its node and returns the files (``events.jsonl``, ``tokens.csv``, ``summary.json``, ...), and
  the driver writes them (then the point is on disk only once it has finished). The project's
  packages travel with the job (``runtime_env`` ``py_modules``) so the cluster runs the driver's
  code; its nodes need the third-party dependencies (``pip install 'headroom[ray]'``).

Either way the driver prints one line per finished point (per-token bars of parallel points would
interleave), lets the other points finish when one fails, and then raises ``RunError`` naming the
failed points.
"""
from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from testbed.core.errors import ConfigError, HeadroomError
from testbed.run.runner import PointJob, RunError, _run_point, console

PROBE_NAME = ".headroom-driver-token"
# None: each Ray task checks whether it sees the driver's run directory. False: always return the
# files to the driver (how a cluster without a shared filesystem runs; tests use it on one machine).
SHARED_FS: bool | None = None


class FanoutOptionError(ConfigError):
    """``--jobs`` / ``--ray`` asked for what the backend cannot do (exit 2 on the command line)."""


class RayUnavailable(RunError):
    """``--ray`` was given but Ray is not installed (it is the ``ray`` extra)."""


def default_jobs(backend: str) -> int:
    """Worker processes when ``--jobs`` is not given: the usable CPUs for simulated runs, else 1."""
    if backend != "simulated":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_options(backend: str, jobs: int, ray_address: str | None) -> None:
    if jobs < 1:
        raise FanoutOptionError(f"--jobs {jobs}: expected a positive number of worker processes")
    if ray_address is not None and jobs > 1:
        raise FanoutOptionError(f"--jobs {jobs} with --ray {ray_address}: give one of them (Ray schedules the "
                                "points on the cluster's CPUs)")
    if backend in ("emulated", "ssh") and (jobs > 1 or ray_address is not None):
        what = f"--ray {ray_address}" if ray_address is not None else f"--jobs {jobs}"
        where = "one Mininet on this machine" if backend == "emulated" else "one device fleet"
        raise FanoutOptionError(f"{what}: backend {backend} runs its sweep points one at a time ({where}); "
                                "drop the option, or use --backend simulated")


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs Ray, the optional extra 'ray': pip install 'headroom[ray]' "
                             "(scripts/setup.sh installs it)") from None
    return ray


# -- local process pool ----------------------------------------------------------------------------
def run_pool(todo: list[PointJob], workers: int) -> None:
    n = min(workers, len(todo))
    console.print(f"{len(todo)} sweep points in {n} worker processes")
    before = {p.pid for p in multiprocessing.active_children()}
    failures: dict[int, BaseException] = {}
    finished = 0
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {pool.submit(_timed_point, job): job for job in todo}
        try:
            for fut in as_completed(futures):
                job, exc = futures[fut], fut.exception()
                if isinstance(exc, KeyboardInterrupt):
                    raise KeyboardInterrupt
                finished += 1
                if exc is not None:
                    failures[job.index] = exc
                _report(job, finished, len(todo), None if exc else fut.result(), exc)
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            for proc in multiprocessing.active_children():  # this pool's workers: we started them
                if proc.pid not in before:
                    proc.terminate()  # SIGTERM: the worker records run_interrupted and closes its files
            raise
    _raise_failures(todo, failures)


_busy = False  # in a pool worker: running a point (SIGTERM interrupts it) or idle (SIGTERM ends it)


def _worker_init() -> None:
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    if _busy:
        raise KeyboardInterrupt
    raise SystemExit(0)  # an idle worker has nothing to record


def _timed_point(job: PointJob) -> float:
    global _busy
    t0 = time.monotonic()
    _busy = True
    try:
        _run_point(job, bars=False)
    finally:
        _busy = False
    return time.monotonic() - t0


# -- Ray -------------------------------------------------------------------------------------------
def ray_runtime_env() -> dict:
    """The job's runtime environment: the driver's ``testbed`` and ``node_agent`` packages."""
    import node_agent
    import testbed

    return {"py_modules": [testbed, node_agent], "excludes": ["__pycache__"]}


def _ray_init(ray, address: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {"address": address, "runtime_env": ray_runtime_env()}
    if address == "local":  # a fresh instance on this machine, bound to loopback
        kwargs.update(_node_ip_address="127.0.0.1", include_dashboard=False)
    ray.init(**kwargs)


def run_ray(todo: list[PointJob], address: str, top: Path) -> None:
    """Run every point as a Ray task. Connects to ``address`` (``ray.init``) unless Ray is already
    initialised in this process, and disconnects (a ``local`` instance: stops it) afterwards."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        _ray_init(ray, address)
        # ray.init puts its own SIGTERM handler in place (it exits on the spot); keep the run's, which
        # interrupts: the pending tasks are cancelled and a local instance is shut down below
        signal.signal(signal.SIGTERM, _interrupt_run)
    top = Path(top)
    top.mkdir(parents=True, exist_ok=True)
    probe = (top / PROBE_NAME).resolve()
    token = secrets.token_hex(16)
    probe.write_text(token)
    task = ray.remote(num_cpus=1, max_retries=0)(_ray_point)
    failures: dict[int, BaseException] = {}
    pending: list = []
    try:
        console.print(f"{len(todo)} sweep points as Ray tasks ({ray.cluster_resources().get('CPU', 0):g} CPUs "
                      "in the cluster)")
        refs = {}
        for job in todo:
            seed = _read_files(job.run_dir) if job.resume and job.run_dir.is_dir() else {}
            refs[task.remote(job, str(job.run_dir.resolve()), str(probe), token, SHARED_FS, seed)] = job
        pending = list(refs)
        finished = 0
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            job, exc, seconds = refs[ref], None, None
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                exc = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            except ray.exceptions.RayError as err:  # worker or node lost, ...
                exc = RunError(f"Ray: {type(err).__name__}: {err}")
            else:
                seconds = result["seconds"]
                if result["files"] is not None:
                    _write_files(job.run_dir, result["files"])
            if isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt
            finished += 1
            if exc is not None:
                failures[job.index] = exc
            _report(job, finished, len(todo), seconds, exc, where=None if exc else result["where"])
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # a running task gets KeyboardInterrupt: it records run_interrupted
        ray.wait(pending, num_returns=len(pending), timeout=10)  # ... before shutdown ends its worker
        raise
    finally:
        probe.unlink(missing_ok=True)
        if started:
            ray.shutdown()
    _raise_failures(todo, failures)


def _interrupt_run(signum, frame):
    raise KeyboardInterrupt


def _ray_point(job: PointJob, target: str, probe: str, token: str, shared: bool | None, seed: dict) -> dict:
    """The Ray task: run one point where the driver can read it, or return its files."""
    import socket

    t0 = time.monotonic()
    if shared is None:
        try:
            shared = Path(probe).read_text() == token
        except OSError:
            shared = False
    if shared:
        _run_point(job, bars=False, write_to=Path(target))
        return {"files": None, "seconds": time.monotonic() - t0, "where": f"{socket.gethostname()}, shared fs"}
    with tempfile.TemporaryDirectory(prefix="headroom-point-") as tmp:
        local = Path(tmp) / job.run_dir.name
        _write_files(local, seed)
        _run_point(job, bars=False, write_to=local)
        files = _read_files(local)
    return {"files": files, "seconds": time.monotonic() - t0, "where": f"{socket.gethostname()}, files returned"}


def _read_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def _write_files(run_dir: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = Path(run_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)


# -- both ------------------------------------------------------------------------------------------
def _report(job: PointJob, finished: int, total: int, seconds: float | None, exc: BaseException | None,
            where: str | None = None) -> None:
    head = f"[{finished}/{total}] point {job.index} {job.sweep_point}"
    if exc is not None:
        console.print(f"{head}: [red]failed[/red]: {type(exc).__name__}: {exc}", soft_wrap=True)
    else:
        where = f" ({where})" if where else ""
        console.print(f"{head}: done in {seconds:.1f} s{where} -> {job.run_dir}", soft_wrap=True)


def _raise_failures(todo: list[PointJob], failures: dict[int, BaseException]) -> None:
    if not failures:
        return
    for k in sorted(failures):
        if not isinstance(failures[k], HeadroomError):
            raise failures[k]  # a bug, with the worker's traceback chained
    raise RunError("; ".join(f"sweep point {k} {todo[k].sweep_point}: {failures[k]}" for k in sorted(failures)))
