"""Command builders for links, queues, routes and loss rules (pure: they return argv lists), plus
the one executor that runs them, checks return codes and reads shaping state back.

Builders never touch the system and are unit-tested without root. Everything that changes the
kernel goes through ``Executor.run``; commands for a host's namespace are wrapped with
``in_netns(pid, argv)`` (nsenter into ``/proc/PID/ns/net``). Rates are bits per second here;
queue limits and MTU are bytes.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence
from testbed.core.errors import BackendError

MTU_FRAME_BYTES = 1514          # Ethernet frame carrying a 1500-byte IP packet (no FCS)
QUEUE_TARGET_S = 0.005          # leaf queue holds about this much time at the class rate
MIN_QUEUE_PACKETS = 4           # ...but never fewer full frames than this
HTB_HANDLE = "1:"
HTB_CLASS = "1:1"
LEAF_HANDLE = "10:"


class ShapingError(BackendError):
    """A tc/ip/iptables command failed or the kernel state read back differs from what was asked."""


# --------------------------------------------------------------------------- argv builders
def in_netns(pid: Optional[int], argv: Sequence[str]) -> list[str]:
    """Run ``argv`` inside the network namespace of ``pid`` (root namespace when pid is None)."""
    if pid is None:
        return list(argv)
    return ["nsenter", "-t", str(int(pid)), "-n", "--", *argv]


def veth_add(dev: str, peer: str, peer_netns_pid: Optional[int] = None,
             dev_netns_pid: Optional[int] = None) -> list[str]:
    argv = ["ip", "link", "add", "name", dev]
    if dev_netns_pid is not None:
        argv += ["netns", str(int(dev_netns_pid))]
    argv += ["type", "veth", "peer", "name", peer]
    if peer_netns_pid is not None:
        argv += ["netns", str(int(peer_netns_pid))]
    return argv


def link_del(dev: str) -> list[str]:
    return ["ip", "link", "del", "dev", dev]


def link_set_state(dev: str, up: bool) -> list[str]:
    return ["ip", "link", "set", "dev", dev, "up" if up else "down"]


def bridge_add(name: str) -> list[str]:
    # no STP, forward immediately: the switch graph must be a tree (checked by the network)
    return ["ip", "link", "add", "name", name, "type", "bridge", "stp_state", "0", "forward_delay", "0"]


def link_master(dev: str, bridge: str) -> list[str]:
    return ["ip", "link", "set", "dev", dev, "master", bridge]


def gso_limit(dev: str) -> list[str]:
    """One MTU-sized packet per skb so that a queue of N bytes means N bytes, not 64 KiB super-packets."""
    return ["ip", "link", "set", "dev", dev, "gso_max_segs", "1"]


def offloads_off(dev: str) -> list[str]:
    return ["ethtool", "-K", dev, "tso", "off", "gso", "off"]


def addr_add(dev: str, cidr: str) -> list[str]:
    return ["ip", "addr", "add", cidr, "dev", dev]


def route_batch(routes: Sequence[tuple[str, str, Optional[str]]], replace: bool = False) -> str:
    """``ip -batch -`` input: one ``route add|replace DST dev DEV [via GW onlink]`` line per route."""
    lines = []
    verb = "replace" if replace else "add"
    for dst, dev, gw in routes:
        line = f"route {verb} {dst} dev {dev}"
        if gw is not None:
            line += f" via {gw} onlink"
        lines.append(line)
    return "\n".join(lines) + "\n"


def ip_batch() -> list[str]:
    return ["ip", "-batch", "-"]


def sysctl_set(key: str, value: str) -> list[str]:
    return ["sysctl", "-q", "-w", f"{key}={value}"]


def unreachable_route(subnet: str, metric: int, delete: bool = False) -> list[str]:
    """Root-namespace guard: emulated addresses are unreachable from here, never sent out eth0.

    Each network uses its own metric so that concurrent networks on one subnet do not collide
    and each removes exactly its own route."""
    return ["ip", "route", "del" if delete else "add", "unreachable", subnet, "metric", str(int(metric))]


def queue_limit_bytes(rate_bps: float) -> int:
    """Byte limit of the leaf FIFO: ~QUEUE_TARGET_S of traffic at the rate, at least a few frames."""
    return max(MIN_QUEUE_PACKETS * MTU_FRAME_BYTES, int(rate_bps / 8 * QUEUE_TARGET_S))


def htb_quantum(rate_bps: float) -> int:
    return int(min(60000, max(MTU_FRAME_BYTES, rate_bps / 8 / 10)))


def _rate(rate_bps: float) -> str:
    return f"{int(round(rate_bps))}bit"


def htb_root(dev: str) -> list[str]:
    return ["tc", "qdisc", "replace", "dev", dev, "root", "handle", HTB_HANDLE, "htb", "default", "1"]


def htb_class(dev: str, rate_bps: float, change: bool = False) -> list[str]:
    """The single shaping class; ``change=True`` alters it in place (no qdisc rebuild, no glitch)."""
    return ["tc", "class", "change" if change else "add", "dev", dev, "parent", HTB_HANDLE,
            "classid", HTB_CLASS, "htb", "rate", _rate(rate_bps), "ceil", _rate(rate_bps),
            "quantum", str(htb_quantum(rate_bps))]


def leaf_queue(dev: str, rate_bps: float, change: bool = False) -> list[str]:
    return ["tc", "qdisc", "change" if change else "add", "dev", dev, "parent", HTB_CLASS,
            "handle", LEAF_HANDLE, "bfifo", "limit", str(queue_limit_bytes(rate_bps))]


def netem_qdisc(dev: str, delay_ms: float, loss_pct: float, change: bool = False, jitter_ms: float = 0.0) -> list[str]:
    """netem as the leaf under the HTB class (used only where the kernel has it); jitter uniform
    (netem's default distribution), uncorrelated."""
    argv = ["tc", "qdisc", "change" if change else "add", "dev", dev, "parent", HTB_CLASS,
            "handle", LEAF_HANDLE, "netem", "delay", f"{delay_ms}ms"]
    if jitter_ms > 0:
        argv += [f"{jitter_ms}ms"]
    if loss_pct > 0:
        argv += ["loss", f"{loss_pct}%"]
    return argv


def shape_commands(dev: str, rate_bps: float) -> list[list[str]]:
    """Fresh shaping of one veth end's egress: GSO off, HTB root + class, byte-limited leaf."""
    return [gso_limit(dev), htb_root(dev), htb_class(dev, rate_bps), leaf_queue(dev, rate_bps)]


def tc_class_show(dev: str) -> list[str]:
    return ["tc", "class", "show", "dev", dev]


def tc_qdisc_show(dev: str) -> list[str]:
    return ["tc", "qdisc", "show", "dev", dev]


def link_show(dev: str) -> list[str]:
    return ["ip", "-o", "link", "show", "dev", dev]


def iptables_loss_restore(rules: Sequence[tuple[str, float]]) -> str:
    """``iptables-restore --noflush`` input dropping a random share of packets from each source.

    ``rules`` are ``(source_ip, probability)``; rules go into the *receiving* host's INPUT chain so
    the dropped packets did cross every link (and used its capacity), as a real loss would."""
    lines = ["*filter"]
    for src, p in rules:
        lines.append(iptables_loss_rule(src, p))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def iptables_loss_rule(src_ip: str, probability: float) -> str:
    if not 0 < probability <= 1:
        raise ValueError(f"loss probability must be in (0, 1], got {probability}")
    return (f"-A INPUT -s {src_ip}/32 -m statistic --mode random --probability {probability:.6f} "
            f"-m comment --comment headroom-loss -j DROP")


def iptables_restore() -> list[str]:
    return ["iptables-restore", "--noflush"]


def iptables_delete(rule: str) -> list[str]:
    """Delete a rule given in ``-A CHAIN ...`` form (as recorded in the manifest)."""
    parts = rule.split()
    if not parts or parts[0] != "-A":
        raise ValueError(f"not an append rule: {rule!r}")
    return ["iptables", "-D", *_unquote(parts[1:])]


def _unquote(parts: list[str]) -> list[str]:
    return [p.strip('"') for p in parts]


# --------------------------------------------------------------------------- parsing
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def parse_rate(text: str) -> float:
    """tc's ``10Mbit`` / ``500Kbit`` / ``12bit`` -> bits per second."""
    m = re.fullmatch(r"([0-9.]+)([KMGT]?bit)", text.strip(), flags=re.I)
    if not m:
        raise ValueError(f"not a tc rate: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_htb_class(output: str, classid: str = HTB_CLASS) -> Optional[dict]:
    """Rate and ceil (bit/s) of one HTB class from ``tc class show`` text."""
    for line in output.splitlines():
        m = re.search(rf"class htb {re.escape(classid)} .*?rate (\S+) ceil (\S+)", line)
        if m:
            return {"rate_bps": parse_rate(m.group(1)), "ceil_bps": parse_rate(m.group(2))}
    return None


def parse_leaf(output: str) -> Optional[dict]:
    """Kind and byte limit of the leaf qdisc from ``tc qdisc show`` text."""
    for line in output.splitlines():
        m = re.search(rf"qdisc (\S+) {re.escape(LEAF_HANDLE)} parent {re.escape(HTB_CLASS)}(.*)", line)
        if m:
            lim = re.search(r"limit (\d+)(b?)", m.group(2))
            return {"kind": m.group(1), "limit": int(lim.group(1)) if lim else None}
    return None


def parse_leaf_drops(output: str) -> int:
    """Packets the leaf FIFO dropped (queue overflow), from ``tc -s qdisc show`` text."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if re.search(rf"qdisc \S+ {re.escape(LEAF_HANDLE)} parent {re.escape(HTB_CLASS)}", line):
            for stat in lines[i + 1:i + 3]:
                m = re.search(r"dropped (\d+)", stat)
                if m:
                    return int(m.group(1))
    return 0


def parse_link_up(output: str) -> bool:
    m = re.search(r"<([^>]*)>", output)
    return bool(m) and "UP" in m.group(1).split(",")


# --------------------------------------------------------------------------- executor
@dataclass
class Result:
    argv: list[str]
    stdout: str
    stderr: str
    returncode: int


class Executor:
    """Runs built commands, raising ``ShapingError`` with the command and stderr on failure."""

    def __init__(self, timeout_s: float = 20.0, log: Optional[list] = None):
        self.timeout_s = timeout_s
        self.log = log  # optional list collecting every argv run (for manifests and debugging)

    def run(self, argv: Sequence[str], netns_pid: Optional[int] = None, input: Optional[str] = None,
            check: bool = True) -> Result:
        full = in_netns(netns_pid, argv)
        if self.log is not None:
            self.log.append(full)
        proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout_s)
        res = Result(full, proc.stdout, proc.stderr, proc.returncode)
        if check and proc.returncode != 0:
            raise ShapingError(f"{' '.join(full)} -> exit {proc.returncode}: {proc.stderr.strip()}")
        return res

    def read_shaping(self, dev: str, netns_pid: Optional[int] = None) -> dict:
        """Read back what the kernel actually applies on one device's egress."""
        cls = parse_htb_class(self.run(tc_class_show(dev), netns_pid).stdout)
        leaf = parse_leaf(self.run(tc_qdisc_show(dev), netns_pid).stdout)
        up = parse_link_up(self.run(link_show(dev), netns_pid).stdout)
        if cls is None:
            raise ShapingError(f"{dev}: no HTB class {HTB_CLASS} found")
        return {"dev": dev, "rate_bps": cls["rate_bps"], "ceil_bps": cls["ceil_bps"],
                "leaf": leaf, "up": up}

    def queue_drops(self, dev: str, netns_pid: Optional[int] = None) -> int:
        """Overflow drops of the device's leaf queue so far (a counter; compare two readings)."""
        return parse_leaf_drops(self.run(["tc", "-s", "qdisc", "show", "dev", dev], netns_pid).stdout)

    def netem_available(self) -> bool:
        """Try netem on a scratch veth pair created and deleted here (root namespace, never up)."""
        import os

        dev, peer = f"hrnp{os.getpid() % 100000}", f"hrnq{os.getpid() % 100000}"
        try:
            self.run(veth_add(dev, peer))
        except ShapingError:
            return False
        try:
            res = self.run(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"], check=False)
            return res.returncode == 0
        finally:
            self.run(link_del(dev), check=False)
