"""The device fleet of an SSH run: what the emulated backend's ``EmulatedNetwork`` is to Mininet hosts.

``SshFleet.start`` connects to every device of the topology (``transport``), checks each one with
the device helper piped to its Python (nothing is written on any device before every check
passed), then creates — journalling each resource in the run's manifest *before* it exists — a
per-run directory with the agent bundle, one transient cgroup per device (cgroupfs, v1 or v2, with
the host's limits) and the requested link shaping (``testbed.backends.ssh.shaping``), and measures
RTT and TCP rate between device pairs. ``stop`` collects the agents' logs into the run directory
and removes exactly what was journalled (``testbed.backends.ssh.clean``).

Links: the topology's links describe the real network between the devices. A link with
``shape: true`` gets tc shaping of its values on top and may be changed by the scenario; an
unshaped link is taken as declared (and its measured figures are recorded beside it).
"""
from __future__ import annotations

import errno
import json
import threading
from pathlib import Path, PurePosixPath

from testbed.backends.ssh import clean
from testbed.backends.ssh.bundle import build_bundle
from testbed.backends.ssh.helper import run_helper
from testbed.backends.ssh.transport import DeviceError, DeviceRefused, SshConnection
from testbed.core.errors import BackendError
from testbed.emulation.cgroups import HostCgroup, group_name, setup_writes
from testbed.emulation.linkstate import DelayTable, End, LinkPaths, LiveLink
from testbed.emulation.routing import Routing, TopologyError

MIB = 1 << 20
MIN_PYTHON = (3, 10)
AGENT_MODULES = ("torch", "numpy", "gguf", "safetensors")


class RemoteCgroup(HostCgroup):
    """A device's transient cgroup: ``HostCgroup``'s logic, its file access over SSH."""

    def __init__(self, conn: SshConnection, run_id: str, host: str, info: dict, journal):
        self.conn, self.host, self.journal = conn, host, journal
        self.name, self.version, self.manifest = group_name(run_id, host), info["version"], None
        self.dirs = {ctrl: PurePosixPath(root) / self.name for ctrl, root in info["roots"].items()}
        self._seen_ooms = 0

    def create(self) -> "RemoteCgroup":
        for d in self.dirs.values():
            self.journal.add("remote", what="cgroup", device=self.host, path=str(d))
            self._mkdir(d)
        for w in setup_writes(self.version):
            self._write(*w, quiet=True)
        return self

    def _mkdir(self, d) -> None:
        r = self.conn.run(["mkdir", str(d)], check=False)
        if r.rc != 0:
            if "exists" in r.err:
                raise FileExistsError(str(d))
            raise DeviceError(f"device {self.host}: cannot create cgroup {d}: {r.err.strip()}")

    def _write_raw(self, ctrl: str, file: str, value: str) -> None:
        path = str(self.dirs[ctrl] / file)
        r = self.conn.run(["sh", "-c", 'printf %s "$1" > "$2"', "sh", value, path], check=False)
        if r.rc != 0:
            raise OSError(errno.EBUSY if "busy" in r.err.lower() else errno.EIO, f"device {self.host}: {r.err.strip()}")

    def _read(self, ctrl: str, file: str) -> str:
        return self.conn.run(["cat", str(self.dirs[ctrl] / file)]).out

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def memory_dir(self) -> str:
        return str(self.dirs.get("memory") or self.dirs["unified"])


class _Groups(dict):
    """host -> RemoteCgroup, with ``groups`` like ``CgroupSet``."""

    @property
    def groups(self) -> dict:
        return self


