"""Partitioner benchmark: every figure measured side by side in one run (no stored numbers).

1. RA / exact optimum under the ``paper`` model on random 3-5 device instances (mean, worst): the
   paper's greedy (the optimum's plan space) and full RA (whose FFN splits leave that space).
   1d. The same under the ``decode`` model (serialised NICs, what plans are reported with): one
   layer, ``optimal`` = the certified exact search (``testbed.partition.exact.serial``).
2. Exact solver time, paper model, 5 devices x 32 heads; 2d. the same for the decode search.
3. RA decision time, decode model, 48 devices x 12 layers x 12 heads.
4. RA on the regime map (``experiments/paper/regime_map.yaml``, 1200 simulated points, or
   ``--map-run DIR``): RA / best of EdgeShard, EdgeShard-dynamic and Galaxy (target <= 1.02x at
   every point), RA's speed-up over the best layer split where compute dominates, where RA beats
   Galaxy, and the boundary rule's accuracy (``analysis.regime_map``).
5. Issue 18, planner speed at real scale, each figure next to its target: RA decision time at
   64 devices x 32 layers x 32 heads (Llama-2-7B Q4_0 shape; first decision and re-decision,
   median ``solve_time_s``: the target is the incremental re-decision's, the full one is its
   reference), the first decision's time, latency and peak per leveling budget, the search budgets (work counts, not wall clock), the exact
   decode optimum at 8 devices x 12 layers, ``headroom plan`` end to end on ``bench/plan64.yaml``
   and the simulated backend at 128 devices x 2000 tokens (``bench_simulated``; ``--only 5``
   runs it, ``5q`` skips it).
4g. (``--only 4g``) Fluctuating bandwidth on a GPT-2-small simulated cluster (8-24 devices, 3 random clusters and scenarios
   each): RA vs EdgeShard (static and dynamic) and Galaxy: mean per-token latency (migration
   included) and peak device memory; ``ra_greedy`` is RA without its layer-split candidate.
Compute speed: the per-core FLOP/s measured on this machine (``testbed.backends.calibrate.per_core_flops``,
cached per host) unless ``--per-core-flops`` is given. Static algorithms are sized for the whole
generation's KV growth (they never re-plan); dynamic ones for one epoch + their own headroom.
Run: .venv/bin/python bench/bench_partition.py [--per-core-flops F] [--tokens N] [--only 1,1d,2,2d,3,4,5]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
import statistics
import time

import numpy as np

from testbed.core.errors import AlgorithmFailure
from testbed.partition import DYNAMIC_ALGORITHMS, InfeasiblePlan, plan
from testbed.partition.synthetic import GPT2, random_star
from testbed.backends.simulated.cluster import SimulatedCluster
from testbed.core.snapshot import ModelDims



def ra_vs_optimal(n_instances: int = 60) -> None:
    """[1] RA against the paper model's exact optimum. The optimum (``exact.optimal``, paper MILP)
    ranges over the paper's plan space: heads anywhere, the projection and the whole FFN on one
    device each. The paper's greedy (RA without steps 4b-4c: ``layer_split=False,
    portfolio=False``) places in that space, so its ratio is the algorithm's quality. Full RA also
    weighs Galaxy's tensor-parallel plan (step 4c), which splits the FFN's columns across devices,
    outside that space: its ratio below 1 is that split's gain, not a fault of the optimum."""
    rng = np.random.default_rng(0)
    same_space, full, split = [], [], 0
    for _ in range(n_instances):
        heads = int(rng.choice([4, 8, 12, 16]))
        dims = ModelDims("p", 1, 512, heads, heads, 64, 2048, 1000)
        snap = random_star(rng, int(rng.integers(4, 7)), dims, mem_slack=float(rng.uniform(1.2, 3)),
                           context_len=int(rng.integers(64, 512)))
        opt = plan("optimal", snap, dims, "paper").predicted_token_latency_s
        greedy = plan("resource_aware", snap, dims, "paper", headroom_epochs=1, layer_split=False, portfolio=False)
        ra = plan("resource_aware", snap, dims, "paper", headroom_epochs=1)
        same_space.append(greedy.predicted_token_latency_s / opt)
        full.append(ra.predicted_token_latency_s / opt)
        split += len(ra.placement.layers[0].ffn) > 1
    print(f"[1] RA/optimal, paper model, {n_instances} random instances of 3-5 worker devices: the paper's "
          f"greedy (the optimum's plan space) mean {statistics.mean(same_space):.4f} (target <= 1.05), worst "
          f"{max(same_space):.4f} (target <= 1.15); full RA mean {statistics.mean(full):.4f}, worst "
          f"{max(full):.4f} (its FFN split over devices on {split} instances: outside the optimum's space)")


