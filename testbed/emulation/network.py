"""The one module that turns a ``TopologySpec`` into a live emulated network, and changes it.

Hosts are Mininet ``Host`` nodes (a shell in its own network namespace); switches are Linux
bridges; every link is a veth pair whose two ends each shape their own egress (HTB class + a
byte-limited FIFO, GSO segments capped at 1), which gives per-direction rates. Delay and loss:
netem where the kernel has it; otherwise loss is an iptables ``statistic`` DROP rule in the
receiving host's namespace and delay is applied by the transport (``node_agent.wire.recv_frame``
releases a frame at ``sent_at + one_way_delay_s(src, dst)``), read from the thread-safe
``DelayTable``. Every created resource is appended to the run's ``Manifest`` first; ``stop()``
(and ``testbed.emulation.cleanup`` after a crash) removes exactly those. While the network is up, the root
namespace holds an unreachable route for the emulated subnet.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import threading
import time
from typing import Optional, Sequence

from testbed.emulation import shaping as sh
from testbed.emulation import cpu as cpu_modes
from testbed.emulation.cgroups import CgroupSet
from testbed.emulation.cleanup import Manifest, Scope, cleanup_entries, guard_metric, proc_start_time
from testbed.emulation.linkstate import DelayTable, End, LinkPaths, LiveLink
from testbed.emulation.routing import Routing, TopologyError
from testbed.spec.schema import LinkSpec, TopologySpec
from testbed.core.errors import BackendError


class NetworkError(BackendError):
    """The topology cannot be emulated as specified (or a change to it cannot be applied)."""


def _tag(run_id: str) -> str:
    return hashlib.sha1(f"{run_id}/{os.getpid()}/{time.time_ns()}".encode()).hexdigest()[:6]


class EmulatedNetwork(LinkPaths):
    def __init__(self, topology: TopologySpec, run_id: str, manifest: Manifest, *,
                 delay_consumer: Optional[str] = None, limits: bool = True,
                 netem: Optional[bool] = None, cpu_emulation: str = "cfs"):
        """``delay_consumer`` names who applies transport delay when the kernel has no netem
        (e.g. ``"wire"``); without one, a topology asking for delay raises instead of running
        silently without it. ``netem=None`` detects it on a scratch veth pair. ``cpu_emulation``: how
        a host's ``cpu_cores`` is realised (``testbed.emulation.cpu``; default ``cfs``: a bare network's
        cgroup is the only limiter; under the paced modes the cgroup does not throttle and the agents
        pace themselves — the emulated backend passes its mode)."""
        self.topology, self.run_id, self.manifest = topology, run_id, manifest
        self.delay_consumer, self.limits, self._netem_arg = delay_consumer, limits, netem
        if cpu_emulation not in cpu_modes.MODES:
            raise ValueError(f"unknown cpu emulation {cpu_emulation!r} (known: {', '.join(cpu_modes.MODES)})")
        self.cpu_emulation = cpu_emulation
        self.tag = _tag(run_id)
        self.ex = sh.Executor()
        self.delays = DelayTable()
        self.delay_mechanism: Optional[str] = None
        self.hosts: dict = {}  # name -> mininet Host
        self.links: list[LiveLink] = []
        self.bridges: dict[str, str] = {}
        self.cgroups: Optional[CgroupSet] = None
        self._ips: dict[str, str] = {}
        self._routes: dict[str, dict[str, tuple[int, Optional[str]]]] = {}  # src -> dst -> (link, gw)
        self._loss_rules: dict[tuple[str, str], dict] = {}
        self._entries: list[dict] = []
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self.started = False
        self._check_topology()

    # ------------------------------------------------------------------ bring-up / tear-down
    def __enter__(self) -> "EmulatedNetwork":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, kind: str, **fields) -> dict:
        entry = self.manifest.add(kind, **fields)
        self._entries.append(entry)
        return entry

    def start(self) -> "EmulatedNetwork":
        if os.geteuid() != 0:
            raise NetworkError("an emulated network needs root")
        # journalled before anything exists: clean-up removes only names carrying these (cleanup.Scope)
        self.manifest.note("run_tag", self.tag)
        self.manifest.note("run_id", self.run_id)
        self._choose_delay_mechanism()
        try:
            self._guard_route()
            self._start_hosts()
            self._start_bridges()
            for i, link in enumerate(self.topology.links):
                self._start_link(i, link)
            self._address_and_route()
            self._apply_delays_and_loss()
            if self.limits:
                self._start_cgroups()
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def stop(self) -> list[str]:
        with self._lock:
            for p in self._procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=5)
            # links are deleted while their namespaces still exist (not left to async netns teardown)
            removed = cleanup_entries(self._entries, Scope.of(self._entries, tags={self.tag}, run_ids={self.run_id}))
            for host in self.hosts.values():
                host.terminate()  # shell already killed by clean-up; this reaps it and closes the pty
            self._entries, self._procs, self.hosts = [], [], {}
            self.started = False
            return removed

    def _choose_delay_mechanism(self) -> None:
        netem = self.ex.netem_available() if self._netem_arg is None else self._netem_arg
        self.delay_mechanism = "netem" if netem else "transport"
        if not netem:
            wants_delay = any(l.direction(e).delay_ms > 0 for l in self.topology.links for e in (l.a, l.b))
            if wants_delay and self.delay_consumer is None:
                raise NetworkError(
                    f"topology {self.topology.name!r} asks for link delay, the kernel has no netem and "
                    f"no transport-delay consumer is configured (pass delay_consumer='wire')")
        self.manifest.note("delay_mechanism", self.delay_mechanism)
        self.manifest.note("loss_mechanism", "netem" if netem else "iptables-statistic")

    def _guard_route(self) -> None:
        self.route_metric = guard_metric(self.tag)
        spec = ["unreachable", self.topology.subnet, "metric", str(self.route_metric)]
        self._record("route", route=spec)
        self.ex.run(sh.unreachable_route(self.topology.subnet, self.route_metric))

    def _start_hosts(self) -> None:
        from mininet.node import Host

        for h in self.topology.hosts:
            node = Host(h.name)
            self.hosts[h.name] = node
            self._record("host", name=h.name, pid=node.pid, start_time=proc_start_time(node.pid), group=True)
            self.ex.run(sh.link_set_state("lo", True), node.pid)
            self.ex.run(sh.sysctl_set("net.ipv6.conf.all.disable_ipv6", "1"), node.pid, check=False)

    def _start_bridges(self) -> None:
        for i, s in enumerate(self.topology.switches):
            dev = f"hr{self.tag}s{i}"
            self._record("bridge", dev=dev, switch=s)
            self.ex.run(sh.bridge_add(dev))
            self.ex.run(sh.link_set_state(dev, True))
            self.bridges[s] = dev

    def _end_name(self, node: str, index: int, side: str) -> str:
        if node in self.hosts:
            k = sum(1 for l in self.links for e in l.ends.values() if e.node == node)
            return f"{node}-eth{k}"
        return f"hr{self.tag}l{index}{side}"

    def _start_link(self, index: int, spec: LinkSpec) -> None:
        a, b = spec.a, spec.b
        if a not in self.hosts and b in self.hosts:  # keep a host (if any) as the first end
            a, b = b, a
        ea = End(a, self._end_name(a, index, "a"), self.hosts[a].pid if a in self.hosts else None)
        eb = End(b, self._end_name(b, index, "b"), self.hosts[b].pid if b in self.hosts else None)
        # create inside a's namespace (root for a switch), the peer directly in b's
        self._record("veth", dev=ea.dev, netns_pid=ea.netns_pid,
                     start_time=proc_start_time(ea.netns_pid) if ea.netns_pid else None)
        self.ex.run(sh.veth_add(ea.dev, eb.dev, peer_netns_pid=eb.netns_pid or (1 if ea.netns_pid else None)),
                    ea.netns_pid)
        if ea.netns_pid is None or eb.netns_pid is None:
            pass
        link = LiveLink(index, spec, {a: ea, b: eb})
        self.links.append(link)
        for end in (ea, eb):
            src_dir = spec.direction(end.node)
            link.state[end.node] = {"bandwidth_mbps": src_dir.bandwidth_mbps, "delay_ms": src_dir.delay_ms,
                                    "loss_pct": src_dir.loss_pct, "jitter_ms": src_dir.jitter_ms}
            self.ex.run(sh.offloads_off(end.dev), end.netns_pid, check=False)
            for argv in sh.shape_commands(end.dev, src_dir.bandwidth_mbps * 1e6):
                self.ex.run(argv, end.netns_pid)
            if end.node in self.bridges:
                self.ex.run(sh.link_master(end.dev, self.bridges[end.node]))
            self.ex.run(sh.link_set_state(end.dev, True), end.netns_pid)

    # ------------------------------------------------------------------ addressing and paths
    def _check_topology(self) -> None:
        try:
            self.routing = Routing(self.topology)
        except TopologyError as exc:
            raise NetworkError(str(exc)) from None
        self._ips, self._routes = self.routing.ips, self.routing.routes

    def host_ip(self, name: str) -> str:
        return self._ips[name]

    def host_pid(self, name: str) -> int:
        return self.hosts[name].pid

    def path(self, src: str, dst: str) -> list[tuple[str, str]]:
        """Directed hops ``(from, to)`` the packets from ``src`` to ``dst`` take (as routed)."""
        try:
            return self.routing.path(src, dst)
        except TopologyError as exc:
            raise NetworkError(str(exc)) from None

    def transport_delay_s(self, src: str, dst: str) -> float:
        """What a transport must add (0 when netem already delays in the kernel)."""
        return self.delays.get(src, dst)

    def transport_jitter_s(self, src: str, dst: str) -> tuple[float, ...]:
        """The per-hop jitters a transport must draw from (empty when netem jitters in the kernel)."""
        return self.delays.jitter(src, dst)

    def _host_routes(self, h: str) -> tuple[dict[int, str], list, bool]:
        """(link index -> device, explicit /32 routes, whether one subnet route suffices) of host h."""
        devs = {l.index: l.ends[h].dev for l in self.links if h in l.ends}
        routes = self._routes[h]
        single = len(devs) == 1 and all(gw is None for _, gw in routes.values())
        batch = [(f"{self._ips[d]}/32", devs[i], self._ips[gw] if gw else None) for d, (i, gw) in routes.items()]
        return devs, batch, single

    def _address_and_route(self) -> None:
        prefix = ipaddress.ip_network(self.topology.subnet).prefixlen
        for h, node in self.hosts.items():
            devs, batch, single = self._host_routes(h)
            if single:
                self.ex.run(sh.addr_add(next(iter(devs.values())), f"{self._ips[h]}/{prefix}"), node.pid)
                continue
            for dev in devs.values():
                self.ex.run(sh.addr_add(dev, f"{self._ips[h]}/32"), node.pid)
            if batch:
                self.ex.run(sh.ip_batch(), node.pid, input=sh.route_batch(batch))

    def _restore_routes(self, link: LiveLink) -> None:
        """A device taken down loses the explicit routes through it: put back those of the link's hosts."""
        for h in (n for n in link.ends if n in self.hosts):
            _, batch, single = self._host_routes(h)
            if not single and batch:
                self.ex.run(sh.ip_batch(), self.hosts[h].pid, input=sh.route_batch(batch, replace=True))
        forwarders = {gw for t in self._routes.values() for _, gw in t.values() if gw}
        for h in forwarders:
            self.ex.run(sh.sysctl_set("net.ipv4.ip_forward", "1"), self.hosts[h].pid)
            self.ex.run(sh.sysctl_set("net.ipv4.conf.all.rp_filter", "0"), self.hosts[h].pid, check=False)

    # ------------------------------------------------------------------ delay and loss
    def _apply_delays_and_loss(self, changed: Sequence[LiveLink] = ()) -> None:
        hosts = list(self.hosts)
        pairs = [(s, d) for s in hosts for d in hosts if s != d and d in self._routes[s]]
        if self.delay_mechanism == "netem":
            for l in (changed or self.links):
                for node, end in l.ends.items():
                    st = l.state[node]
                    self.ex.run(sh.netem_qdisc(end.dev, st["delay_ms"], st["loss_pct"], change=True,
                                               jitter_ms=st["jitter_ms"]), end.netns_pid)
            self.delays.replace({p: 0.0 for p in pairs})
            return
        self.delays.replace({(s, d): self.one_way_delay_s(s, d) for s, d in pairs},
                            {(s, d): self.path_jitter_s(s, d) for s, d in pairs})
        self._apply_loss_rules(pairs)

    def _apply_loss_rules(self, pairs) -> None:
        wanted = {(s, d): self.path_loss(s, d) for s, d in pairs}
        for key, rule in list(self._loss_rules.items()):
            if abs(wanted.get(key, 0.0) - rule["p"]) > 1e-12:
                self.ex.run(sh.iptables_delete(rule["rule"]), self.hosts[key[1]].pid, check=False)
                del self._loss_rules[key]
        by_dst: dict[str, list[tuple[str, float]]] = {}
        for (s, d), p in wanted.items():
            if p > 0 and (s, d) not in self._loss_rules:
                by_dst.setdefault(d, []).append((s, p))
        for d, srcs in by_dst.items():
            pid = self.hosts[d].pid
            for s, p in srcs:
                rule = sh.iptables_loss_rule(self._ips[s], p)
                self._record("iptables", host=d, netns_pid=pid, start_time=proc_start_time(pid), rule=rule)
                self._loss_rules[(s, d)] = {"p": p, "rule": rule}
            self.ex.run(sh.iptables_restore(), pid,
                        input=sh.iptables_loss_restore([(self._ips[s], p) for s, p in srcs]))

    # ------------------------------------------------------------------ changes in place
    def set_link(self, a: str, b: str, bandwidth_mbps: Optional[float] = None, delay_ms: Optional[float] = None,
                 loss_pct: Optional[float] = None, up: Optional[bool] = None,
                 direction: Optional[str] = None) -> dict:
        """Change a link in place (both directions, or only traffic leaving ``direction``)."""
        with self._lock:
            link = self._live(a, b)
            srcs = [direction] if direction else list(link.ends)
            if delay_ms and self.delay_mechanism == "transport" and self.delay_consumer is None:
                raise NetworkError("delay requested but no netem and no transport-delay consumer")
            for src in srcs:
                end, st = link.ends[src], link.state[src]
                if bandwidth_mbps is not None:
                    rate = bandwidth_mbps * 1e6
                    self.ex.run(sh.htb_class(end.dev, rate, change=True), end.netns_pid)
                    if self.delay_mechanism != "netem":
                        self.ex.run(sh.leaf_queue(end.dev, rate, change=True), end.netns_pid)
                    st["bandwidth_mbps"] = bandwidth_mbps
                if delay_ms is not None:
                    st["delay_ms"] = delay_ms
                if loss_pct is not None:
                    st["loss_pct"] = loss_pct
            if up is not None:
                for end in link.ends.values():
                    self.ex.run(sh.link_set_state(end.dev, up), end.netns_pid)
                link.up = up
                if up:
                    self._restore_routes(link)
            if delay_ms is not None or loss_pct is not None:
                self._apply_delays_and_loss([link])
            return self.read_link(a, b)

    def read_link(self, a: str, b: str) -> dict:
        """The link's state read back from the kernel (rates, queue, up) plus delay/loss in force."""
        with self._lock:
            link = self._live(a, b)
            out = {"a": a, "b": b, "delay_mechanism": self.delay_mechanism}
            ups = []
            for src, dst in ((a, b), (b, a)):
                end = link.ends[src]
                k = self.ex.read_shaping(end.dev, end.netns_pid)
                ups.append(k["up"])
                out[f"{src}->{dst}"] = {"bandwidth_mbps": k["rate_bps"] / 1e6, "ceil_mbps": k["ceil_bps"] / 1e6,
                                        "queue": k["leaf"], "delay_ms": link.state[src]["delay_ms"],
                                        "loss_pct": link.state[src]["loss_pct"],
                                        "jitter_ms": link.state[src]["jitter_ms"], "dev": end.dev}
            out["up"] = all(ups)
            return out

    # ------------------------------------------------------------------ hosts: processes and limits
    def _start_cgroups(self) -> None:
        self.cgroups = CgroupSet(self.run_id, _RecordingManifest(self))
        for h in self.topology.hosts:
            self.cgroups.create(h.name, h.mem_limit_mib, *cpu_modes.cgroup_cpu(self.cpu_emulation, h.cpu_cores))

    def set_host_limits(self, host: str, mem_limit_mib: Optional[float] = None,
                        cpu_cores: Optional[float] = None) -> dict:
        g = self.cgroups[host]
        if mem_limit_mib is not None:
            g.set_memory(int(mem_limit_mib * 1024 * 1024))
        if cpu_cores is not None:
            g.set_cpu(*cpu_modes.cgroup_cpu(self.cpu_emulation, cpu_cores))
        return g.stats()

    def poll_oom(self) -> list[tuple[str, int]]:
        return self.cgroups.poll_oom() if self.cgroups else []

    def popen_in_host(self, name: str, argv: Sequence[str], *, cgroup: bool = True, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside host ``name``'s namespace (and its cgroup, joined before exec)."""
        pid = self.host_pid(name)
        procs_files = []
        if cgroup and self.cgroups is not None:
            procs_files = [str(d / "cgroup.procs") for d in self.cgroups[name].dirs.values()]

        def join():
            for f in procs_files:
                with open(f, "w") as fh:
                    fh.write("0")

        p = subprocess.Popen(sh.in_netns(pid, argv), preexec_fn=join if procs_files else None,
                             start_new_session=True, **kwargs)
        self._record("process", pid=p.pid, start_time=proc_start_time(p.pid), host=name, what=" ".join(argv)[:80])
        self._procs.append(p)
        return p

    def snapshot(self) -> dict:
        return {"name": self.topology.name, "tag": self.tag, "delay_mechanism": self.delay_mechanism,
                "hosts": {h: {"ip": self._ips[h], "pid": n.pid} for h, n in self.hosts.items()},
                "bridges": dict(self.bridges), "route_metric": getattr(self, "route_metric", None),
                "delays_s": self.delays.as_dict()}


class _RecordingManifest:
    """Manifest adapter so cgroups created for the network are also torn down by ``stop()``."""

    def __init__(self, net: EmulatedNetwork):
        self.net = net

    def add(self, kind: str, **fields) -> dict:
        return self.net._record(kind, **fields)
