"""``headroom net check``: bring a topology up, measure it against its spec, tear it down.

Per link direction: the achieved rate (a bounded iperf3 TCP run between two hosts whose path
crosses it, client and server inside host namespaces; a switch link is measured host-to-host and
compared with the path's bottleneck), the RTT (transport delay: a ``node_agent.wire`` ping-pong
whose receivers apply the delay table; netem: the same probe without transport delay) and, where
the spec asks for loss, a UDP loss run. Per host: the memory limit is proven by a probe placed in
the host's cgroup that allocates past it and must be OOM-killed; the CPU quota is read back.
Rates compare as L2 rates (goodput scaled by frame/payload size) within ±5 %; RTT within ±10 %
or 1 ms. The probes themselves run *inside* the hosts (``python -m testbed.emulation.netprobe``).
Round trips are measured by ``netrtt``; starting probes and reading the host's disturbance is
``netprobe_run``'s.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

RATE_TOL = 0.05
RATE_VERIFIABLE_MBPS = 300.0  # iperf3 through veth + HTB + bridge tops out at ~400-460 Mbit/s on this 2-core VM
L2_OVERHEAD = 14 + 20 + 20 + 12  # Ethernet + IPv4 + TCP + timestamp option, per MSS of payload

from testbed.emulation.netprobe_run import REPO, _finish, _py, host_counters, host_disturbance  # noqa: E402,F401
from testbed.emulation.netrtt import (RTT_TOL, RTT_TOL_ABS_MS, expected_jitter_ms,  # noqa: E402,F401
                                      expected_rtt_ms, measure_rtt, path_rtt, path_rtt_once)


def measure_rate_within(net, src: str, dst: str, expected_mbps: float, tol: float = RATE_TOL, tries: int = 3,
                        seconds: float = 2.0, port: int = 5201) -> dict:
    """``measure_rate``, re-measured while it misses ``expected_mbps`` by more than ``tol`` (at most
    ``tries`` runs): the closest reading, with ``tries`` and every run's rate and host disturbance
    in ``runs``. Full test suites here read a 5-50 Mbit/s direction 4-18 % short about once in 20
    runs (never alone, a different direction each time); a shaper configured wrong misses every run."""
    runs = []
    for _ in range(max(1, tries)):
        runs.append(measure_rate(net, src, dst, seconds, port))
        if abs(runs[-1]["l2_mbps"] - expected_mbps) <= tol * expected_mbps:
            break
    best = min(runs, key=lambda r: abs(r["l2_mbps"] - expected_mbps))
    return {**best, "tries": len(runs),
            "runs": [{"l2_mbps": round(r["l2_mbps"], 3), **r["host"]} for r in runs]}


def measure_rate(net, src: str, dst: str, seconds: float = 2.0, port: int = 5201) -> dict:
    """Bounded iperf3 TCP src -> dst; returns goodput and the L2 rate it implies (Mbit/s), and what
    disturbed the host meanwhile (``host``: ``host_disturbance``)."""
    counters = host_counters()
    server = net.popen_in_host(dst, ["iperf3", "-s", "-1", "-p", str(port)], cgroup=False,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for attempt in range(20):
            time.sleep(0.1)
            client = net.popen_in_host(src, ["iperf3", "-c", net.host_ip(dst), "-p", str(port), "-t", str(seconds),
                                             "-O", "1", "-J"], cgroup=False, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            rc, out, _ = _finish(client, seconds + 15)
            data = json.loads(out) if out.strip().startswith("{") else {}
            if rc == 0 and "end" in data:
                break
            if "refused" not in json.dumps(data.get("error", "")) + out:
                raise RuntimeError(f"iperf3 {src}->{dst} failed: {data.get('error', out[-300:])}")
        else:
            raise RuntimeError(f"iperf3 server on {dst} never came up")
    finally:
        _finish(server, 5)
    goodput = data["end"]["sum_received"]["bits_per_second"] / 1e6
    mss = data["start"].get("tcp_mss_default") or 1448
    return {"goodput_mbps": goodput, "l2_mbps": goodput * (mss + L2_OVERHEAD) / mss, "mss": mss,
            "retransmits": data["end"]["sum_sent"].get("retransmits"), "host": host_disturbance(counters)}


def path_queue_drops(net, src: str, dst: str) -> int:
    """Queue-overflow drops so far on every egress along src -> dst (a counter: subtract two
    readings). Separates congestion loss (a sender's burst overflowing a shallow queue) from the
    loss a link was asked for."""
    ends = [net._live(x, y).ends[x] for x, y in net.path(src, dst)]
    return sum(net.ex.queue_drops(end.dev, end.netns_pid) for end in ends)


def measure_loss(net, src: str, dst: str, rate_mbps: float, seconds: float = 2.0, port: int = 5301,
                 attempts: int = 3) -> dict:
    """Bounded iperf3 UDP src -> dst at ``rate_mbps``: the receiver's lost-datagram share, and the
    share the link's loss rule took (``rule_loss_pct``: lost less the queue-overflow drops counted
    on the path's egress queues while it ran — a sender stalled by the scheduler catches up in a
    burst that a 5 ms queue cannot hold; that is congestion, not the loss asked for).

    Each attempt has its own one-off server (a fresh port): iperf3 3.12 sets a UDP stream up with
    one datagram and its reply and never resends them, so with loss on the path a client now and
    then waits forever; it is killed after a bound and the next attempt starts clean."""
    errors = []
    for attempt in range(attempts):
        p = port + attempt
        server = net.popen_in_host(dst, ["iperf3", "-s", "-1", "-p", str(p)], cgroup=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3 + 0.3 * attempt)
            drops_before = path_queue_drops(net, src, dst)
            client = net.popen_in_host(src, ["iperf3", "-u", "-c", net.host_ip(dst), "-p", str(p), "-t", str(seconds),
                                             "-b", f"{rate_mbps}M", "-l", "1000", "-w", "2M", "-J"], cgroup=False,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            rc, out, err = _finish(client, seconds + 5)
            queue_drops = path_queue_drops(net, src, dst) - drops_before
        finally:
            _finish(server, 5)
        data = json.loads(out) if out.strip().startswith("{") else {}
        if "end" in data and "sum" in data["end"] and not data.get("error"):
            s = data["end"]["sum"]
            packets, lost = s.get("packets", 0), s.get("lost_packets", 0)
            rule = 100.0 * max(lost - queue_drops, 0) / max(packets - queue_drops, 1)
            return {"loss_pct": s.get("lost_percent", 0.0), "rule_loss_pct": round(rule, 3), "packets": packets,
                    "queue_drops": queue_drops, "attempts": attempt + 1, "failed_attempts": errors}
        errors.append(f"rc={rc} {data.get('error') or (err or out)[-200:].strip() or 'no output'}")
    raise RuntimeError(f"iperf3 UDP {src}->{dst} failed {attempts} times: " + "; ".join(errors))


def measure_memory(net, host: str, timeout_s: float = 60.0) -> dict:
    """A probe in the host's cgroup grows 1 MiB at a time until it is killed (or a safety cap);
    ``allocated_mib_at_kill`` is its resident size (interpreter included) at the last report."""
    g = net.cgroups[host]
    limit_mib = g.memory_limit() / 2**20
    before = g.oom_kills()
    p = net.popen_in_host(host, [sys.executable, "-m", "testbed.emulation.netprobe", "_alloc", str(int(limit_mib * 2 + 256))],
                          cgroup=True, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rc, out, _ = _finish(p, timeout_s)
    got = [int(x) for x in out.split()] or [0]
    kills = g.oom_kills() - before
    killed = rc == -9 or kills > 0
    return {"mem_limit_mib": limit_mib, "killed": killed, "returncode": rc, "allocated_mib_at_kill": got[-1],
            "oom_kills": kills, "ok": killed and 0.7 * limit_mib <= got[-1] <= limit_mib}


def _pairs_for(net, link) -> list[tuple[str, str, str, str]]:
    """(u, v, src, dst) per direction u->v of ``link``: the host pair whose path crosses it with the
    fastest other hops, so this link is the bottleneck whenever the topology allows."""
    hosts = list(net.hosts)
    out = []
    for u, v in ((link.spec.a, link.spec.b), (link.spec.b, link.spec.a)):
        best = None
        for s in hosts:
            for d in hosts:
                if s == d:
                    continue
                path = net.path(s, d)
                if (u, v) not in path:
                    continue
                others = min([net._live(x, y).state[x]["bandwidth_mbps"] for x, y in path if (x, y) != (u, v)],
                             default=float("inf"))
                key = (others, -len(path))
                if best is None or key > best[0]:
                    best = (key, s, d)
        if best:
            out.append((u, v, best[1], best[2]))
    return out


def check_link_direction(net, u: str, v: str, src: str, dst: str, seconds: float, port: int) -> dict:
    path = net.path(src, dst)
    rates = {(x, y): net._live(x, y).state[x]["bandwidth_mbps"] for x, y in path}
    expected = min(rates.values())
    bottleneck = "-".join(min(rates, key=rates.get))
    # a slow link needs a longer run for +-5 % (TCP's ramp and the report's 1 s granularity)
    dur = max(seconds, 2.0) if expected <= 20 else seconds
    # a miss is re-measured (``rate_tries``, ``measure_rate_within``), except above what this machine
    # can forward, where a shortfall is expected
    rate = measure_rate_within(net, src, dst, expected, RATE_TOL, 3 if expected <= RATE_VERIFIABLE_MBPS else 1,
                               dur, port)
    tries = rate["tries"]
    # above what this machine forwards through veth + HTB (~400-460 Mbit/s measured here), a
    # shortfall is the machine's, not the shaping's: reported as capped, not failed
    capped = expected > RATE_VERIFIABLE_MBPS and RATE_VERIFIABLE_MBPS <= rate["l2_mbps"] < expected * (1 - RATE_TOL)
    row = {"link": f"{u}->{v}", "pair": f"{src}->{dst}", "bottleneck": bottleneck,
           "expected_mbps": expected, "measured_mbps": round(rate["l2_mbps"], 3),
           "goodput_mbps": round(rate["goodput_mbps"], 3), "rate_tries": tries, "rate_runs": rate["runs"],
           "rate_ok": capped or abs(rate["l2_mbps"] - expected) <= RATE_TOL * expected, "rate_capped": capped,
           **path_rtt(net, src, dst, 20, port + 1000), "mechanism": net.delay_mechanism}
    loss = net.path_loss(src, dst) * 100
    if loss > 0:
        got = measure_loss(net, src, dst, expected * 0.5, seconds, port + 100)
        n = max(got["packets"] - got["queue_drops"], 1)
        sigma = 100 * ((loss / 100) * (1 - loss / 100) / n) ** 0.5
        row.update(expected_loss_pct=round(loss, 3), measured_loss_pct=got["rule_loss_pct"],
                   end_to_end_loss_pct=got["loss_pct"], queue_drops=got["queue_drops"],
                   loss_ok=abs(got["rule_loss_pct"] - loss) <= max(3 * sigma, 0.2))
    return row


def _host_pairs(net) -> list[tuple[str, str]]:
    hosts = list(net.hosts)
    return [(a, b) for i, a in enumerate(hosts) for b in hosts[i + 1:]]


def check_path(net, src: str, dst: str, port: int) -> dict:
    """The round trip src <-> dst over its routed path against the spec (``path_rtt``)."""
    return {"pair": f"{src}<->{dst}", "hops": len(net.path(src, dst)), **path_rtt(net, src, dst, 20, port)}


def bringup_check(net, count: int = 10) -> dict:
    """What an emulated run records of its network at bring-up: per link direction the spec and the
    rate read back from tc, and the round trip source <-> every other host over its routed path
    (the wire probe, ``count`` samples) against the spec. Every link of a star lies on one of those
    paths. Cheap (~1 s a host), so every run carries its own measured network."""
    source = net.topology.source
    links = []
    for link in net.links:
        back = net.read_link(link.spec.a, link.spec.b)
        for u, v in ((link.spec.a, link.spec.b), (link.spec.b, link.spec.a)):
            st, got = link.state[u], back[f"{u}->{v}"]
            links.append({"link": f"{u}->{v}", "spec_mbps": st["bandwidth_mbps"], "tc_mbps": got["bandwidth_mbps"],
                          "delay_ms": st["delay_ms"], "jitter_ms": st["jitter_ms"], "loss_pct": st["loss_pct"]})
    paths = [{"pair": f"{source}<->{h}", "hops": len(net.path(source, h)),
              **path_rtt(net, source, h, count, 9101 + 2 * i)}
             for i, h in enumerate(x for x in net.hosts if x != source)]
    return {"mechanism": net.delay_mechanism, "links": links, "paths": paths}


def run_net_check(topology, json: bool = False, rate_seconds: float = 2.0, run_id: Optional[str] = None,
                  manifest_path: Optional[str] = None, links: Optional[list] = None, memory: bool = True,
                  cpu_emulation: str = "cfs", compute=None, paths: bool = True) -> dict:
    """Bring ``topology`` up, measure, always tear down; returns the report (``ok`` inside).

    Per link direction (``links``: only these): rate, RTT, jitter, loss on a host pair whose path
    it bottlenecks; per pair of hosts (``paths``): the round trip over the routed path, every hop's
    delay and jitter included (multi-hop paths are where a per-hop error would add up); per host
    (``memory``): the OOM probe and the CPU quota.

    ``cpu_emulation`` is how the hosts' cgroups are set (``testbed.emulation.cpu``; the paced modes
    relax them, so the check expects the relaxed figure); ``compute(net, manifest, run_dir)``, if
    given, runs last on the live network and its dict (with ``ok``) becomes the report's ``compute``
    (the CLI passes ``testbed.backends.emulated.computecheck.compute_fidelity``)."""
    from testbed.emulation import cpu as cpu_modes
    from testbed.emulation.cleanup import Manifest
    from testbed.emulation.network import EmulatedNetwork

    run_id = run_id or f"check-{uuid.uuid4().hex[:8]}"
    manifest = Manifest(manifest_path or f"/tmp/headroom-{run_id}/resources.jsonl")
    report: dict = {"topology": topology.name, "run_id": run_id, "links": [], "hosts": []}
    with EmulatedNetwork(topology, run_id, manifest, delay_consumer="wire-probe", cpu_emulation=cpu_emulation) as net:
        report["delay_mechanism"] = net.delay_mechanism
        report["loss_mechanism"] = "netem" if net.delay_mechanism == "netem" else "iptables-statistic"
        report["guard_route"] = f"unreachable {topology.subnet} metric {net.route_metric}"
        port = 5201
        for link in net.links:
            if links is not None and (link.spec.a, link.spec.b) not in links:
                continue
            for u, v, src, dst in _pairs_for(net, link):
                report["links"].append(check_link_direction(net, u, v, src, dst, rate_seconds, port))
                port += 2
        report["paths"] = [check_path(net, s, d, 9001 + i) for i, (s, d) in enumerate(_host_pairs(net))] \
            if paths else []
        for h in topology.hosts if memory else ():
            want = cpu_modes.cgroup_cpu(cpu_emulation, h.cpu_cores)[0]
            row = {"host": h.name, **measure_memory(net, h.name), "cpu_cores": net.cgroups[h.name].cpu_cores(),
                   "spec_cpu_cores": h.cpu_cores, "cgroup_cpu_cores_expected": want}
            row["ok"] = row["ok"] and abs(row["cpu_cores"] - want) < 1e-3
            report["hosts"].append(row)
        if compute is not None:
            report["compute"] = compute(net, manifest, Path(manifest.path).parent)
    report["ok"] = all(r["rate_ok"] and r["rtt_ok"] and r.get("loss_ok", True) and r.get("jitter_ok", True)
                       for r in report["links"]) and all(r["rtt_ok"] and r.get("jitter_ok", True) for r in report["paths"]) and \
        all(r["ok"] for r in report["hosts"]) and report.get("compute", {}).get("ok", True)
    if not json:
        from testbed.emulation.netreport import print_report

        print_report(report)
    return report


def net_check(path_or_spec, as_json: bool = False, cpu_emulation: str = "cfs", compute=None) -> tuple[bool, dict]:
    """CLI entry: a topology path (or spec, or an experiment whose topology is used)."""
    from testbed.spec.loader import load_any
    from testbed.spec.schema import TopologySpec

    spec = path_or_spec if not isinstance(path_or_spec, (str, Path)) else load_any(path_or_spec)
    if not isinstance(spec, TopologySpec):
        spec = spec.topology
    report = run_net_check(spec, json=as_json, cpu_emulation=cpu_emulation, compute=compute)
    return report["ok"], report