def ra_vs_optimal_decode(n_instances: int = 60) -> None:
    rng = np.random.default_rng(0)
    ratios, certified, below, gaps = [], 0, 0, []
    for _ in range(n_instances):
        heads = int(rng.choice([4, 8, 12, 16]))
        dims = ModelDims("d", 1, 512, heads, heads, 64, 2048, 1000)
        snap = random_star(rng, int(rng.integers(4, 7)), dims, mem_slack=float(rng.uniform(1.2, 3)),
                           context_len=int(rng.integers(64, 512)))
        ra = plan("resource_aware", snap, dims, headroom_epochs=1).predicted_token_latency_s
        r = plan("optimal", snap, dims)
        meta = r.placement.meta
        certified += bool(meta.get("latency_certified"))
        gaps.append(meta["latency_gap"])
        below += ra < r.predicted_token_latency_s * (1 - 1e-9)
        ratios.append(ra / r.predicted_token_latency_s)
    print(f"[1d] RA/optimal, decode model (serialised NICs), {n_instances} random one-layer instances of 3-5 "
          f"worker devices: mean {statistics.mean(ratios):.4f}, worst {max(ratios):.4f}; optimal certified on "
          f"{certified}/{n_instances} (max gap to its bound {max(gaps):.1e}), RA below optimal on {below}")


def exact_time_decode() -> None:
    dims = ModelDims("d32", 1, 1024, 32, 32, 32, 4096, 1000)
    times, ok = [], 0
    for seed in range(3):
        snap = random_star(np.random.default_rng(seed), 6, dims, context_len=256)
        r = plan("optimal", snap, dims)
        times.append(r.solve_time_s)
        ok += bool(r.placement.meta.get("latency_certified"))
    print(f"[2d] exact search, decode model (serialised), 1 layer, 5 devices x 32 heads: max {max(times):.3f} s "
          f"over 3 instances (target < 10 s), certified on {ok}/3")


def exact_time() -> None:
    dims = ModelDims("p32", 1, 1024, 32, 32, 32, 4096, 1000)
    times = []
    for seed in range(3):
        snap = random_star(np.random.default_rng(seed), 6, dims, context_len=256)
        times.append(plan("optimal", snap, dims, "paper").solve_time_s)
    print(f"[2] exact MILP, paper model, 5 devices x 32 heads: max {max(times):.3f} s over 3 instances (target < 10 s)")


def ra_time(seeds=(1, 2, 3), repeats: int = 9) -> None:
    """Wall time of one decision on three random 48-device stars: the first plan, and a
    re-decision after the links of 16 devices drop x0.1 (current placement given, 8 tokens on)."""
    first, again = [], []
    for seed in seeds:
        snap = random_star(np.random.default_rng(seed), 49, GPT2)
        first += [plan("resource_aware", snap, GPT2).solve_time_s for _ in range(repeats)]
        cur = plan("resource_aware", snap, GPT2).placement
        slow = {f"d{i}" for i in range(1, 49, 3)}
        re = replace(snap, paths=snap.paths.divided(slow, 10), current=cur, context_len=snap.context_len + 8)
        again += [plan("resource_aware", re, GPT2).solve_time_s for _ in range(repeats)]
    ms = lambda xs: f"median {1e3 * statistics.median(xs):.1f} ms, max {1e3 * max(xs):.1f} ms"  # noqa: E731
    print(f"[3] RA decision, decode model, 48 devices x 12 layers x 12 heads, {len(seeds)} instances x "
          f"{repeats} runs: first decision {ms(first)}; re-decision after a x0.1 drop (current placement "
          f"given) {ms(again)} (target < 20 ms)")


from partition_scale import (budgets, exact_scale, leveling_budget, plan_end_to_end, scale_decisions,  # noqa: E402
                             simulated_scale)


def topology(rng, n: int, dims: ModelDims):
    layer_bytes = 12 * (4 * 768 * 64 * 4) + 768 * 768 * 4 + 2 * 768 * 3072 * 4
    share = rng.uniform(0.6, 1.4, n)
    mems = 1.6 * dims.n_layers * layer_bytes * share / share.sum()
    hosts = [("h0", 2**31, 1.0, True)] + [(f"h{i + 1}", int(m), float(rng.choice([0.25, 0.5, 1.0])), False)
                                          for i, m in enumerate(mems)]
    links = [(h[0], "s1", float(rng.uniform(10, 100)) * 1e6 / 8, float(rng.uniform(1, 5)) / 1e3) for h in hosts]
    return hosts, links


