"""Node agents measured side by side (root, real emulated network):

1. per-token latency of head-level, layer-level and Galaxy-like placements vs the ``decode`` cost
   model's prediction on the cluster's own measured snapshot (calibrated FLOP/s, tc rates, delays);
2. migration throughput (a block set moved over one path) vs iperf3 on the same path;
3. how many agents this machine holds with tiny-gpt2 (one token through a placement that uses
   every host, checked against the monolithic model) and the memory charged per idle agent.

    sudo .venv/bin/python bench/bench_agents.py [--model tiny-gpt2] [--tokens 32] [--agents 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node_agent.model import load_model  # noqa: E402
from testbed.backends.emulated.agents import AgentPool  # noqa: E402
from testbed.emulation.cleanup import Manifest  # noqa: E402
from testbed.backends.emulated.cluster import EmulatedCluster  # noqa: E402
from testbed.emulation.netcheck import measure_rate  # noqa: E402
from testbed.emulation import cpu as cpu_modes  # noqa: E402
from testbed.emulation.network import EmulatedNetwork  # noqa: E402
from testbed.partition.cost.latency import decode_cost  # noqa: E402
from testbed.core.placement import FfnShard, LayerPlacement, Placement, uniform_layer  # noqa: E402
from testbed.core.snapshot import ModelDims  # noqa: E402
from testbed.spec.schema import TopologySpec  # noqa: E402

MIB = 1 << 20


def star(n: int, rates=(50, 20, 20, 10), delays=(2, 3, 5, 5), mem=512, cores=(1.0, 0.5, 0.5, 0.5)) -> TopologySpec:
    return TopologySpec.model_validate({
        "name": f"bench-star{n}", "switches": ["s1"],
        "hosts": [{"name": f"h{i + 1}", "mem_limit_mib": mem, "cpu_cores": cores[i % len(cores)], "source": i == 0}
                  for i in range(n)],
        "links": [{"a": f"h{i + 1}", "b": "s1", "bandwidth_mbps": rates[i % len(rates)],
                   "delay_ms": delays[i % len(delays)]} for i in range(n)]})


def placements(cfg) -> dict[str, Placement]:
    G, F, L = cfg.n_groups, cfg.ffn_dim, cfg.n_layers
    heads = tuple(("h2", "h3", "h4")[g % 3] for g in range(G))
    c1, c2 = F // 2, F * 3 // 4
    return {
        "head-level": Placement("h1", tuple(LayerPlacement(heads, "h2", (FfnShard("h2", 0, F),)) for _ in range(L))),
        "layer-level": Placement("h1", tuple(uniform_layer(("h2", "h3", "h4")[l * 3 // L], G, F) for l in range(L))),
        "galaxy-like": Placement("h1", tuple(LayerPlacement(heads, "h2", (FfnShard("h2", 0, c1), FfnShard("h3", c1, c2),
                                                                         FfnShard("h4", c2, F))) for _ in range(L))),
    }


def bench_latency(model: str, tokens: int, run: Path, topo: TopologySpec | None = None,
                  cpu_emulation: str = "pace") -> list[dict]:
    c = EmulatedCluster(topo or star(4), model, run / f"latency-{cpu_emulation}",
                        run_id=f"bl{uuid.uuid4().hex[:4]}", cpu_emulation=cpu_emulation)
    rows = []
    try:
        cfg = load_model(model).config
        dims = ModelDims.from_config(cfg)
        prompt = list(range(1, 9))
        for name, pl in placements(cfg).items():
            c.reset()
            rec = c.load(pl, prompt)
            for h in c.hosts():
                c.pool.call(h, "pace", 10.0, clear=True)
            meas, pred, parts, pparts = [], [], [], []
            for i in range(tokens):
                T = len(prompt) + i + 1
                snap = c.snapshot(T, 8)
                cost = decode_cost(pl, snap, dims, T)
                pred.append(cost.token_latency_s)
                pparts.append((cost.compute_s, cost.transfer_s))
                rec = c.step(rec.token_id)
                meas.append(rec.latency_s)
                parts.append((rec.compute_s, rec.transfer_s, rec.wait_s))
            m, p = statistics.median(meas), statistics.median(pred)
            med = lambda xs, k: statistics.median(x[k] for x in xs) * 1e3  # noqa: E731
            rows.append({"placement": name, "cpu_emulation": cpu_emulation, "measured_ms": m * 1e3,
                         "predicted_ms": p * 1e3, "ratio": m / p, "mean_ratio": statistics.mean(meas) / statistics.mean(pred),
                         "p95_over_median": sorted(meas)[int(0.95 * (len(meas) - 1))] / m,
                         "block_p95_over_median": worst_block_spread(c),
                         "same_cores_calibration_spread": calibration_spread(c),
                         "compute_ms": med(parts, 0), "transfer_ms": med(parts, 1), "wait_ms": med(parts, 2),
                         "pred_compute_ms": med(pparts, 0), "pred_transfer_ms": med(pparts, 1)})
    finally:
        c.close()
    return rows


def worst_block_spread(c: EmulatedCluster) -> float | None:
    """Largest p95/median of one block kind's paced time on any host — over the block calls (attention,
    W_o, FFN, LM head), not the elementwise steps (embedding rows, summing FFN partials) that have
    no device time of their own. Under roofline pacing the ratio is taken of paced over device time
    (attention's grows with the context); in the other modes, of the wall time."""
    worst = None
    for h in c.hosts():
        st = c.pool.call(h, "pace", 10.0)
        for kind, k in st["kinds"].items():
            if kind not in ("attn", "proj", "ffn", "head") or k["calls"] < 8:
                continue
            r = (k["paced_over_device_p95"] / k["paced_over_device_p50"] if st["mode"] == "device"
                 else k["p95_over_median"])
            if r is not None:
                worst = max(worst or 0.0, r)
    return worst


def calibration_spread(c: EmulatedCluster) -> float | None:
    """Largest relative difference of the calibrated FLOP/s between hosts of equal ``cpu_cores``."""
    groups: dict[float, list[float]] = {}
    for h, r in c.calibrations.items():
        groups.setdefault(c.cpu_cores[h], []).append(r["flops_per_s"])
    spreads = [max(v) / min(v) - 1.0 for v in groups.values() if len(v) > 1]
    return max(spreads) if spreads else None


def bench_migration(run: Path, layers_moved: int = 3) -> dict:
    topo = star(3, rates=(50, 20, 20), delays=(1, 2, 2), mem=1024)
    c = EmulatedCluster(topo, "mini-gpt2", run / "migration", run_id=f"bm{uuid.uuid4().hex[:4]}")
    try:
        cfg = load_model("mini-gpt2").config
        G, F, L = cfg.n_groups, cfg.ffn_dim, cfg.n_layers
        old = Placement("h1", tuple(uniform_layer("h2", G, F) for _ in range(L)))
        new = Placement("h1", tuple(uniform_layer("h3" if l < layers_moved else "h2", G, F) for l in range(L)))
        rec = c.load(old, list(range(1, 33)))
        for _ in range(8):
            rec = c.step(rec.token_id)
        mig = c.migrate(new)
        c.step(rec.token_id)
        iperf = measure_rate(c.net, "h2", "h3", seconds=3.0)
        mig_mbps = mig.bytes_moved * 8 / mig.duration_s / 1e6
        return {"bytes": mig.bytes_moved, "duration_s": mig.duration_s, "migration_mbps": mig_mbps,
                "iperf3_mbps": iperf["goodput_mbps"], "ratio": mig_mbps / iperf["goodput_mbps"]}
    finally:
        c.close()


def capacity_placement(cfg, workers: list[str]) -> Placement:
    """Every worker gets at least one block: heads, then proj, then FFN column shards."""
    G, F, L = cfg.n_groups, cfg.ffn_dim, cfg.n_layers
    per = len(workers) // L
    layers = []
    for l in range(L):
        mine = workers[l * per:(l + 1) * per] if l < L - 1 else workers[l * per:]
        heads = tuple(mine[g % len(mine)] for g in range(G))
        rest = mine[G:] or mine
        proj, ffn_devs = rest[0], (rest[1:] or rest)
        k = len(ffn_devs)
        bounds = [F * i // k for i in range(k + 1)]
        layers.append(LayerPlacement(heads, proj, tuple(FfnShard(d, bounds[i], bounds[i + 1])
                                                        for i, d in enumerate(ffn_devs))))
    return Placement("h1", tuple(layers))


def bench_capacity(n: int, run: Path) -> dict:
    topo = star(n, rates=(50,), delays=(1,), mem=64, cores=(0.1,))
    manifest = Manifest(run / "capacity" / "resources.jsonl")
    net = EmulatedNetwork(topo, f"bc{uuid.uuid4().hex[:4]}", manifest, delay_consumer="wire")
    t0 = time.time()
    net.start()
    pool = None
    try:
        t1 = time.time()
        pool = AgentPool(net, manifest, run / "capacity", {"arg": "tiny-gpt2", "seed": 0})
        pool.start()
        t2 = time.time()
        idle = [net.cgroups[h].usage_bytes() for h in pool.agents]
        cfg = load_model("tiny-gpt2").config
        pl = capacity_placement(cfg, [f"h{i + 1}" for i in range(1, n)])
        pool.each(lambda h: pool.call(h, "load", 60.0, placement=pl.to_json(), pv=1))
        prompt = [5, 6, 7, 8]
        ref = load_model("tiny-gpt2").generate(prompt, 4)
        r = pool.call("h1", "forward", 60.0, ids=prompt, start_pos=0, seq=1)
        out = [r["token_id"]]
        for i in range(3):
            r = pool.call("h1", "forward", 60.0, ids=[out[-1]], start_pos=len(prompt) + i, seq=2 + i)
            out.append(r["token_id"])
        used = {d for d in pl.devices()}
        return {"agents": len(pool.agents), "hosts_with_blocks": len(used), "tokens_equal": out == ref,
                "idle_charge_mean_mib": statistics.mean(idle) / MIB, "idle_charge_max_mib": max(idle) / MIB,
                "network_up_s": t1 - t0, "agents_up_s": t2 - t1, "token_ms": r["latency_s"] * 1e3}
    finally:
        if pool is not None:
            pool.close()
        net.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[], choices=["latency", "migration", "capacity"])
    ap.add_argument("--cores", type=float, nargs="+", default=[1.0, 0.5, 0.5, 0.5],
                    help="cpu_cores of h1 (source), h2, h3, h4 (repeated cyclically)")
    ap.add_argument("--rate", type=float, nargs="+", default=[50, 20, 20, 10], help="access link Mbit/s per host")
    ap.add_argument("--delay", type=float, nargs="+", default=[2, 3, 5, 5], help="access link delay ms per host")
    ap.add_argument("--cpu-emulation", nargs="+", default=["pace"], choices=list(cpu_modes.MODES),
                    help="CPU emulation modes, measured one after the other on the same topology")
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    if "latency" not in args.skip:
        topo = star(4, rates=tuple(args.rate), delays=tuple(args.delay), cores=tuple(args.cores), mem=1024)
        print(f"== per-token latency, {args.model}, 4-host star (cores {args.cores}, {args.rate} Mbit/s, "
              f"{args.delay} ms), median of {args.tokens} decode tokens")
        print(f"{'cpu':<9} {'placement':<12} {'measured':>9} {'predicted':>9} {'ratio':>6} {'mean r':>6} "
              f"{'tok p95/p50':>11} {'block p95/p50':>13} {'calib':>6}  measured compute/transfer/wait  predicted compute/transfer (ms)")
        for mode in args.cpu_emulation:
            for r in bench_latency(args.model, args.tokens, run, topo, mode):
                spread = r["block_p95_over_median"]
                print(f"{mode:<9} {r['placement']:<12} {r['measured_ms']:8.2f}ms {r['predicted_ms']:8.2f}ms "
                      f"{r['ratio']:6.3f} {r['mean_ratio']:6.3f} {r['p95_over_median']:11.3f} "
                      f"{spread if spread is not None else float('nan'):13.3f} "
                      f"{r['same_cores_calibration_spread'] or float('nan'):6.1%}  "
                      f"{r['compute_ms']:7.2f}/{r['transfer_ms']:.2f}/{r['wait_ms']:.2f}"
                      f"  {r['pred_compute_ms']:13.2f}/{r['pred_transfer_ms']:.2f}")
    if "migration" not in args.skip:
        m = bench_migration(run)
        print(f"== migration h2->h3 (20 Mbit/s path): {m['bytes']} B in {m['duration_s']:.2f} s = "
              f"{m['migration_mbps']:.2f} Mbit/s; iperf3 {m['iperf3_mbps']:.2f} Mbit/s; ratio {m['ratio']:.3f}")
    if "capacity" not in args.skip:
        c = bench_capacity(args.agents, run)
        print(f"== capacity: {c['agents']} agents up in {c['agents_up_s']:.1f} s (network {c['network_up_s']:.1f} s), "
              f"{c['hosts_with_blocks']} hosts hold blocks, tokens equal monolithic: {c['tokens_equal']}, "
              f"token {c['token_ms']:.1f} ms; idle charge per agent mean {c['idle_charge_mean_mib']:.2f} MiB, "
              f"max {c['idle_charge_max_mib']:.2f} MiB")
    print(f"(run files in {run})")


if __name__ == "__main__":
    main()
