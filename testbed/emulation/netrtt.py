"""The net check's round trips: the wire ping-pong with the agents' delay rule between two emulated
hosts, the round trip and jitter the spec promises, and the comparison (measured again while it
misses, as rates are)."""
from __future__ import annotations

import json
import statistics

from testbed.emulation.netprobe_run import _finish, _py, host_counters, host_disturbance

RTT_TOL, RTT_TOL_ABS_MS = 0.05, 0.3  # issue 16: every round trip within 5 % or 0.3 ms of the spec
JITTER_TOL, JITTER_TOL_ABS_MS = 0.3, 0.2  # the round trips' standard deviation vs the links' jitter
JITTER_SAMPLES = 100  # round trips per jittered path


def measure_rtt(net, src: str, dst: str, count: int = 20, port: int = 7301, emulate: bool = True) -> dict:
    """Wire ping-pong with the agents' delay rule (``node_agent.wire.release_time``: arrival less
    the connection's transit floor, plus the one-way delay and its jitter draw): the median round
    trip, the samples' spread, and the transit floors both ends credited. ``emulate=False``: the
    same probe with no transport delay (the probe's own cost: two Python processes, the stack)."""
    fwd, back = (net.transport_delay_s(src, dst), net.transport_delay_s(dst, src)) if emulate else (0.0, 0.0)
    jf, jb = (net.transport_jitter_s(src, dst), net.transport_jitter_s(dst, src)) if emulate else ((), ())
    server = _py(net, dst, ["_wire_server", str(port), repr(fwd), repr(net.path_rate_bytes_per_s(src, dst)),
                            json.dumps(jf)])
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"wire probe server on {dst} did not start: {server.stderr.read()[-300:]}")
        client = _py(net, src, ["_wire_client", net.host_ip(dst), str(port), repr(back), str(count),
                                repr(net.path_rate_bytes_per_s(dst, src)), json.dumps(jb)])
        rc, out, err = _finish(client, 30)
        if rc != 0:
            raise RuntimeError(f"wire probe {src}->{dst} failed: {err[-300:]}")
    finally:
        _finish(server, 5)
    got = json.loads(out)
    rtts = got["rtt_s"]
    q = statistics.quantiles(rtts, n=4) if len(rtts) > 1 else [0.0, 0.0, 0.0]
    # the spread as a standard deviation estimated from the interquartile range (IQR / 1.349): a few
    # late wake-ups of a busy machine do not inflate it as they inflate the sample deviation
    return {"rtt_ms": statistics.median(rtts) * 1e3, "rtt_min_ms": min(rtts) * 1e3, "samples": len(rtts),
            "rtt_stdev_ms": statistics.stdev(rtts) * 1e3 if len(rtts) > 1 else 0.0,
            "rtt_spread_ms": (q[2] - q[0]) / 1.349 * 1e3, "floors_ms": (got["floor_c"] + got["floor_s"]) * 1e3}


def path_rtt(net, src: str, dst: str, count: int, port: int, tries: int = 3) -> dict:
    """``path_rtt_once``, measured again while it misses the spec (round trip or jitter; at most
    ``tries`` runs): the run that met it, else the one closest on the round trip, with
    ``rtt_tries`` and each run's added round trip, spread and host disturbance (``rtt_runs``).
    A full suite here read two_tier's 4.017 ms e1<->e2 round trip 0.31 ms long (bound 0.30) once
    in two runs: the emulated and the probe round trips are medians taken apart, and late wake-ups
    in either move their difference; a delay configured wrong misses every run."""
    runs = []
    for _ in range(max(1, tries)):
        counters = host_counters()
        row = path_rtt_once(net, src, dst, count, port)
        runs.append((row, host_disturbance(counters)))
        if row["rtt_ok"] and row.get("jitter_ok", True):
            break
    best = min(runs, key=lambda r: (not (r[0]["rtt_ok"] and r[0].get("jitter_ok", True)),
                                    abs(r[0]["added_rtt_ms"] - r[0]["expected_rtt_ms"])))[0]
    return {**best, "rtt_tries": len(runs),
            "rtt_runs": [{"added_rtt_ms": r["added_rtt_ms"], "measured_jitter_ms": r["measured_jitter_ms"], **host}
                         for r, host in runs]}


