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


def per_core_flops(use_cache: bool = True) -> tuple[float, str]:
    """(FLOP/s, provenance). Cached per machine so that repeated runs use the same figure."""
    if use_cache and CACHE.exists():
        data = json.loads(CACHE.read_text())
        if data.get("host") == os.uname().nodename:
            return float(data["flops"]), f"cached measurement from {data['measured_at']}"
    flops = measure_per_core_flops()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps({"flops": flops, "host": os.uname().nodename, "measured_at": time.ctime()}))
    return flops, "measured now (1 thread, 256x256 matrix-vector products)"
