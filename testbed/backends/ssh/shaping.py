"""tc shaping on real devices' interfaces for links that ask for it (``shape: true``).

Mechanism (recorded in the manifest as ``ssh_shaping``): each device shapes its own *egress* on
its named interface, one HTB class per peer whose routed path crosses a shaped link, selected by a
u32 filter on the peer's address: the class rate is the bottleneck of the shaped hops on that path,
its leaf a byte-limited FIFO — or netem, for delay/loss, where the device's kernel has it. Traffic
to anyone else (SSH included) takes an unshaped default class. The ingress direction of a
device–switch link is therefore shaped at the senders (per path, not per shared link: two senders
to one receiver do not contend for its shaped downlink — IFB ingress shaping is not used).
Without netem the added delay is applied by the agents' receivers (``transport``, as the emulated
backend does; cross-device clocks must then be synchronised), and loss on a shaped link is refused.
Changes go in place (``tc class change``) and are read back from the kernel.
"""
from __future__ import annotations

from testbed.backends.ssh.transport import DeviceError
from testbed.core.errors import BackendError
from testbed.emulation.shaping import _rate, htb_quantum, parse_htb_class, queue_limit_bytes

DEFAULT_RATE_BPS = 10e9  # the unshaped class: everything that is not a shaped path
FIRST_MINOR = 10


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


def filter_command(dev: str, minor: int, dst_ip: str) -> list[str]:
    return ["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "dst", f"{dst_ip}/32", "flowid", f"1:{minor}"]


class FleetShaper:
    """Per-device egress classes for the shaped paths of an ``SshFleet``."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.minor: dict[tuple[str, str], int] = {}  # (src, dst) -> class minor on src's interface
        self.netem = False

    def _shaped_hops(self, src: str, dst: str) -> list[tuple[str, str]]:
        return [(u, v) for u, v in self.fleet.path(src, dst) if self.fleet._live(u, v).spec.shape]

    def pairs(self) -> list[tuple[str, str]]:
        hs = self.fleet.hosts()
        return [(a, b) for a in hs for b in hs if a != b and self._shaped_hops(a, b)]

    def wants(self, host: str) -> bool:
        return any(a == host for a, _ in self.pairs())

    def path_figures(self, src: str, dst: str) -> tuple[float, float, float]:
        """(rate bit/s, added one-way delay ms, loss %) of the shaped hops on the path."""
        hops = [self.fleet._live(u, v).state[u] for u, v in self._shaped_hops(src, dst)]
        keep = 1.0
        for s in hops:
            keep *= 1 - s["loss_pct"] / 100
        return (min(s["bandwidth_mbps"] for s in hops) * 1e6, sum(s["delay_ms"] for s in hops), 100 * (1 - keep))

    def start(self) -> None:
        pairs = self.pairs()
        if not pairs:
            self.fleet.delay_mechanism = "none (real links)"
            return
        devices = sorted({a for a, _ in pairs})
        self.netem = all(self.fleet.checks[h]["netem"] for h in devices)
        self.fleet.delay_mechanism = "netem" if self.netem else "transport"
        for a, b in pairs:
            if self.path_figures(a, b)[2] > 0 and not self.netem:
                raise DeviceError(f"device {a}: shaped loss toward {b} needs netem, which its kernel lacks: load "
                                  "sch_netem or drop loss_pct from the shaped links")
        for h in devices:
            dev, conn = self.fleet.inventory.device(h).interface, self.fleet.conns[h]
            before = conn.run(["tc", "qdisc", "show", "dev", dev, "root"]).out.strip()
            self.fleet.manifest.add("remote", what="qdisc", device=h, dev=dev, parent="root", replaced=before)
            conn.run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)
            for argv in root_commands(dev):
                self.fleet.conns[h].run(argv)
        for k, (a, b) in enumerate(pairs):
            self.minor[(a, b)] = FIRST_MINOR + k
            self._apply(a, b, change=False)
        self._update_delays()
        self.fleet.manifest.note("ssh_shaping", {"mechanism": "per-path HTB egress classes",
                                                 "delay_mechanism": self.fleet.delay_mechanism,
                                                 "classes": {f"{a}->{b}": m for (a, b), m in self.minor.items()}})

    def _apply(self, a: str, b: str, change: bool) -> None:
        dev, minor = self.fleet.inventory.device(a).interface, self.minor[(a, b)]
        rate, delay, loss = self.path_figures(a, b)
        conn = self.fleet.conns[a]
        conn.run(class_command(dev, minor, rate, change))
        conn.run(leaf_command(dev, minor, rate, (delay, loss) if self.netem else None, change))
        if not change:
            conn.run(filter_command(dev, minor, self.fleet.host_ip(b)))

    def _update_delays(self) -> None:
        pairs = [(a, b) for a in self.fleet.hosts() for b in self.fleet.hosts() if a != b]
        added = {p: (0.0 if self.netem or p not in self.minor else self.path_figures(*p)[1] / 1000) for p in pairs}
        self.fleet.delays.replace(added)

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
            touched = [p for p in self.minor if any({u, v} == {a, b} for u, v in self._shaped_hops(*p))]
            for p in touched:
                self._apply(*p, change=True)
            self._update_delays()
        return self.read_link(a, b)

    def read_link(self, a: str, b: str) -> dict:
        """Each direction's state; for a shaped link also the rates of the classes read back from tc."""
        link = self.fleet._live(a, b)
        out = {"a": a, "b": b, "delay_mechanism": self.fleet.delay_mechanism, "up": True, "shaped": link.spec.shape}
        for src, dst in ((a, b), (b, a)):
            out[f"{src}->{dst}"] = dict(link.state[src])
        if link.spec.shape:
            out["classes"] = {}
            for (u, v), minor in self.minor.items():
                if any({x, y} == {a, b} for x, y in self._shaped_hops(u, v)):
                    dev = self.fleet.inventory.device(u).interface
                    k = parse_htb_class(self.fleet.conns[u].run(["tc", "class", "show", "dev", dev]).out, f"1:{minor}")
                    want = self.path_figures(u, v)[0]
                    if k is None or abs(k["rate_bps"] - want) > 0.02 * want:
                        raise BackendError(f"device {u}: tc class 1:{minor} reads {k}, expected {want:.0f} bit/s")
                    out["classes"][f"{u}->{v}"] = k["rate_bps"] / 1e6
        return out
