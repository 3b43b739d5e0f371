"""Measure compute speed instead of assuming it: FLOP/s of one core on the decode-shaped work.

The simulated backend scales this per-core figure by each host's ``cpu_cores``; the value and how
it was measured go into the run manifest. The emulated backend measures inside each agent instead.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

CACHE = Path(os.environ.get("HEADROOM_CACHE", Path.home() / ".cache" / "headroom")) / "per_core_flops.json"


def measure_per_core_flops(d: int = 256, repeats: int = 200) -> float:
    """FLOP/s of one thread on matrix-vector products the size of a small decode step."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = torch.randn(d, d)
        x = torch.randn(1, d)
        for _ in range(20):
            x = torch.tanh(x @ w)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                x = torch.tanh(x @ w)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * d * d * repeats / best
    finally:
        torch.set_num_threads(threads)


def machine_id() -> dict:
    """What a cached measurement is valid for: host name, CPU model, core count, architecture,
    kernel and the torch that measured (read from its metadata: no torch import). A change of any
    of them (another VM, a resized one, a new torch) invalidates the cache."""
    import importlib.metadata as md
    import platform

    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        cpu = platform.processor()
    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        torch_version = "absent"
    return {"host": os.uname().nodename, "cpu": cpu, "cpus": os.cpu_count(), "arch": platform.machine(),
            "kernel": platform.release(), "torch": torch_version}


def per_core_flops(use_cache: bool = True) -> tuple[float, str]:
    """(FLOP/s, provenance). Cached per machine (``machine_id``) so that repeated runs use the
    same figure; measured again (torch imported) only when the machine changed."""
    here = machine_id()
    if use_cache and CACHE.exists():
        try:
            data = json.loads(CACHE.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("machine") == here:
            return float(data["flops"]), f"cached measurement from {data['measured_at']}"
    flops = measure_per_core_flops()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_suffix(".tmp")
    # "host" too: what older readers of this file check (shared ~/.cache across checkouts)
    tmp.write_text(json.dumps({"flops": flops, "machine": here, "host": here["host"], "measured_at": time.ctime()}))
    tmp.replace(CACHE)
    return flops, "measured now (1 thread, 256x256 matrix-vector products)"


def roofline_cache_path(model_arg: str, seed: int = 0) -> Path:
    """Where this machine's one-core roofline on a model is kept (one file per machine, model, seed
    and torch version)."""
    import importlib.metadata as md
    import platform

    try:  # the installed torch's version, without importing it (seconds on a loaded machine)
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        import torch

        torch_version = torch.__version__
    key = f"{model_arg}-{seed}-torch{torch_version}-{platform.machine()}-{os.cpu_count()}cpu"
    base = Path(os.environ.get("HEADROOM_CACHE", Path.home() / ".cache" / "headroom"))
    return base / "roofline" / (key.replace("/", "_").replace(":", "_")[:200] + ".json")


def cached_machine_roofline(model_arg: str, seed: int, measure) -> dict:
    """This machine's one-core roofline on the model (``node_agent.machine``): read from the cache,
    else ``measure()`` and kept, so that every run here — emulated or simulated — models the same
    device for the same ``cpu_cores`` (two measurements differ by up to ~20 % on this VM, which would
    shift whole runs against each other). Delete the file to measure again."""
    path = roofline_cache_path(model_arg, seed)
    if path.exists():
        try:
            return {**json.loads(path.read_text()), "cached": str(path)}
        except (OSError, ValueError):
            pass  # unreadable: measure again
    got = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(got))
    tmp.replace(path)
    return {**got, "measured": str(path)}


def measure_roofline_here(model_arg: str, seed: int = 0) -> dict:
    """Measure the roofline in this process (one torch thread) on the model's real blocks."""
    import torch

    from node_agent.machine import machine_roofline
    from node_agent.shards import model_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, sd = model_state(model_arg, seed)
        return machine_roofline(cfg, sd)
    finally:
        torch.set_num_threads(threads)
