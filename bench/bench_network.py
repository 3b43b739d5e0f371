"""Bring-up / tear-down time of emulated networks with 8, 32 and 64 hosts (star, or two-tier with
8 hosts per edge switch), and achieved rate on a bounded sample of links.

    sudo .venv/bin/python bench/bench_network.py [--sizes 8 32 64] [--shape star|two-tier] [--samples 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.emulation.cleanup import Manifest, read_manifest  # noqa: E402
from testbed.emulation.netcheck import measure_rate  # noqa: E402
from testbed.emulation.network import EmulatedNetwork  # noqa: E402
from testbed.spec.schema import TopologySpec  # noqa: E402

RATES = (10, 20, 50)


def make_topology(n: int, shape: str) -> TopologySpec:
    hosts = [{"name": f"h{i + 1}", "mem_limit_mib": 256, "cpu_cores": 0.1, "source": i == 0} for i in range(n)]
    if shape == "star":
        switches = ["s1"]
        links = [{"a": f"h{i + 1}", "b": "s1", "bandwidth_mbps": RATES[i % 3], "delay_ms": 1} for i in range(n)]
    else:
        edges = (n + 7) // 8
        switches = ["core"] + [f"e{k}" for k in range(edges)]
        links = [{"a": f"e{k}", "b": "core", "bandwidth_mbps": 100, "delay_ms": 5} for k in range(edges)]
        links += [{"a": f"h{i + 1}", "b": f"e{i // 8}", "bandwidth_mbps": RATES[i % 3], "delay_ms": 1}
                  for i in range(n)]
    return TopologySpec.model_validate({"name": f"{shape}{n}", "hosts": hosts, "switches": switches,
                                        "links": links, "subnet": "10.0.0.0/16"})


def bench_one(n: int, shape: str, samples: int, seconds: float) -> dict:
    topo = make_topology(n, shape)
    manifest = Manifest(Path(tempfile.mkdtemp(prefix="hr-bench-")) / "resources.jsonl")
    net = EmulatedNetwork(topo, f"bench{uuid.uuid4().hex[:4]}", manifest, delay_consumer="bench")
    t0 = time.perf_counter()
    net.start()
    up_s = time.perf_counter() - t0
    rows = []
    try:
        # sample: the slowest and fastest host links, sent from a 50 Mbit/s host (h3) so they bottleneck
        picks = [h for h in ("h2", f"h{n - 1}", "h4", f"h{n}") if h != "h3"][:samples]
        for k, dst in enumerate(picks):
            expected = min(net.read_link(u, v)[f"{u}->{v}"]["bandwidth_mbps"] for u, v in net.path("h3", dst))
            got = measure_rate(net, "h3", dst, seconds=seconds, port=5201 + k)
            rows.append((f"h3->{dst}", expected, got["l2_mbps"]))
    finally:
        t1 = time.perf_counter()
        net.stop()
        down_s = time.perf_counter() - t1
    left = [e for e in read_manifest(manifest.path) if e["kind"] == "bridge"]
    return {"hosts": n, "shape": shape, "up_s": up_s, "down_s": down_s, "rates": rows, "bridges": len(left)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--shape", choices=["star", "two-tier"], default="two-tier")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    print(f"{'hosts':>5} {'shape':>8} {'up s':>7} {'down s':>7}  sampled rates (spec -> L2 measured Mbit/s)")
    for n in args.sizes:
        r = bench_one(n, args.shape, args.samples, args.seconds)
        rates = ", ".join(f"{p}: {s:g}->{m:.2f} ({100 * (m - s) / s:+.1f}%)" for p, s, m in r["rates"])
        print(f"{n:>5} {r['shape']:>8} {r['up_s']:>7.2f} {r['down_s']:>7.2f}  {rates}", flush=True)


if __name__ == "__main__":
    main()
