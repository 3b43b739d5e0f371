"""The device-side helper of the SSH backend: runs ON a device, with only the standard library and
``testbed.core.cgroupfs`` — from the pushed bundle (``python -m testbed.backends.ssh.device COMMAND``)
or piped to the device's Python before there is one (``testbed.backends.ssh.helper``); JSON on stdout.

  check --interface IF [--modules M,...]   what the device offers: Python, memory, tc/ip/ping, netem,
                                           IFB (tried in a throwaway netns), cgroup version and
                                           whether we may write it, the interface's IPv4 address and
                                           whether it has an ingress qdisc or GRO on, whether systemd is
                                           PID 1 (recorded: its cgroups are made through cgroupfs
                                           all the same), missing Python modules
  kill --pid P --start-time S              SIGKILL P only if it is still the process that started at S
  rmcg PATH...                             kill what is left in our cgroup directories, remove them
  probe-recv --bind IP --port P            accept one TCP connection: echo its pings, count its bytes
  probe-send --to IP --port P --seconds S  a few 1-byte pings (RTT), then zeros for S seconds (rate)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from testbed.core.cgroupfs import V1_CPU, V1_MEMORY, remove_group, v1_usable, v2_root


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def cgroup_info() -> dict:
    """The usable hierarchy: v1 memory+cpu, or a v2 root offering both controllers."""
    if v1_usable():
        roots = {"memory": V1_MEMORY, "cpu": V1_CPU}
        return {"version": "v1", "roots": {k: str(v) for k, v in roots.items()},
                "writable": all(os.access(v, os.W_OK) for v in roots.values())}
    root = v2_root()
    if root is None:
        return {"version": None, "roots": {}, "writable": False}
    try:  # a child group only gets the controllers its parent delegates
        delegated = (root / "cgroup.subtree_control").read_text().split()
    except OSError:
        delegated = []
    return {"version": "v2", "roots": {"unified": str(root)}, "writable": os.access(root, os.W_OK),
            "delegated": "memory" in delegated and "cpu" in delegated}


def kernel_module(name: str) -> bool:
    """Loaded, built in, or loadable (``modprobe -n``)."""
    if Path(f"/sys/module/{name}").exists():
        return True
    probe = shutil.which("modprobe") or "/sbin/modprobe"
    try:
        return subprocess.run([probe, "-n", "-q", name], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def ifb_usable() -> bool:
    """Whether this kernel makes IFB devices and redirects ingress to them, tried for real inside a
    throwaway network namespace (``unshare -n``: nothing outlives the probe); a module list cannot
    tell (``ifb`` may be built in, and ``modprobe`` may be missing)."""
    script = ("ip link add hrprobe type ifb && ip link set dev lo up && tc qdisc add dev lo handle ffff: ingress"
              " && tc filter add dev lo parent ffff: protocol ip prio 1 u32 match ip src 127.0.0.1/32"
              " action mirred egress redirect dev hrprobe")
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return kernel_module("ifb")


def has_ingress_qdisc(dev: str) -> bool:
    try:
        out = subprocess.run(["tc", "qdisc", "show", "dev", dev, "ingress"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "ingress" in out


def gro_state(dev: str) -> str | None:
    """``on``/``off``: generic receive offload of ``dev`` (``ethtool -k``); None without ethtool."""
    try:
        out = subprocess.run(["ethtool", "-k", dev], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("generic-receive-offload:"):
            return line.split(":", 1)[1].split()[0]
    return None


def interface_addr(dev: str) -> str | None:
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", dev], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


def cmd_check(args) -> dict:
    mem = meminfo()
    mods = [m for m in args.modules.split(",") if m]
    return {"python": platform.python_version(), "uid": os.getuid(), "kernel": platform.release(),
            "mem_total_bytes": mem.get("MemTotal", 0), "mem_available_bytes": mem.get("MemAvailable", 0),
            "cpus": len(os.sched_getaffinity(0)),
            "tools": {t: shutil.which(t) for t in ("tc", "ip", "ping")},
            "netem": kernel_module("sch_netem"), "ifb": ifb_usable(), "cgroup": cgroup_info(),
            "interface_addr": interface_addr(args.interface), "ingress_qdisc": has_ingress_qdisc(args.interface),
            "gro": gro_state(args.interface), "systemd": Path("/run/systemd/system").is_dir(),
            "missing_modules": [m for m in mods if importlib.util.find_spec(m) is None]}


def start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def cmd_kill(args) -> dict:
    if start_time(args.pid) != args.start_time:
        return {"killed": False}
    os.kill(args.pid, signal.SIGKILL)
    for _ in range(200):
        if start_time(args.pid) != args.start_time:
            break
        time.sleep(0.01)
    return {"killed": True}


def cmd_rmcg(args) -> dict:
    try:
        return {"removed": [p for p in args.paths if remove_group(Path(p), tries=100)]}
    except OSError as exc:  # still busy: one line on stderr, exit 1
        raise SystemExit(str(exc)) from None


def cmd_probe_recv(args) -> dict:
    """Echo each ``p`` byte (RTT pings), then count the bytes after ``s`` until the sender closes."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.bind, args.port))
    srv.listen(1)
    srv.settimeout(args.timeout)
    print(json.dumps({"listening": True}), flush=True)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(args.timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := conn.recv(1)) == b"p":
        conn.sendall(b"p")
    total, t0, w0 = 0, time.monotonic(), time.time()
    while data := conn.recv(1 << 16):
        total += len(data)
    return {"bytes": total, "seconds": time.monotonic() - t0, "window_unix": [w0, time.time()]}


def cmd_probe_send(args) -> dict:
    sock = socket.create_connection((args.to, args.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(args.pings):
        t = time.monotonic()
        sock.sendall(b"p")
        sock.recv(1)
        rtts.append(time.monotonic() - t)
    sock.sendall(b"s")
    chunk, t0, sent = bytes(1 << 16), time.monotonic(), 0
    while time.monotonic() - t0 < args.seconds:
        sock.sendall(chunk)
        sent += len(chunk)
    sock.close()
    return {"bytes": sent, "rtt_s": sorted(rtts)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--interface", required=True)
    c.add_argument("--modules", default="")
    k = sub.add_parser("kill")
    k.add_argument("--pid", type=int, required=True)
    k.add_argument("--start-time", type=int, required=True)
    r = sub.add_parser("rmcg")
    r.add_argument("paths", nargs="+")
    pr = sub.add_parser("probe-recv")
    pr.add_argument("--bind", required=True)
    pr.add_argument("--port", type=int, required=True)
    pr.add_argument("--timeout", type=float, default=20.0)
    ps = sub.add_parser("probe-send")
    ps.add_argument("--to", required=True)
    ps.add_argument("--port", type=int, required=True)
    ps.add_argument("--seconds", type=float, default=0.5)
    ps.add_argument("--pings", type=int, default=5)
    args = ap.parse_args(argv)
    fn = {"check": cmd_check, "kill": cmd_kill, "rmcg": cmd_rmcg, "probe-recv": cmd_probe_recv,
          "probe-send": cmd_probe_send}[args.cmd]
    print(json.dumps(fn(args)), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
