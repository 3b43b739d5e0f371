"""Issue 19's memory goals, each figure printed next to its target.

Per run directory (one sweep point): does memory bind (some algorithm ran out of memory or could
not be placed for memory)? Then RA must complete every generation any baseline completes, with its
largest worker peak <= 0.8 x the best completing layer-based baseline's (EdgeShard, static or
dynamic: the lowest mean latency) at <= 1.02 x its mean latency. Where memory does not bind, RA's
peak must not be higher than that baseline's at equal latency (<= 1.02 x). Printed with them: a
LOWER BOUND on any plan's largest worker peak at the end of the run (the model's bytes at the final
context water-filled over the workers' budgets with the final limits, plus the per-host overhead
the simulated backend charges), and RA's first decision at increasing leveling tolerances
(``level_tol``): the price in predicted latency of a lower predicted peak.

    .venv/bin/python bench/bench_memory.py                    # runs kv_growth, large_scale, memory_squeeze (simulated, ~15 s)
    .venv/bin/python bench/bench_memory.py --runs DIR...      # finished run directories (e.g. an emulated memory_squeeze)
Simulated runs are deterministic (one repetition says it all); emulated ones vary: pass a run
with ``repetitions`` > 1 and the means are over repetitions.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("kv_growth", "large_scale", "memory_squeeze")
LAYER_BASED = ("edgeshard", "edgeshard_dynamic")
PEAK_TARGET, LATENCY_TARGET = 0.8, 1.02
MIB = 2**20


def _initial(cfg: Path):
    """(spec, model, the first decision's snapshot) of a run's resolved configuration."""
    import yaml

    from testbed.backends.simulated.build import build_simulated_cluster
    from testbed.spec.modelref import resolve_model
    from testbed.spec.schema import ExperimentSpec

    data = yaml.safe_load(cfg.read_text())
    for key in ("sweep_point", "model_resolved"):  # what the runner adds to the resolved file
        data.pop(key, None)
    spec = ExperimentSpec.model_validate(data)
    model = resolve_model(spec.model)
    cl = build_simulated_cluster(spec.topology, model, host_overhead_mib=spec.simulation.host_overhead_mib,
                                 weights_from=spec.migration.weights_from)
    snap = cl.snapshot(spec.workload.prompt_tokens, spec.repartition_every_tokens)
    return spec, model, replace(snap, tokens_remaining=spec.workload.new_tokens,
                                allow_blocks_on_source=spec.allow_blocks_on_source)


def peak_lower_bound(snap, dims, overhead_bytes: float) -> float:
    """Smallest possible largest worker peak at the end of the run: the level M with
    sum_j min(budget_j, M) = the model's block bytes at the final context (fragmentation, latency
    and the source ignored: no plan can do better), plus the per-host overhead."""
    from testbed.partition.common import Problem

    prob = Problem(snap, dims, "decode", mem_tokens=snap.tokens_remaining)
    total = dims.n_layers * prob.layer_bytes()
    caps = np.sort(np.clip(prob.budget[prob.allowed & (np.arange(len(prob.names)) != prob.src)], 0, None))
    acc = 0.0
    for i, c in enumerate(caps):
        if acc + c * (caps.size - i) >= total:
            return overhead_bytes + (total - acc) / (caps.size - i)
        acc += c
    return float("inf")


def verdict(summary: dict) -> list[str]:
    algos = {a: s for a, s in summary.items() if isinstance(s, dict) and "tokens_generated" in s}
    ra = algos.get("resource_aware")
    if ra is None:
        return ["    no resource_aware in this run"]
    most = max(s["tokens_generated"] for s in algos.values())
    binds = any(s.get("memory_ran_out") or "infeasible" in (s.get("failure") or "") for s in algos.values())
    done = {a: s for a, s in algos.items() if s["tokens_generated"] == most and not s.get("failed")}
    lines = [f"    memory binds: {binds}; RA generated {ra['tokens_generated']} of the most any algorithm did, "
             f"{most} (target: all) -> {'met' if ra['tokens_generated'] >= most and not ra.get('failed') else 'MISSED'}"]
    layer = {a: s for a, s in done.items() if a in LAYER_BASED}
    if not layer:
        others = ", ".join(f"{a} {1e3 * s['mean_token_latency_s']:.1f} ms / {s['max_worker_peak_mem_bytes'] / MIB:.1f} MiB"
                           for a, s in done.items() if a != "resource_aware")
        lines.append(f"    no layer-based baseline completes (RA {1e3 * ra['mean_token_latency_s']:.1f} ms / "
                     f"{ra['max_worker_peak_mem_bytes'] / MIB:.1f} MiB; others that complete: {others or 'none'})")
        return lines
    name, best = min(layer.items(), key=lambda kv: kv[1]["mean_token_latency_s"])
    p = ra["max_worker_peak_mem_bytes"] / best["max_worker_peak_mem_bytes"]
    t = ra["mean_token_latency_s"] / best["mean_token_latency_s"]
    want = PEAK_TARGET if binds else 1.0
    ok = p <= want and t <= LATENCY_TARGET
    lines.append(f"    RA {1e3 * ra['mean_token_latency_s']:.2f} ms, peak {ra['max_worker_peak_mem_bytes'] / MIB:.1f} MiB"
                 f" | best layer-based {name} {1e3 * best['mean_token_latency_s']:.2f} ms, "
                 f"{best['max_worker_peak_mem_bytes'] / MIB:.1f} MiB")
    lines.append(f"    peak ratio {p:.3f} (target <= {want}) at latency ratio {t:.3f} (target <= {LATENCY_TARGET})"
                 f" -> {'met' if ok else 'MISSED'}")
    return lines


def frontier(snap, dims, overhead_bytes: float, tols=(0.0, 0.02, 0.05, 0.1, 0.2, 0.4)) -> list[str]:
    """RA's first decision at each leveling tolerance: predicted latency and largest worker peak
    (blocks + the per-host overhead, as the runs' peaks)."""
    from testbed.partition import plan

    out = []
    for tol in tols:
        r = plan("resource_aware", snap, dims, level_tol=tol)
        peak = overhead_bytes + max(v for k, v in r.predicted_peak_mem_bytes.items() if k != snap.source)
        out.append(f"level_tol {tol:.2f}: {1e3 * r.predicted_token_latency_s:.2f} ms, {peak / MIB:.1f} MiB")
    return out


def report(run_dir: Path, with_frontier: bool) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    spec, model, snap = _initial(run_dir / "config.resolved.yaml")
    print(f"[{spec.name}] {run_dir}")
    for line in verdict(summary):
        print(line)
    overhead = spec.simulation.host_overhead_mib * MIB
    lb = peak_lower_bound(snap, model.dims, overhead)
    print(f"    lower bound on any plan's largest worker peak at the end: {lb / MIB:.1f} MiB "
          f"(workload {spec.workload.prompt_tokens}+{spec.workload.new_tokens} tokens, final limits)")
    if with_frontier:
        print("    RA's first decision on the topology as specified (before any scenario change), predicted "
              "latency and peak at the end of the run:\n      " + "\n      ".join(frontier(snap, model.dims, overhead)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", type=Path, help="finished run directories (default: run the experiments)")
    ap.add_argument("--no-frontier", action="store_true", help="skip RA's level_tol sweep")
    args = ap.parse_args()
    dirs = list(args.runs or [])
    if not dirs:
        out = Path(tempfile.mkdtemp(prefix="bench_memory_"))
        for name in EXPERIMENTS:
            proc = subprocess.run([sys.executable, "-m", "testbed", "run", str(ROOT / f"experiments/paper/{name}.yaml"),
                                   "-o", str(out), "--backend", "simulated", "--jobs", "1"],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"[{name}] run failed (exit {proc.returncode}): {proc.stderr[-400:]}")
        dirs = sorted(p.parent for p in out.glob("**/summary.json"))
    for d in dirs:
        report(d, not args.no_frontier)
    return 0


if __name__ == "__main__":
    sys.exit(main())
