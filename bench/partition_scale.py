"""Section [5] of ``bench_partition.py`` (issue 18, planner speed at real scale): RA decisions at
64 devices x 32 layers x 32 heads, the search budgets, the exact decode optimum at 8 x 12,
``headroom plan`` end to end and the simulated backend at 128 devices, each next to its target.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
import statistics
import time

import numpy as np

from testbed.partition import plan
from testbed.partition.synthetic import GPT2, random_star
from testbed.core.snapshot import ModelDims

LLAMA7 = ModelDims("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, gated_ffn=True, tie_embeddings=False,
                   weight_format="q4_0")

ROOT = Path(__file__).resolve().parents[1]


def _ms(xs) -> str:
    return f"median {1e3 * statistics.median(xs):.1f} ms (max {1e3 * max(xs):.1f})"


def _ci(xs) -> str:
    """Mean and 95 % confidence half-width (Student t) of ``xs``, in ms."""
    from testbed.run.stats import t_critical

    m = statistics.mean(xs)
    h = t_critical(len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return f"mean {1e3 * m:.1f} +- {1e3 * h:.1f} ms"


def scale_decisions(seeds=(1, 2, 3), repeats: int = 5) -> None:
    """[5] RA at 64 devices x 32 layers x 32 heads: the first decision and a re-decision after the
    links of 3 devices drop x0.1 (current placement given, 8 tokens on), ``solve_time_s``. The
    issue's re-decision target is the incremental one (``incremental=True``: the current placement
    carries the snapshot it was decided on, ``ra.incremental``; only the layers the changed links
    touch are placed again); the full re-decision is printed next to it as the reference it is
    compared with (what any other change, e.g. a link that recovers, falls back to), with the
    incremental plan's predicted latency + migration / H and peak device memory over the full one's."""
    from testbed.partition.ra.planner import resource_aware

    runs = {"first decision": [], "re-decision after 3 links drop, full (reference)": [],
            "re-decision after 3 links drop, incremental": []}
    targets = (20, None, 10)
    cpu = {k: [] for k in runs}
    same, ratios = 0, []

    def timed(key, snap, **kw):
        for _ in range(repeats):
            runs[key].append(plan("resource_aware", snap, LLAMA7, **kw).solve_time_s)
            t = time.process_time()  # the same decision again, its CPU time (the machine is shared)
            resource_aware(snap, LLAMA7, **kw)
            cpu[key].append(time.process_time() - t)

    for seed in seeds:
        snap = random_star(np.random.default_rng(seed), 65, LLAMA7)
        timed("first decision", snap)
        cur = plan("resource_aware", snap, LLAMA7, incremental=True).placement
        re = replace(snap, paths=snap.paths.divided({"d3", "d17", "d40"}, 10), current=cur,
                     context_len=snap.context_len + 8)
        timed("re-decision after 3 links drop, full (reference)", re)
        timed("re-decision after 3 links drop, incremental", re, incremental=True)
        full, inc = plan("resource_aware", re, LLAMA7), plan("resource_aware", re, LLAMA7, incremental=True)
        same += full.placement == inc.placement
        ratios.append((_objective(full, re), _objective(inc, re), _worker_peak(full, re), _worker_peak(inc, re)))
    print(f"[5] RA, 64 devices x 32 layers x 32 heads (Llama-2-7B Q4_0), {len(seeds)} instances x {repeats} runs "
          f"(solve_time_s, wall; then the CPU time of the same decisions):")
    for key, target in zip(runs, targets):
        goal = f"target < {target} ms" if target else "no target"
        print(f"    {key}: wall {_ms(runs[key])}; CPU {_ms(cpu[key])}, {_ci(cpu[key])} ({goal})")
    print(f"    the incremental re-decision's plan is the full one's on {same}/{len(seeds)} instances; incremental / "
          f"full, latency + migration / H: {', '.join(f'{i / f:.3f}' for f, i, _, _ in ratios)}; peak device "
          f"memory: {', '.join(f'{pi / pf:.3f}' for _, _, pf, pi in ratios)}")


def _objective(res, snap) -> float:
    """A plan result's predicted latency + migration delay / H (RA's default horizon: 4 epochs)."""
    H = max(1.0, snap.amortisation_tokens(4 * max(1, snap.tokens_until_next_decision)))
    return res.predicted_token_latency_s + res.migration_delay_s / H


def _worker_peak(res, snap) -> int:
    """The largest predicted peak memory of a device other than the source."""
    return max(v for k, v in res.predicted_peak_mem_bytes.items() if k != snap.source)


def leveling_budget(seeds=(1, 2, 3), repeats: int = 3) -> None:
    """[5] What the first decision's time buys at 64 x 32 x 32: CPU time, predicted token latency
    and the largest worker peak per step-6 budget (``level_evals``; 0 = step 6 off): what step 6
    costs and what it buys."""
    print("[5] RA first decision at 64 x 32 x 32 by leveling budget (level_evals; default 2000), per instance "
          "(seeds 1/2/3): CPU median ms | predicted token latency s | largest worker peak MiB")
    for evals in (0, 250, 500, 1000, 2000):
        kw = {"level_evals": evals} if evals else {"level_tol": 0.0}
        cells = []
        for seed in seeds:
            snap = random_star(np.random.default_rng(seed), 65, LLAMA7)
            cpus = []
            for _ in range(repeats):
                t = time.process_time()
                res = plan("resource_aware", snap, LLAMA7, **kw)
                cpus.append(time.process_time() - t)
            cells.append((1e3 * statistics.median(cpus), res.predicted_token_latency_s, _worker_peak(res, snap) / 2**20))
        print(f"    level_evals {evals:>4}: " + "  ".join(f"{c:5.1f} ms {l:.3f} s {m:5.1f} MiB" for c, l, m in cells))


def budgets() -> None:
    """[5] What bounds each search (work counts: a plan does not depend on the machine's speed)."""
    from testbed.partition.registry import OptimalParams

    o = OptimalParams()
    print(f"[5] budgets (work counts, no clock): RA is a greedy of fixed work (per layer <= proj_candidates + 1 "
          f"anchors x blocks); optimal: local search <= {o.local_search_evals} plan evaluations, MILP <= "
          f"{o.milp_max_nodes} branch-and-bound nodes (then the incumbent and its gap), one-layer exact search "
          f"<= {exact_limits()}, several-layer token-0 search <= {chain_limits()}; time_limit_s="
          f"{o.time_limit_s:g} only guards (the decode MILP fails on reaching it, never another plan; the "
          f"several-layer search leaves its nodes open and says so: chain_guard_reached)")


def chain_limits() -> str:
    import inspect

    from testbed.partition.exact.chain import ChainSearch

    p = inspect.signature(ChainSearch.solve).parameters
    return (f"{p['max_tree'].default} search nodes x ({p['max_rounds'].default} column-generation rounds, "
            f"{p['max_options'].default} options per node MILP)")


def exact_limits() -> str:
    from testbed.partition.exact.optimal import SERIAL_LIMIT

    return f"{SERIAL_LIMIT[0]:.0e} table entries / {SERIAL_LIMIT[1]:.0e} FFN choices"


def exact_scale() -> None:
    """[5] The exact decode optimum at 8 devices x 12 layers (target: certified in < 60 s)."""
    from testbed.core.errors import OutOfScope

    snap = random_star(np.random.default_rng(0), 9, GPT2)
    try:
        r = plan("optimal", snap, GPT2)
        m = r.placement.meta
        ra = plan("resource_aware", snap, GPT2).predicted_token_latency_s
        low = m.get("latency_lower_bound_s")
        print(f"[5] exact decode optimum, 8 devices x 12 layers: {r.solve_time_s:.1f} s (target < 60 s), "
              f"certified {bool(m.get('latency_certified'))}, gap {m.get('latency_gap')}; "
              f"{1e3 * r.predicted_token_latency_s:.3f} ms (lower bound "
              f"{'-' if low is None else f'{1e3 * low:.3f}'} ms; RA {1e3 * ra:.3f} ms), "
              f"{m.get('chain_tree_nodes')} search nodes")
    except OutOfScope as exc:
        print(f"[5] exact decode optimum, 8 devices x 12 layers: not reached (target: certified in < 60 s): {exc}")


def plan_end_to_end(runs: int = 3) -> None:
    """[5] ``headroom plan`` on bench/plan64.yaml as a user runs it (a fresh process each time)."""
    import json
    import subprocess
    import sys

    import resource

    walls, solves, cpus = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-m", "testbed", "plan", "bench/plan64.yaml", "--algorithm",
                              "resource_aware", "--json"], cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if out.returncode != 0:
            print(f"[5] headroom plan failed: {out.stderr[-300:]}")
            return
        solves.append(json.loads(out.stdout)["solve_time_s"])
    print(f"[5] headroom plan bench/plan64.yaml (Llama-2-7B Q4_0, 64 devices), {runs} runs: end to end "
          f"median {statistics.median(walls):.2f} s (target < 1.5 s; CPU time {statistics.median(cpus):.2f} s), "
          f"solve_time_s {_ms(solves)}")


def simulated_scale(tokens: int = 2000) -> None:
    """[5] The simulated backend, 128 devices x ``tokens`` (``bench_simulated``; target < 20 s)."""
    import sys
    import tempfile

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_simulated

    print(f"[5] simulated backend (target < 20 s for 128 devices x 2000 tokens, "
          f"{', '.join(bench_simulated.ALGORITHMS)}):")
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        bench_simulated.run(128, tokens, Path(tmp))