def run_algorithm(cluster: SimulatedCluster, algorithm: str, events: dict, tokens: int, every: int,
                  params: dict | None = None) -> dict:
    params = params or {}
    cluster.reset()
    prompt = list(range(16))
    # a static plan is kept for the whole generation, so it is sized for the whole generation's KV
    horizon = every if algorithm in DYNAMIC_ALGORITHMS else tokens
    # as the runner does: planners are told how many tokens the run still generates
    r = plan(algorithm, replace(cluster.snapshot(len(prompt), horizon), tokens_remaining=tokens), GPT2, **params)
    cluster.load(r.placement, prompt)
    total, tok, mig, n_mig = 0.0, 0, 0.0, 0
    for t in range(1, tokens):
        for (a, b), mbps in events.get(t, []):
            cluster.apply_link(a, b, bandwidth_mbps=mbps)
        if r.dynamic and t % every == 0:
            r = plan(algorithm, replace(cluster.snapshot(len(prompt) + t - 1, every), tokens_remaining=tokens - t + 1),
                     GPT2, **params)
            if r.placement != cluster.placement:
                d = cluster.migrate(r.placement).duration_s
                total, mig, n_mig = total + d, mig + d, n_mig + 1
        rec = cluster.step(tok)
        tok, total = rec.token_id, total + rec.latency_s
    peak = max(v for h, v in cluster.peak_mem_bytes().items() if h != "h0")
    return {"lat": total / (tokens - 1), "peak": peak, "mig": mig, "n_mig": n_mig}


def fluctuating(per_core_flops: float, tokens: int, every: int = 8, scenarios: int = 3) -> None:
    print(f"[4g] fluctuating bandwidth, simulated cluster, GPT-2-small dims, {per_core_flops:.2e} FLOP/s per core,"
          f" {tokens} tokens, re-plan every {every}; bandwidth of every link redrawn 10-100 Mbit/s"
          f" (x0.1 for a random third) every 16 tokens; {scenarios} random clusters and scenarios per size")
    # ra_greedy: the paper's greedy alone (no layer-split candidate, RA step 4b), for comparison
    runs = {"resource_aware": ("resource_aware", {}), "ra_greedy": ("resource_aware", {"layer_split": False}),
            "edgeshard": ("edgeshard", {}), "edgeshard_dynamic": ("edgeshard_dynamic", {}), "galaxy": ("galaxy", {})}
    algos, layer_based = tuple(runs), ("edgeshard", "edgeshard_dynamic", "galaxy")
    for n in (8, 16, 24):
        meets, speedups = 0, []
        for k in range(scenarios):
            rng = np.random.default_rng(n if k == 0 else 1000 * n + k)
            hosts, links = topology(rng, n, GPT2)
            events = {t: [((a, b), float(rng.uniform(10, 100)) * (0.1 if rng.random() < 1 / 3 else 1.0))
                          for a, b, _, _ in links] for t in range(16, tokens, 16)}
            cluster = SimulatedCluster(hosts, links, GPT2, per_core_flops)
            res = {}
            for a in algos:
                try:
                    res[a] = run_algorithm(cluster, runs[a][0], events, tokens, every, runs[a][1])
                except (AlgorithmFailure, InfeasiblePlan) as exc:
                    res[a] = {"lat": float("inf"), "peak": float("inf"), "fail": str(exc)[:80]}
            base = min(layer_based, key=lambda a: res[a]["lat"])
            ra = res["resource_aware"]
            cells = "  ".join(f"{a}={res[a]['lat'] * 1e3:.1f}ms/{res[a]['peak'] / 2**20:.0f}MiB" for a in algos)
            if res[base]["lat"] == float("inf"):
                verdict = "no layer-based baseline ran"
            else:
                speedup = 1 - ra["lat"] / res[base]["lat"]
                speedups.append(speedup)
                ok = speedup >= 0.25 and ra["peak"] < res[base]["peak"]
                meets += ok
                verdict = (f"RA {100 * abs(speedup):.1f}% {'faster' if speedup >= 0 else 'slower'} than {base}, peak "
                           f"{ra['peak'] / 2**20:.0f} vs {res[base]['peak'] / 2**20:.0f} MiB: {'MEETS' if ok else 'MISSES'}")
            print(f"    {n:2d} devices #{k}: {cells}\n        {verdict}")
            if ra.get("n_mig"):
                print(f"        RA time split: tokens {(ra['lat'] * (tokens - 1) - ra['mig']) / (tokens - 1) * 1e3:.1f}"
                      f" ms/token, {ra['n_mig']} migrations, {ra['mig']:.2f} s in total")
            for a in algos:
                if "fail" in res[a]:
                    print(f"        {a} failed: {res[a]['fail']}")
        m = statistics.mean(speedups) if speedups else None
        mean = f"on average {100 * abs(m):.1f}% {'faster' if m >= 0 else 'slower'}" if speedups else "no comparison"
        print(f"    {n:2d} devices: RA vs the best layer-based baseline, {mean} over {len(speedups)} scenarios "
              f"where one ran; target (>= 25% faster and lower peak) met in {meets}/{scenarios}")