class SshFleet(LinkPaths):
    def __init__(self, topology, inventory, run_id: str, manifest, run_dir: Path, model_modules=(),
                 agent_floor_bytes: int = 0):
        """``agent_floor_bytes``: the least a device's memory limit must hold before any block (an
        agent's interpreter and torch, plus the model weights every agent loads whole)."""
        self.topology, self.inventory, self.run_id, self.manifest = topology, inventory, run_id, manifest
        self.agent_floor_bytes = int(agent_floor_bytes)
        self.run_dir = Path(run_dir)
        self.model_modules = tuple(model_modules)
        self.cpu_emulation = "cfs"  # a real device computes at its own speed; a cpu cap is a cgroup quota
        self._lock = threading.RLock()
        self.delays = DelayTable()
        self.conns: dict[str, SshConnection] = {}
        self.checks: dict[str, dict] = {}
        self.cgroups = _Groups()
        self.remote_dir: dict[str, str] = {}
        self.bundle = None
        self.measured: dict[str, dict] = {}
        try:
            self.routing = Routing(topology)
        except TopologyError as exc:
            raise BackendError(str(exc)) from None
        self.links = []
        for i, spec in enumerate(topology.links):
            link = LiveLink(i, spec, {n: End(n, "", None) for n in (spec.a, spec.b)})
            for n in (spec.a, spec.b):
                d = spec.direction(n)
                link.state[n] = {"bandwidth_mbps": d.bandwidth_mbps, "delay_ms": d.delay_ms, "loss_pct": d.loss_pct}
            self.links.append(link)
        from testbed.backends.ssh.shaping import FleetShaper

        self.shaper = FleetShaper(self)
        self.delay_mechanism = "none"

    def hosts(self) -> list[str]:
        return [h.name for h in self.topology.hosts]

    # ------------------------------------------------------------------ bring-up
    def start(self) -> "SshFleet":
        self.manifest.note("ssh_inventory", self.inventory.model_dump())
        try:
            self._preflight()
            self._deploy()
            self.shaper.start()
            if self.inventory.measure:
                from testbed.backends.ssh.measure import measure_paths

                self.measured = measure_paths(self)
                self.manifest.note("measured_paths", self.measured)
        except BaseException:
            self.stop()
            raise
        return self

    def _preflight(self) -> None:
        """Connect, check every device, decide the shaping: any problem here is bad input (nothing has
        been created on any device yet)."""
        try:
            self._connect_all()
            self._check_all()
            self.shaper.check()
        except DeviceRefused:
            raise
        except DeviceError as exc:
            raise DeviceRefused(str(exc)) from None

    def _parallel(self, fn, hosts=None) -> dict:
        """``fn(host)`` for every device at once; every device's error reported, one line each."""
        out, errs = {}, {}

        def run(h):
            try:
                out[h] = fn(h)
            except DeviceError as exc:
                errs[h] = str(exc)
        threads = [threading.Thread(target=run, args=(h,)) for h in (hosts or self.hosts())]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errs:
            raise DeviceError("\n".join(errs[h] for h in sorted(errs)))
        return out

    def _connect_all(self) -> None:
        def connect(h):
            self.conns[h] = SshConnection(self.inventory.device(h), self.inventory)
        self._parallel(connect)
        fps = {h: {"fingerprint": c.fingerprint, "trusted_on_first_use": c.trusted_on_first_use}
               for h, c in self.conns.items()}
        self.manifest.note("ssh_host_keys", fps)

    def _check_all(self) -> None:
        modules = ",".join(AGENT_MODULES + self.model_modules)

        def check(h):
            dev = self.inventory.device(h)
            r = run_helper(self.conns[h], self.inventory.python_for(h), ["check", "--interface", dev.interface,
                                                                         "--modules", modules])
            if r.rc != 0:
                raise DeviceError(f"device {h}: {self.inventory.python_for(h)} cannot run the device check "
                                  f"({(r.err.strip().splitlines() or ['exit ' + str(r.rc)])[-1]}): set python: "
                                  "to an interpreter >= 3.10 with torch in the inventory")
            info = json.loads(r.out.strip().splitlines()[-1])
            self.checks[h] = info
            problem = self._device_problem(h, info)
            if problem:
                raise DeviceError(f"device {h}: {problem}")
        self._parallel(check)
        self.manifest.note("device_checks", self.checks)

    def _device_problem(self, h: str, info: dict) -> str | None:
        """What makes the device unusable for this run, said with what to do; None when it is fine."""
        version = tuple(int(x) for x in info["python"].split(".")[:2])
        need_tc = self.shaper.wants(h)
        if version < MIN_PYTHON:
            return f"Python {info['python']} is too old (need >= 3.10): set python: in the inventory"
        if info["missing_modules"]:
            return (f"Python modules missing: {', '.join(info['missing_modules'])}: install them for "
                    f"{self.inventory.python_for(h)} (scripts/setup.sh does)")
        if not info["tools"].get("ip") or (need_tc and not info["tools"].get("tc")):
            return "iproute2 (ip, tc) is missing: install iproute2 (or drop shape: true from its links)"
        return self._ingress_problem(h, info) or self._limits_problem(h, info)

    def _ingress_problem(self, h: str, info: dict) -> str | None:
        """An IFB for ingress shaping is wanted but cannot be had (or would replace someone's qdisc)."""
        if not self.shaper.wants_ifb(h):
            return None
        dev = self.inventory.device(h).interface
        if not info.get("ifb"):
            return ("its kernel cannot redirect ingress to an IFB device (needs ifb, act_mirred, cls_u32) to shape "
                    "the incoming direction of its shaped link: load those modules or set ingress_shaping: senders "
                    "in the inventory")
        if info.get("gro") is None:
            return (f"ethtool is missing or cannot read the offloads of {dev!r}: install ethtool (GRO is turned off "
                    "while its ingress is shaped) or set ingress_shaping: senders in the inventory")
        if info.get("ingress_qdisc"):
            return (f"interface {dev!r} already has an ingress qdisc, which ingress shaping would replace: remove it "
                    f"(tc qdisc del dev {dev} ingress; `headroom clean RUN_DIR` if a run left it) or set "
                    "ingress_shaping: senders in the inventory")
        return None

    def _limits_problem(self, h: str, info: dict) -> str | None:
        """cgroups, the interface's address and the device's size, against this run's host spec."""
        host, dev = self.topology.host(h), self.inventory.device(h)
        cg = info["cgroup"]
        if cg["version"] is None:
            return "no cgroup memory+cpu controllers (neither v1 nor v2 with both enabled): enable them"
        if cg.get("delegated") is False:
            root = cg["roots"]["unified"]
            return f"{root} does not delegate memory and cpu to child groups: echo '+memory +cpu' > {root}/cgroup.subtree_control"
        if not cg["writable"]:
            return f"cannot create cgroups under {', '.join(cg['roots'].values())}: connect as root (user: root)"
        if info["interface_addr"] is None:
            return f"interface {dev.interface!r} has no IPv4 address: fix interface: in the inventory"
        if host.mem_limit_mib * MIB < self.agent_floor_bytes:
            return (f"too small for its assignment: mem_limit_mib {host.mem_limit_mib:g} cannot hold an agent "
                    f"(Python, torch and the model's weights, which each agent loads whole: "
                    f"{self.agent_floor_bytes / MIB:.0f} MiB before any block): raise mem_limit_mib")
        if info["mem_available_bytes"] < host.mem_limit_mib * MIB:
            return (f"too small for its assignment: mem_limit_mib {host.mem_limit_mib:g} but only "
                    f"{info['mem_available_bytes'] / MIB:.0f} MiB available: lower mem_limit_mib or free memory")
        if host.cpu_cores > info["cpus"]:
            return (f"too small for its assignment: cpu_cores {host.cpu_cores:g} but {info['cpus']} CPUs: "
                    "lower cpu_cores")
        return None

    def _deploy(self) -> None:
        self.bundle = build_bundle()
        local = self.run_dir / self.bundle.filename
        local.write_bytes(self.bundle.data)
        self.manifest.note("agent_bundle", {"version": self.bundle.version, "files": len(self.bundle.members)})

        def deploy(h):
            conn = self.conns[h]
            rdir = str(PurePosixPath(self.inventory.work_dir) / f"headroom-{self.run_id}-{h}")
            self.manifest.add("remote", what="dir", device=h, path=rdir)
            conn.run(["mkdir", "-m", "700", rdir])
            self.remote_dir[h] = rdir
            conn.put(local, f"{rdir}/{self.bundle.filename}")
            conn.run(["mkdir", f"{rdir}/bundle", f"{rdir}/logs"])
            conn.run(["tar", "-xzf", f"{rdir}/{self.bundle.filename}", "-C", f"{rdir}/bundle"])
            g = RemoteCgroup(conn, self.run_id, h, self.checks[h]["cgroup"], self.manifest).create()
            spec = self.topology.host(h)
            g.set_memory(int(spec.mem_limit_mib * MIB))
            g.set_cpu(spec.cpu_cores)
            self.cgroups[h] = g
        self._parallel(deploy)

    # ------------------------------------------------------------------ what the cluster reads
    def bundle_dir(self, h: str) -> str:
        return f"{self.remote_dir[h]}/bundle"

    def log_dir(self, h: str) -> str:
        return f"{self.remote_dir[h]}/logs"

    def device_python(self, h: str) -> str:
        return self.inventory.python_for(h)

    def host_ip(self, h: str) -> str:
        return self.checks[h]["interface_addr"]

    def path(self, src: str, dst: str) -> list[tuple[str, str]]:
        try:
            return self.routing.path(src, dst)
        except TopologyError as exc:
            raise BackendError(str(exc)) from None

    def transport_delay_s(self, src: str, dst: str) -> float:
        return self.delays.get(src, dst)

    def read_link(self, a: str, b: str) -> dict:
        return self.shaper.read_link(a, b)

    def set_link(self, a: str, b: str, bandwidth_mbps=None, delay_ms=None, loss_pct=None, up=None,
                 direction=None) -> dict:
        return self.shaper.set_link(a, b, bandwidth_mbps, delay_ms, loss_pct, up, direction)

    def set_host_limits(self, host: str, mem_limit_mib=None, cpu_cores=None) -> dict:
        g = self.cgroups[host]
        if mem_limit_mib is not None:
            g.set_memory(int(mem_limit_mib * MIB))
        if cpu_cores is not None:
            g.set_cpu(cpu_cores)
        return g.stats()

    # ------------------------------------------------------------------ tear-down
    def _reconnect_lost(self) -> None:
        """A device whose connection dropped mid-run gets one new connection for the tear-down."""
        for h, c in list(self.conns.items()):
            if not c.alive():
                try:
                    self.conns[h] = SshConnection(self.inventory.device(h), self.inventory)
                except DeviceError:
                    pass  # its resources stay journalled: headroom clean RUN_DIR retries

    def stop(self) -> list[str]:
        """Collect logs, remove what this run journalled on every device, close the connections."""
        done: list[str] = []
        with self._lock:
            self._reconnect_lost()
            if self.remote_dir:
                clean.collect_logs(self, self.run_dir / "agents")
            entries = [e for e in self.manifest.entries() if e.get("kind") == "remote"
                       and e.get("device") in self.conns]
            done = clean.remove_entries(entries, lambda h: self.conns.get(h), self.inventory)
            for c in self.conns.values():
                c.close()
            self.conns.clear()
            self.remote_dir.clear()
        return done
