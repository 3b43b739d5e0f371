"""Bring-up measurement of the real network between SSH devices: for each ordered device pair, a
few 1-byte TCP round trips (RTT) and a short bulk transfer (rate), run by the device helper on the
devices themselves (``probe-recv`` / ``probe-send``) — the orchestrator sends no probe traffic.
The figures go to the manifest beside what the topology declares for the routed path."""
from __future__ import annotations

import json
import time

from testbed.backends.ssh.transport import DeviceError

PROBE_SECONDS = 0.3


def helper_argv(fleet, h: str, args: list[str]) -> list[str]:
    """The device helper from the pushed bundle, as an argv for ``h``."""
    return ["env", f"PYTHONPATH={fleet.bundle_dir(h)}", fleet.device_python(h), "-m", "testbed.backends.ssh.device",
            *args]


def _read_line(chan, timeout_s: float) -> str:
    buf, deadline = b"", time.monotonic() + timeout_s
    while not buf.endswith(b"\n"):
        if chan.recv_ready():
            buf += chan.recv(1)
        elif chan.exit_status_ready() or time.monotonic() > deadline:
            err = chan.recv_stderr(4096).decode(errors="replace").strip() if chan.recv_stderr_ready() else ""
            raise DeviceError(f"probe receiver did not start: {err or 'no output'}")
        else:
            time.sleep(0.002)
    return buf.decode()


def measure_pair(fleet, src: str, dst: str, port: int | None = None, seconds: float = PROBE_SECONDS) -> dict:
    """RTT and TCP rate ``src`` -> ``dst``, measured by the devices (``port``: the receiver's, by
    default ``data_port + 1``; pairs measured at once need their own)."""
    port = port or fleet.inventory.data_port + 1
    rx = fleet.conns[dst].start(helper_argv(fleet, dst, ["probe-recv", "--bind", fleet.host_ip(dst), "--port",
                                                          str(port), "--timeout", "20"]))
    try:
        _read_line(rx, 30.0)
        sent = json.loads(fleet.conns[src].run(helper_argv(fleet, src, [
            "probe-send", "--to", fleet.host_ip(dst), "--port", str(port), "--seconds", str(seconds)]),
            timeout_s=60).out.strip().splitlines()[-1])
        got = json.loads(_read_line(rx, 30.0))
    finally:
        rx.close()
    rtt = sent["rtt_s"]
    rate = got["bytes"] * 8 / got["seconds"] / 1e6 if got["seconds"] > 0 else None
    return {"rtt_ms_median": 1e3 * rtt[len(rtt) // 2], "rtt_ms_min": 1e3 * rtt[0], "rate_mbps": rate,
            "rx_bytes": got["bytes"], "rx_seconds": got["seconds"], "rx_window_unix": got["window_unix"]}


def measure_paths(fleet) -> dict[str, dict]:
    """``"a->b"`` -> measured RTT and rate, with the declared path's bottleneck rate and RTT."""
    out = {}
    for a in fleet.hosts():
        for b in fleet.hosts():
            if a == b:
                continue
            m = measure_pair(fleet, a, b)
            m["declared_rate_mbps"] = fleet.path_rate_bytes_per_s(a, b) * 8 / 1e6
            m["declared_rtt_ms"] = 1e3 * (fleet.one_way_delay_s(a, b) + fleet.one_way_delay_s(b, a))
            # < 1: the real path is slower than the topology says (the planners use the declared figure)
            m["rate_vs_declared"] = m["rate_mbps"] / m["declared_rate_mbps"] if m["rate_mbps"] else None
            out[f"{a}->{b}"] = m
    return out