def regime_map(run_dir: str | None) -> None:
    """[4] RA on the regime map (issue 12 item 6): at most 1.02x the best of EdgeShard (static,
    dynamic) and Galaxy at every point, >= 25 % faster than the best layer split where compute
    dominates (R > R*), and where it beats Galaxy too. Runs experiments/paper/regime_map.yaml
    (simulated, ~8.5 min on 2 cores) unless ``--map-run`` names a finished run of it."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from analysis.regime_map import DOMINANCE, load_map, render, summarize

    if run_dir is None:
        from testbed.run.runner import run_experiment
        from testbed.spec.loader import load_experiment

        exp = Path(__file__).resolve().parents[1] / "experiments/paper/regime_map.yaml"
        t = time.perf_counter()
        dirs = run_experiment(load_experiment(exp), exp, Path(tempfile.mkdtemp(prefix="regime-map-")))
        run_dir = str(dirs[0].parent)
        print(f"[4] ran {exp.name}: {len(dirs)} points in {time.perf_counter() - t:.0f} s -> {run_dir}")
    df = load_map(Path(run_dir))
    summary = summarize(df)
    print(f"[4] regime map {run_dir}")
    print("    " + render(summary).replace("\n", "\n    "))
    for scen, d in df.groupby("scenario"):
        r_star = summary[scen]["rule_R_star"]
        ran = d[np.isfinite(d["ra_over_best"])]
        print(f"    {scen}: RA / best baseline max {ran['ra_over_best'].max():.3f} (target <= {DOMINANCE}): "
              f"{'MEETS' if ran['ra_over_best'].max() <= DOMINANCE else 'MISSES'} "
              f"({summary[scen]['ra_worse_than_1.02x_best_significant']} significant)")
        for k in (2, 3):  # "compute dominates": R at least k times the rule's threshold
            compute = ran[ran["R"] > k * r_star]
            fast = int((compute["ra_over_layer"] <= 0.75).sum())
            print(f"      where R > {k} R* = {k * r_star:.3g} ({len(compute)} points): RA >= 25 % faster than the best "
                  f"layer split at {fast} ({100 * fast / max(len(compute), 1):.0f} %), worst "
                  f"{compute['ra_over_layer'].max():.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-core-flops", type=float, default=None,
                    help="simulated per-core speed; default: measured here by testbed.backends.calibrate.per_core_flops()")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--only", default="1,1d,2,2d,3,4,5", help="comma-separated sections to run (4g: the old "
                    "GPT-2 fluctuating-bandwidth section; 5q: section 5 without the simulated run)")
    ap.add_argument("--map-run", default=None, help="[4]: a finished run of experiments/paper/regime_map.yaml")
    args = ap.parse_args()
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    for key, fn in (("1", ra_vs_optimal), ("1d", ra_vs_optimal_decode), ("2", exact_time),
                    ("2d", exact_time_decode), ("3", ra_time)):
        if key in only:
            fn()
    if "4" in only:
        regime_map(args.map_run)
    if only & {"5", "5q"}:
        scale_decisions()
        leveling_budget()
        budgets()
        exact_scale()
        plan_end_to_end()
        if "5" in only:
            simulated_scale()
    if "4g" not in only:
        print(f"bench wall time {time.perf_counter() - t0:.1f} s")
        return
    if args.per_core_flops is None:
        from testbed.backends.calibrate import per_core_flops

        flops, how = per_core_flops()
        print(f"per-core speed {flops:.3e} FLOP/s ({how}; testbed.backends.calibrate.per_core_flops, 1 thread, "
              f"256x256 matvecs)")
    else:
        flops = args.per_core_flops
        print(f"per-core speed {flops:.3e} FLOP/s (given on the command line)")
    fluctuating(flops, args.tokens)
    print(f"bench wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
