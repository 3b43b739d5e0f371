"""``headroom net check``'s printed report: per link direction, per host pair and per host, spec
against measured (rich tables), and the paced agents' compute fidelity."""
from __future__ import annotations

import sys


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    mark = {True: "[green]ok[/]", False: "[red]FAIL[/]"}
    t = Table(title=f"{report['topology']}: links (delay via {report['delay_mechanism']})")
    for col in ("link", "pair", "bottleneck", "spec Mbit/s", "L2 Mbit/s", "goodput", "rate",
                "spec RTT ms", "RTT ms (raw)", "added by links", "rtt", "jitter ms (spec/meas)", "loss % (spec/meas)"):
        t.add_column(col)
    for r in report["links"]:
        loss = f"{r['expected_loss_pct']}/{r['measured_loss_pct']:.2f} {mark[r['loss_ok']]}" if "loss_ok" in r else "-"
        jit = f"{r['expected_jitter_ms']:.2f}/{r['measured_jitter_ms']:.2f} {mark[r['jitter_ok']]}" if "jitter_ok" in r \
            else f"-/{r.get('measured_jitter_ms', 0):.2f}"
        t.add_row(r["link"], r["pair"], r["bottleneck"], f"{r['expected_mbps']:g}", f"{r['measured_mbps']:.2f}",
                  f"{r['goodput_mbps']:.2f}", mark[r["rate_ok"]] + (" (machine cap)" if r.get("rate_capped") else ""),
                  f"{r['expected_rtt_ms']:.2f}", f"{r['measured_rtt_ms']:.2f}", f"{r['added_rtt_ms']:.2f}",
                  mark[r["rtt_ok"]], jit, loss)
    p = Table(title="host pairs: round trips over the routed path")
    for col in ("pair", "hops", "spec RTT ms", "RTT ms (raw)", "probe alone", "added by links", "jitter ms (spec/meas)", "ok"):
        p.add_column(col)
    for r in report.get("paths", []):
        jit = f"{r['expected_jitter_ms']:.2f}/{r['measured_jitter_ms']:.2f}"
        p.add_row(r["pair"], str(r["hops"]), f"{r['expected_rtt_ms']:.2f}", f"{r['measured_rtt_ms']:.2f}",
                  f"{r.get('probe_rtt_ms', 0):.2f}", f"{r['added_rtt_ms']:.2f}", jit, mark[r["rtt_ok"] and r.get("jitter_ok", True)])
    h = Table(title="hosts")
    for col in ("host", "limit MiB", "killed at MiB", "oom kills", "cpu cores", "ok"):
        h.add_column(col)
    for r in report["hosts"]:
        h.add_row(r["host"], f"{r['mem_limit_mib']:.0f}", str(r["allocated_mib_at_kill"]), str(r["oom_kills"]),
                  f"{r['cpu_cores']:g}", mark[r["ok"]])
    console = Console() if sys.stdout.isatty() else Console(width=200)  # a log keeps every column
    console.print(t)
    console.print(p)
    console.print(h)
    if "compute" in report:
        console.print(_compute_table(report["compute"], mark))
    console.print(f"overall: {mark[report['ok']]}")


def _compute_table(comp: dict, mark: dict):
    from rich.table import Table

    m = comp.get("machine") or {}
    c = Table(title=f"compute fidelity ({comp['model']}, {comp['cpu_emulation']}; this machine: "
                    f"{m.get('bytes_per_s', 0) / 1e9:.1f} GB/s, {m.get('call_s', 0) * 1e6:.0f} us/call)")
    for col in ("host", "cpu cores", "device GB/s", "device us/call", "device step ms", "paced step ms",
                "paced/device", "p95/p50", "same-cores spread", "ok"):
        c.add_column(col)
    for r in comp["hosts"]:
        f = lambda v, k=1.0, d=3: "-" if v is None else f"{v * k:.{d}f}"  # noqa: E731
        c.add_row(r["host"], f"{r['cpu_cores']:g}", f(r["device_bytes_per_s"], 1e-9, 2), f(r["device_call_s"], 1e6, 0),
                  f(r["device_step_s"], 1e3), f(r["step_median_s"], 1e3), f(r["step_over_device"]),
                  f(r["step_p95_over_median"]), f"{r['same_cores_spread']:.1%}",
                  mark[r["ok"]] + (" (full core: reported)" if r["full_core"] else ""))
    return c
