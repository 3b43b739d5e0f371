"""tc shaping on real devices' interfaces for links that ask for it (``shape: true``).

Mechanism (recorded in the manifest as ``ssh_shaping``). Every shaped hop direction is enforced
exactly once, at a device that terminates it where one does:

- the hop *into* a device (the switch -> device direction of its link, the last hop of every path
  to it) is shaped at that device's **ingress**: its interface's ingress qdisc redirects the
  packets from the run's peers (u32 on the source address, ``mirred``) to an IFB device, where an
  HTB class per such link holds the link's rate. All senders share that class, so two senders to
  one receiver contend for its downlink as they would on the real link. (``ingress_shaping:
  senders`` in the inventory keeps the older mechanism below for this hop too: no IFB needed, but
  no contention.)
- the other shaped hops of a path (the sender's uplink, switch–switch links) are shaped at the
  sender's **egress**: one HTB class per distinct set of such hops, at their bottleneck, the peers
  whose paths cross exactly that set filtered into it by address (u32). On a star every peer's
  path leaves through the same shaped uplink, so they share its one class as on the real link;
  paths that also cross a shaped switch–switch link get a class of their own (those two classes
  do not contend for the uplink).

Why IFB rather than per-path classes at the senders: the receiver is the one place that sees all
traffic crossing its downlink, so only there can the shared rate be enforced; the redirect takes
only the peers' packets, so SSH and anything else never crosses the IFB. GRO is turned off on that
interface for the run (its merged packets, up to 64 KiB, would not fit the leaf's few-frame FIFO;
journalled, turned back on at tear-down). Leaves are byte-limited FIFOs — or netem, for delay/loss,
where the device's kernel has it. Traffic to anyone else takes unshaped default classes. Without
netem the added delay is applied by the agents' receivers (``transport``, as the emulated backend
does; cross-device clocks must then be synchronised), and loss on a shaped link is refused. Changes
go in place (``tc class change``) and are read back from the kernel. Every qdisc and IFB device is
journalled before it exists; ``clean`` removes them.
"""
from __future__ import annotations

import hashlib

from testbed.backends.ssh.transport import DeviceError
from testbed.core.errors import BackendError
from testbed.emulation.shaping import _rate, htb_quantum, parse_htb_class, queue_limit_bytes

DEFAULT_RATE_BPS = 10e9  # the unshaped class: everything that is not a shaped path
FIRST_MINOR = 10


