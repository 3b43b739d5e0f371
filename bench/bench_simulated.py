"""Simulated backend at scale: wall time of whole experiments with 32 and 128 devices and
thousands of generated tokens (the issue's "fast enough for 100+ devices and thousands of tokens").

Each run is a generated star (rpi4 / rpi5 / jetson-nano profiles, 10-50 Mbit/s links wandering
every 16 tokens), GPT-2-small's dims with 4096 positions (GPT-2's own 1024 cannot hold 64 + 2000
tokens, and the experiment validator says so), 64 prompt + ``--tokens`` new tokens, re-planned every 16 tokens,
written to a normal run directory by ``headroom run --backend simulated``. Printed per size: wall
time, simulated tokens per wall second, RA's decisions and their median time (from the plan
events), and the mean per-token latency each algorithm reached (simulated time).

    .venv/bin/python bench/bench_simulated.py [--sizes 32 128] [--tokens 2000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("resource_aware", "edgeshard_dynamic", "galaxy")

EXPERIMENT = """\
name: bench-simulated-{n}
topology: {{generate: star, n_hosts: {n}, profiles: [rpi4, rpi5, jetson-nano], mem_scale: 0.025,
           bandwidths_mbps: [10, 20, 50], seed: 3}}
model: {{dims: {{arch: gpt2, vocab_size: 50257, n_layers: 12, d_model: 768, n_heads: 12, n_kv_heads: 12, head_dim: 64,
               ffn_dim: 3072, max_positions: 4096}}}}
workload: {{prompt_tokens: 64, new_tokens: {tokens}, seed: 0}}
algorithms: [{algorithms}]
repartition_every_tokens: 16
scenario:
  - {{random_walk: {{all_links: true, min_mbps: 5, max_mbps: 100, every_tokens: 16, step_pct: 40, seed: 7}}}}
repetitions: 1
backend: simulated
"""


def run(n: int, tokens: int, out: Path) -> None:
    exp = out / f"bench_simulated_{n}.yaml"
    exp.write_text(EXPERIMENT.format(n=n, tokens=tokens, algorithms=", ".join(ALGORITHMS)))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "testbed", "run", str(exp), "-o", str(out / str(n))],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"    {n} devices: run failed (exit {proc.returncode}): {proc.stderr[-400:]}")
        return
    run_dir = next((out / str(n)).glob("*/*/"))
    summary = json.loads((run_dir / "summary.json").read_text())
    solve = [e["solve_time_s"] for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
             if e.get("type") == "plan" and e.get("algorithm") == "resource_aware" and "solve_time_s" in e]
    done = sum(s.get("tokens_generated", 0) for s in summary.values() if isinstance(s, dict))
    lat = "\n        ".join(f"{a} {1e3 * s['mean_token_latency_s']:.1f} ms over {s['tokens_generated']} tokens, peak "
                    f"{s['max_worker_peak_mem_bytes'] / 2**20:.0f} MiB, {s['migration_epochs']} moves"
                    + (f" (failed: {s['failure'][:60]})" if s.get("failure") else "") if s.get("mean_token_latency_s")
                    else f"{a} failed ({(s.get('failure') or '')[:60]})"
                    for a, s in summary.items() if isinstance(s, dict) and "tokens_generated" in s)
    ra = (f"RA {len(solve)} decisions, median {1e3 * statistics.median(solve):.1f} ms" if solve
          else "RA decision times not recorded")
    print(f"    {n:3d} devices: {wall:6.1f} s wall for {done} tokens over {len(ALGORITHMS)} algorithms "
          f"({done / wall:.0f} tokens/s); {ra}; per algorithm (simulated time):\n        {lat}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--tokens", type=int, default=2000)
    args = ap.parse_args()
    print(f"simulated backend, GPT-2-small dims (4096 positions), 64 prompt + {args.tokens} new tokens, re-plan every 16, "
          f"algorithms {', '.join(ALGORITHMS)}")
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        for n in args.sizes:
            run(n, args.tokens, Path(tmp))


if __name__ == "__main__":
    main()
