"""Compute fidelity for ``headroom net check``: do the paced agents compute like their devices?

On a network brought up by the net check, one agent per host (the model given, random weights for a
registry name) paces itself to its device clock (``testbed.emulation.cpu``: this machine's measured
one-core roofline on the model, scaled by the host's ``cpu_cores``), then runs the calibration: a
whole decode layer, repeatedly, through its pacer. Per host the report gives the device (memory
bandwidth, seconds per call), the measured paced step over the device's step time (1.0 is exact),
the steps' p95 / median, and how often this machine was itself slower than the device (late). Hosts
with equal ``cpu_cores`` must calibrate within 10 % of each other.

Goals (issue 13): step within 10 % of the device's time, p95 / median <= 1.3; a host at a full core
is the machine itself, so it may run late by this machine's jitter and is reported, not failed.
"""
from __future__ import annotations

from pathlib import Path

STEP_TOLERANCE = 0.10
SPREAD_LIMIT = 1.3
SAME_CORES_TOLERANCE = 0.10


def compute_fidelity(net, manifest, run_dir: Path, model: str = "mini-gpt2", seconds: float = 0.5) -> dict:
    """Spawn agents on ``net`` (paced), calibrate each, return ``{"model", "machine", "hosts", "ok"}``."""
    from testbed.backends.emulated.agents import AgentPool

    pool = AgentPool(net, manifest, run_dir, {"arg": model, "seed": 0})
    try:
        pool.start()
        rows = []
        for h in net.topology.hosts:
            cal = pool.call(h.name, "calibrate", 120.0, seconds=seconds)
            rows.append(_row(h.name, h.cpu_cores, pool.pacing[h.name].get("clock"), cal))
    finally:
        pool.close()
    _same_cores(rows)
    return {"model": model, "cpu_emulation": net.cpu_emulation,
            "machine": {k: v for k, v in (pool.machine or {}).items() if k != "fit"},
            "hosts": rows, "ok": all(r["ok"] for r in rows)}


def _row(host: str, cores: float, clock: dict | None, cal: dict) -> dict:
    dev = cal.get("device_step_s")
    ratio = cal["step_median_s"] / dev if dev else None
    spread = cal.get("step_p95_over_median")
    full_core = cores >= 1.0
    ok = ratio is not None and (full_core or (abs(ratio - 1.0) <= STEP_TOLERANCE and spread is not None
                                              and spread <= SPREAD_LIMIT))
    return {"host": host, "cpu_cores": cores,
            "device_bytes_per_s": clock["bytes_per_s"] if clock else None,
            "device_call_s": clock["call_s"] if clock else None,
            "device_step_s": dev, "step_median_s": cal["step_median_s"], "step_over_device": ratio,
            "step_p95_over_median": spread, "calibrated_flops_per_s": cal["flops_per_s"],
            "iterations": cal["iterations"], "ok": bool(ok), "full_core": full_core}


def _same_cores(rows: list[dict]) -> None:
    """Mark hosts of equal ``cpu_cores`` whose calibrations differ by more than 10 %."""
    groups: dict[float, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["cpu_cores"], []).append(r)
    for members in groups.values():
        rates = [m["calibrated_flops_per_s"] for m in members]
        spread = max(rates) / min(rates) - 1.0 if min(rates) > 0 else float("inf")
        for m in members:
            m["same_cores_spread"] = spread
            if spread > SAME_CORES_TOLERANCE and not m["full_core"]:
                m["ok"] = False