# --------------------------------------------------------------------------- pure command builders
def root_commands(dev: str) -> list[list[str]]:
    """HTB at the root (whatever root qdisc was there goes; tear-down deletes ours, and the kernel
    puts its default back) with the unshaped default class."""
    return [["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
            ["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", _rate(DEFAULT_RATE_BPS)]]


def class_command(dev: str, minor: int, rate_bps: float, change: bool = False) -> list[str]:
    return ["tc", "class", "change" if change else "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}",
            "htb", "rate", _rate(rate_bps), "ceil", _rate(rate_bps), "quantum", str(htb_quantum(rate_bps))]


def leaf_command(dev: str, minor: int, rate_bps: float, netem: tuple[float, float] | None,
                 change: bool = False) -> list[str]:
    head = ["tc", "qdisc", "change" if change else "add", "dev", dev, "parent", f"1:{minor}", "handle", f"{minor}:"]
    if netem is None:
        return head + ["bfifo", "limit", str(queue_limit_bytes(rate_bps))]
    delay_ms, loss_pct = netem
    return head + ["netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%", "limit", "1000"]


def filter_command(dev: str, minor: int, ip: str, field: str = "dst") -> list[str]:
    """Classify packets whose ``field`` (``dst`` on an egress, ``src`` on an IFB) is ``ip`` into 1:minor."""
    return ["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", field, f"{ip}/32", "flowid", f"1:{minor}"]


def ifb_name(run_id: str, host: str) -> str:
    """This run's IFB device on ``host``: unique per run and host, <= 15 characters."""
    return "hrifb" + hashlib.sha1(f"{run_id}:{host}".encode()).hexdigest()[:8]


def ifb_commands(ifb: str) -> list[list[str]]:
    return [["ip", "link", "add", "dev", ifb, "type", "ifb"], ["ip", "link", "set", "dev", ifb, "up"]]


def ingress_qdisc_command(dev: str) -> list[str]:
    return ["tc", "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"]


def redirect_command(dev: str, src_ip: str, ifb: str) -> list[str]:
    """Send ``dev``'s incoming packets from ``src_ip`` through ``ifb`` (the only u32 classifier and
    mirred action are needed: no ``matchall``, which some kernels lack)."""
    return ["tc", "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "src", f"{src_ip}/32", "action", "mirred", "egress", "redirect", "dev", ifb]


# --------------------------------------------------------------------------- pure decisions
def split_hops(hops: list[tuple[str, str]], dst: str, ingress: bool):
    """The shaped hops of a path to ``dst``, split into (those shaped at the sender's egress, the hop
    shaped at ``dst``'s ingress or None): with ingress shaping, a last hop into ``dst`` goes there."""
    if ingress and hops and hops[-1][1] == dst:
        return list(hops[:-1]), hops[-1]
    return list(hops), None


def hop_figures(states: list[dict]) -> tuple[float, float, float]:
    """(rate bit/s, added one-way delay ms, loss %) of hops in series: bottleneck, sum, compound."""
    keep = 1.0
    for s in states:
        keep *= 1 - s["loss_pct"] / 100
    return (min(s["bandwidth_mbps"] for s in states) * 1e6, sum(s["delay_ms"] for s in states), 100 * (1 - keep))


class FleetShaper:
    """Per-device egress classes and ingress (IFB) classes for the shaped links of an ``SshFleet``."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.use_ifb = fleet.inventory.ingress_shaping == "ifb"
        self.minor: dict[tuple, int] = {}  # (src, its egress hops) -> class minor on src's interface
        self.egress_of: dict[tuple[str, str], tuple] = {}  # (src, dst) -> the class key it is filtered into
        self.ingress: dict[tuple[str, str], int] = {}  # shaped hop (u, dst) -> class minor on dst's IFB
        self.ifb: dict[str, str] = {}  # device -> its IFB
        self.netem = False

    # ------------------------------------------------------------------ what is shaped where
    def _shaped_hops(self, src: str, dst: str) -> list[tuple[str, str]]:
        return [(u, v) for u, v in self.fleet.path(src, dst) if self.fleet._live(u, v).spec.shape]

    def _split(self, src: str, dst: str):
        return split_hops(self._shaped_hops(src, dst), dst, self.use_ifb)

    def _all_pairs(self) -> list[tuple[str, str]]:
        hs = self.fleet.hosts()
        return [(a, b) for a in hs for b in hs if a != b]

    def pairs(self) -> list[tuple[str, str]]:
        """Pairs with an egress class on the sender."""
        return [p for p in self._all_pairs() if self._split(*p)[0]]

    def ingress_hops(self) -> dict[tuple[str, str], list[str]]:
        """Each hop shaped at its receiver's ingress -> the peers whose paths end with it."""
        out: dict[tuple[str, str], list[str]] = {}
        for a, b in self._all_pairs():
            hop = self._split(a, b)[1]
            if hop is not None:
                out.setdefault(hop, []).append(a)
        return out

    def wants(self, host: str) -> bool:
        return any(a == host for a, _ in self.pairs()) or self.wants_ifb(host)

    def wants_ifb(self, host: str) -> bool:
        return any(v == host for _, v in self.ingress_hops())

    def path_figures(self, src: str, dst: str) -> tuple[float, float, float]:
        """(rate bit/s, delay ms, loss %) of the hops shaped at ``src``'s egress toward ``dst``."""
        return hop_figures([self.fleet._live(u, v).state[u] for u, v in self._split(src, dst)[0]])

    def hop_state(self, hop: tuple[str, str]) -> dict:
        return self.fleet._live(*hop).state[hop[0]]

    # ------------------------------------------------------------------ bring-up
    def check(self) -> None:
        """After the device checks, before anything is created: netem or transport delay; shaped loss
        without netem refused."""
        pairs, ingress = self.pairs(), self.ingress_hops()
        if not pairs and not ingress:
            self.fleet.delay_mechanism = "none (real links)"
            return
        devices = sorted({a for a, _ in pairs} | {v for _, v in ingress})
        self.netem = all(self.fleet.checks[h]["netem"] for h in devices)
        self.fleet.delay_mechanism = "netem" if self.netem else "transport"
        self._refuse_loss_without_netem()

    def start(self) -> None:
        pairs, ingress = self.pairs(), self.ingress_hops()
        if not pairs and not ingress:
            return
        for h in sorted({a for a, _ in pairs}):
            self._start_egress(h)
        for a, b in pairs:
            key = self.egress_of[(a, b)] = (a, tuple(self._split(a, b)[0]))
            if key not in self.minor:
                self.minor[key] = FIRST_MINOR + len(self.minor)
                self._apply(key, change=False)
            self.fleet.conns[a].run(filter_command(self.fleet.inventory.device(a).interface, self.minor[key],
                                                   self.fleet.host_ip(b)))
        for h in sorted({v for _, v in ingress}):
            self._start_ingress(h, {hop: srcs for hop, srcs in ingress.items() if hop[1] == h})
        self._update_delays()
        self.fleet.manifest.note("ssh_shaping", {
            "mechanism": "egress: an HTB class per sender and set of shaped egress hops; hop into a device: " +
                         ("HTB on an IFB at the receiver" if self.use_ifb else "at the senders' egress"),
            "delay_mechanism": self.fleet.delay_mechanism,
            "classes": {f"{a}->{b}": self.minor[k] for (a, b), k in self.egress_of.items()},
            "ingress_classes": {f"{u}->{v}": {"ifb": self.ifb[v], "classid": f"1:{m}"}
                                for (u, v), m in self.ingress.items()}})

    def _refuse_loss_without_netem(self) -> None:
        if self.netem:
            return
        for a, b in self._all_pairs():
            hops = self._shaped_hops(a, b)
            if hops and hop_figures([self.hop_state(h) for h in hops])[2] > 0:
                raise DeviceError(f"device {a}: shaped loss toward {b} needs netem, which its kernel lacks: load "
                                  "sch_netem or drop loss_pct from the shaped links")

    def _start_egress(self, h: str) -> None:
        dev, conn = self.fleet.inventory.device(h).interface, self.fleet.conns[h]
        before = conn.run(["tc", "qdisc", "show", "dev", dev, "root"]).out.strip()
        self.fleet.manifest.add("remote", what="qdisc", device=h, dev=dev, parent="root", replaced=before)
        conn.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)
        for argv in root_commands(dev):
            conn.run(argv)

    def _start_ingress(self, h: str, hops: dict[tuple[str, str], list[str]]) -> None:
        """``h``'s IFB (HTB root, a class per shaped hop into ``h``) and the redirect of its peers."""
        dev, conn = self.fleet.inventory.device(h).interface, self.fleet.conns[h]
        ifb = self.ifb[h] = ifb_name(self.fleet.run_id, h)
        self.fleet.manifest.add("remote", what="ifb", device=h, dev=ifb)
        for argv in ifb_commands(ifb) + root_commands(ifb):
            conn.run(argv)
        minor = FIRST_MINOR
        for hop in sorted(hops):
            self.ingress[hop] = minor
            self._apply_ingress(hop, change=False)
            for src in sorted(hops[hop]):
                conn.run(filter_command(ifb, minor, self.fleet.host_ip(src), field="src"))
            minor += 1
        if self.fleet.checks[h].get("gro") == "on":  # GRO's merged packets overflow the short leaf FIFO
            self.fleet.manifest.add("remote", what="gro", device=h, dev=dev)
            conn.run(["ethtool", "-K", dev, "gro", "off"])
        self.fleet.manifest.add("remote", what="qdisc", device=h, dev=dev, parent="ingress")
        conn.run(ingress_qdisc_command(dev))
        for src in sorted({s for srcs in hops.values() for s in srcs}):
            conn.run(redirect_command(dev, self.fleet.host_ip(src), ifb))

    def _apply(self, key: tuple, change: bool) -> None:
        """The egress class of ``key`` = (sender, its shaped egress hops): rate and leaf from the hops."""
        src, hops = key
        dev, minor = self.fleet.inventory.device(src).interface, self.minor[key]
        rate, delay, loss = hop_figures([self.hop_state(h) for h in hops])
        conn = self.fleet.conns[src]
        conn.run(class_command(dev, minor, rate, change))
        conn.run(leaf_command(dev, minor, rate, (delay, loss) if self.netem else None, change))

    def _apply_ingress(self, hop: tuple[str, str], change: bool) -> None:
        ifb, minor = self.ifb[hop[1]], self.ingress[hop]
        rate, delay, loss = hop_figures([self.hop_state(hop)])
        conn = self.fleet.conns[hop[1]]
        conn.run(class_command(ifb, minor, rate, change))
        conn.run(leaf_command(ifb, minor, rate, (delay, loss) if self.netem else None, change))

    def _update_delays(self) -> None:
        """Without netem the receivers add each path's shaped delay (wherever its rate is enforced)."""
        added = {}
        for p in self._all_pairs():
            hops = self._shaped_hops(*p)
            added[p] = 0.0 if self.netem or not hops else hop_figures([self.hop_state(h) for h in hops])[1] / 1000
        self.fleet.delays.replace(added)

    # ------------------------------------------------------------------ scenario changes, read-back
    def set_link(self, a, b, bandwidth_mbps, delay_ms, loss_pct, up, direction) -> dict:
        link = self.fleet._live(a, b)
        if bandwidth_mbps is None and delay_ms is None and loss_pct is None and up is not False:
            return self.read_link(a, b)
        if not link.spec.shape:
            raise BackendError(f"link {a}-{b} is a real link without shape: true: the ssh backend cannot change "
                               "it (add shape: true to the link to shape it with tc)")
        if up is False:  # (up=True, as a reset restores a topology, is what a real link already is)
            raise BackendError(f"link {a}-{b}: taking a real link down is not supported by the ssh backend")
        if loss_pct and not self.netem:
            raise BackendError(f"link {a}-{b}: loss needs netem on the devices, which they lack")
        with self.fleet._lock:
            for src in ([direction] if direction else list(link.ends)):
                for key, val in (("bandwidth_mbps", bandwidth_mbps), ("delay_ms", delay_ms), ("loss_pct", loss_pct)):
                    if val is not None:
                        link.state[src][key] = val
            for key in {self.egress_of[p] for p in self._egress_on(a, b)}:
                self._apply(key, change=True)
            for hop in self._ingress_on(a, b):
                self._apply_ingress(hop, change=True)
            self._update_delays()
        return self.read_link(a, b)

    def _egress_on(self, a: str, b: str) -> list[tuple[str, str]]:
        """The pairs whose egress class shapes link a-b."""
        return [p for p, (_, hops) in self.egress_of.items() if any({u, v} == {a, b} for u, v in hops)]

    def _ingress_on(self, a: str, b: str) -> list[tuple[str, str]]:
        return [hop for hop in self.ingress if set(hop) == {a, b}]

    def _read_class(self, device: str, dev: str, minor: int, want_bps: float) -> float:
        """The rate (Mbit/s) the kernel holds for class 1:minor on ``dev``, checked against ``want_bps``."""
        k = parse_htb_class(self.fleet.conns[device].run(["tc", "-s", "class", "show", "dev", dev]).out, f"1:{minor}")
        if k is None or abs(k["rate_bps"] - want_bps) > 0.02 * want_bps:
            raise BackendError(f"device {device}: tc class 1:{minor} of {dev} reads {k}, expected {want_bps:.0f} bit/s")
        return k["rate_bps"] / 1e6

    def read_link(self, a: str, b: str) -> dict:
        """Each direction's state; for a shaped link also the rates of its egress classes (``classes``,
        per path) and ingress classes (``ingress``, per direction into a device) read back from tc."""
        link = self.fleet._live(a, b)
        out = {"a": a, "b": b, "delay_mechanism": self.fleet.delay_mechanism, "up": True, "shaped": link.spec.shape}
        for src, dst in ((a, b), (b, a)):
            out[f"{src}->{dst}"] = dict(link.state[src])
        if link.spec.shape:
            out["classes"] = {f"{u}->{v}": self._read_class(u, self.fleet.inventory.device(u).interface,
                                                            self.minor[self.egress_of[(u, v)]], self.path_figures(u, v)[0])
                              for u, v in self._egress_on(a, b)}
            out["ingress"] = {f"{u}->{v}": self._read_class(v, self.ifb[v], self.ingress[(u, v)],
                                                            hop_figures([self.hop_state((u, v))])[0])
                              for u, v in self._ingress_on(a, b)}
        return out