def path_rtt_once(net, src: str, dst: str, count: int, port: int) -> dict:
    """The round trip src <-> dst against the spec. With the transport mechanism the measured RTT
    also holds the probe's own cost (two Python processes waking, parsing and replying: ~0.3 ms
    here), which a link does not add: it is measured on the same path without emulated delay, and
    the delay the links *add* — measured RTT - that probe RTT + the transit floors both receivers
    credited — is what is compared with the spec (with netem the delay is in the kernel: raw RTT)."""
    exp_j = expected_jitter_ms(net, src, dst)
    rtt = measure_rtt(net, src, dst, count=max(count, JITTER_SAMPLES) if exp_j else count, port=port)
    exp = expected_rtt_ms(net, src, dst)
    row = {"expected_rtt_ms": round(exp, 3), "measured_rtt_ms": round(rtt["rtt_ms"], 3),
           "expected_jitter_ms": round(exp_j, 3), "measured_jitter_ms": round(rtt["rtt_spread_ms"], 3)}
    added = rtt["rtt_ms"]
    if net.delay_mechanism == "transport":
        probe = measure_rtt(net, src, dst, count=count, port=port + 500, emulate=False)
        added = rtt["rtt_ms"] - probe["rtt_ms"] + rtt["floors_ms"]
        row["probe_rtt_ms"] = round(probe["rtt_ms"], 3)
    row["added_rtt_ms"] = round(added, 3)
    # with jitter the median of n round trips is itself uncertain (standard error ~1.25 sigma /
    # sqrt(n)): the tolerance never goes below three of those
    sampling = 3 * 1.2533 * exp_j / max(rtt["samples"], 1) ** 0.5
    row["rtt_ok"] = abs(added - exp) <= max(RTT_TOL * exp, RTT_TOL_ABS_MS, sampling)
    if exp_j:  # the spread within 30 % or 0.2 ms, and never less than three standard errors of the
        # IQR-based estimate (1.166 sigma / sqrt(n): 35 % at 100 samples)
        se = 1.166 * exp_j / max(rtt["samples"], 1) ** 0.5
        row["jitter_ok"] = abs(rtt["rtt_spread_ms"] - exp_j) <= max(JITTER_TOL * exp_j, JITTER_TOL_ABS_MS, 3 * se)
    return row


def _probe_frame_bytes(kind: str) -> int:
    from node_agent.wire import Frame

    return Frame({"type": kind, "seq": 99}, b"", 0.0, 0.0, 0.0).wire_bytes


def expected_rtt_ms(net, src: str, dst: str) -> float:
    """The round trip the agents' delay rule promises a probe: both one-way delays plus each
    frame's serialisation at its path's bottleneck rate — as the planners' cost model charges a
    transfer (bytes / bottleneck rate + delay). ~0.05 ms a direction at 5 Mbit/s."""
    return (net.one_way_delay_s(src, dst) + net.one_way_delay_s(dst, src)
            + _probe_frame_bytes("ping") / net.path_rate_bytes_per_s(src, dst)
            + _probe_frame_bytes("pong") / net.path_rate_bytes_per_s(dst, src)) * 1e3


def expected_jitter_ms(net, src: str, dst: str) -> float:
    """The round trip's standard deviation the links' jitter implies: every jittered hop both ways
    adds a uniform ±j draw (variance j²/3), independently."""
    hops = list(net.path_jitter_s(src, dst)) + list(net.path_jitter_s(dst, src))
    return sum(j * j / 3.0 for j in hops) ** 0.5 * 1e3
