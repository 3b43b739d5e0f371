"""``EmulatedCluster``: the ``Cluster`` protocol on a live emulated network with real node agents.

Combines ``testbed.emulation.network.EmulatedNetwork`` (hosts, shaped links, per-host cgroups, transport
delay table), ``testbed.backends.emulated.agents.AgentPool`` (one forked agent per host, controlled over Unix
sockets) and the agents' data plane (TCP over the emulated links). Everything ``snapshot`` reports
is measured: memory limits and the idle agent's charge from the cgroups, FLOP/s by a calibration
run inside each agent under its CPU cap (re-run when the cap changes), path rates read back from
tc (bottleneck over the routed hops), path latency from the delay in force.

Failures that are *results* become ``AlgorithmFailure``: a refused load/import (bytes needed vs
available), an OOM-killed or killed agent holding blocks, a token or migration that cannot finish
(e.g. a link taken down). After such a failure the next ``reset`` respawns the agents.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

from testbed.backends.emulated.agents import AgentPool
from testbed.emulation.cgroups import CgroupError
from testbed.emulation.cleanup import Manifest
from node_agent.pacing import DeviceClock
from testbed.core.cluster import MigrationRecord, TokenRecord
from testbed.core.errors import AlgorithmFailure, BackendError, MigrationRefused
from node_agent.budget import TRANSIENT_RESERVE
from node_agent.shards import IMPORT_OVERHEAD, IMPORT_SLACK
from testbed.core.moves import MigrationBlocked, migration_items, schedule_waves
from testbed.core.placement import Placement
from testbed.core.moves import moved_blocks
from testbed.core.snapshot import ClusterSnapshot, DeviceState, LinkState
from testbed.backends.emulated.diagnosis import FailureDiagnosis
from testbed.backends.emulated.recovery import AgentRecovery
from testbed.backends.emulated.warmup import measure_working_overhead
from testbed.spec.schema import TopologySpec

MIB = 1 << 20
AGENT_MARGIN_BYTES = 2 * MIB  # node_agent.shards.Budget refuses to use the last 2 MiB
DRIFT_BYTES = 128 * 1024  # a receiver's usage creeps while earlier waves land (allocator, buffers)


class EmulatedCluster(FailureDiagnosis, AgentRecovery):
    """See the module docstring. ``model_ref``: a ``testbed.spec.modelref.ModelRef`` or a registry name."""

    def __init__(self, topology: TopologySpec, model_ref, run_dir, manifest: Manifest | None = None, *,
                 network=None, run_id: str | None = None, seed: int = 0, token_timeout_s: float = 30.0,
                 calibrate_s: float = 0.3, threads: int = 1, runtime_slack_bytes: int = 4 * MIB,
                 weights_from: str = "source", warmup: bool = True, cpu_emulation: str = "pace"):
        self.topology, self.run_dir = topology, Path(run_dir)
        self.weights_from = weights_from  # "destination": migrations ship KV caches, not weights
        self.failure_details: dict | None = None  # the last dead agent found (host, OOM or not, bytes)
        self.down: set[str] = set()  # devices gone (scenario ``down: true``): no agent, nothing placed
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest or Manifest(self.run_dir / "resources.jsonl")
        arg = model_ref if isinstance(model_ref, str) else model_ref.load_arg
        seed = seed if isinstance(model_ref, str) else model_ref.seed
        self.model = {"arg": arg, "seed": int(seed)}
        self.token_timeout_s, self.calibrate_s, self.slack = token_timeout_s, calibrate_s, runtime_slack_bytes
        self._own_net = network is None
        self.pool = None
        if network is None:
            network = self._make_network(run_id or f"ec{uuid.uuid4().hex[:6]}", cpu_emulation)
        self.net = network
        try:
            self.pool = self._make_pool(threads)
            self.pool.start()
            self.flops: dict[str, float] = {}
            self.calibrations: dict[str, dict] = {}  # host -> the last calibration's figures
            self.clock_call_s: dict[str, float] = {}  # host -> its device clock's seconds per call
            self.bytes_per_param = float(self.pool.config.get("bytes_per_param", 4)) if self.pool.config else 4.0
            self.cpu_cores = {h.name: h.cpu_cores for h in topology.hosts}
            self.baseline: dict[str, int] = {}
            for h in self.hosts():
                self._calibrate(h)
            self._rates: dict[tuple[str, str], float] = {}
            for link in topology.links:
                self._read_rates(link.a, link.b)
            self.placement: Placement | None = None
            self.context_len, self.seq, self.pv = 0, 0, 0
            self.dirty = False
            self._changed_links: set[tuple[str, str]] = set()
            self._changed_hosts: set[str] = set()
            self._oom_seen = {h: self._cg(h).oom_kills() for h in self.hosts()}
            # from the warm-up: a working agent's charge beyond its blocks, the cost of a block call
            self.working_overhead, self.call_overhead_s, self.message_overhead_s = None, 0.0, 0.0
            measured = measure_working_overhead(self) if warmup else None
            if measured is not None:
                self.working_overhead, self.call_overhead_s, self.message_overhead_s = measured
                self.reset()  # fresh agents again: the warm-up's blocks and peaks are not anyone's
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ what a backend provides
    def _make_network(self, run_id: str, cpu_emulation: str):
        """The live network with per-host limits (here Mininet; the SSH backend's is its device fleet)."""
        from testbed.emulation.network import EmulatedNetwork

        network = EmulatedNetwork(self.topology, run_id, self.manifest, delay_consumer="wire",
                                  cpu_emulation=cpu_emulation)
        network.start()
        return network

    def _make_pool(self, threads: int):
        """One agent per host, not yet started (here forked by a fork server into the namespaces)."""
        return AgentPool(self.net, self.manifest, self.run_dir, self.model, threads=threads)

    # ------------------------------------------------------------------ measurement
    def _cg(self, host: str):
        return self.net.cgroups[host]

    def _calibrate(self, host: str) -> None:
        """A host's compute speed for the planners. Under roofline pacing it is the device clock's
        (the time the agent is held to, so exactly what the cost model should predict) and the
        calibration is the check that the paced agent really runs at it; otherwise it is measured."""
        r = self.pool.call(host, "calibrate", 60.0, seconds=self.calibrate_s)
        clock = self.pool.pacing[host].get("clock")
        if clock is not None:
            r["clock_flops_per_s"] = DeviceClock(**clock).matvec_flops_per_s(self.bytes_per_param)
            self.flops[host], self.clock_call_s[host] = r["clock_flops_per_s"], clock["call_s"]
        else:
            self.flops[host] = float(r["flops_per_s"])
            self.clock_call_s.pop(host, None)
        self.calibrations[host] = r
        self.baseline[host] = self._cg(host).usage_bytes()

    def _call_s(self, host: str) -> float:
        """Fixed seconds per block call: the device clock's, else the warm-up's measured figure."""
        return self.clock_call_s.get(host, self.call_overhead_s)

    def _set_cpu(self, host: str, cpu_cores: float) -> None:
        """A host's speed: the cgroup (relaxed under pacing) and the agent's pacing."""
        self.net.set_host_limits(host, cpu_cores=cpu_cores)
        self.pool.set_cores(host, cpu_cores)
        self.cpu_cores[host] = cpu_cores

    def _read_rates(self, a: str, b: str) -> dict:
        back = self.net.read_link(a, b)
        for u, v in ((a, b), (b, a)):
            self._rates[(u, v)] = back[f"{u}->{v}"]["bandwidth_mbps"] * 1e6 / 8.0
        return back

    def _path_state(self, a: str, b: str) -> LinkState:
        hops = self.net.path(a, b)
        up = all(self.net._live(u, v).up for u, v in hops)
        rate = min(self._rates[(u, v)] for u, v in hops)
        # the agents' runtime cost of one message rides on the path's latency (warm-up, measured)
        return LinkState(rate, self.net.one_way_delay_s(a, b) + self.message_overhead_s, up=up)

    def hosts(self) -> list[str]:
        return [h.name for h in self.topology.hosts]

    def _overhead(self, host: str, alive: bool) -> int:
        """Memory charged to ``host`` that is not its blocks, plus the agent's refusal margin: before
        any load, what the warm-up measured for this host (``testbed.backends.emulated.warmup``: one figure for all workers,
        the source its own; the idle charge plus
        a slack if there was none); once blocks are held, at least what the cgroup charges beyond
        them, measured — so plans leave room the agent really has."""
        estimate = (self.working_overhead[host] + AGENT_MARGIN_BYTES if self.working_overhead is not None
                    else self.baseline[host] + self.slack)
        if self.placement is None or not alive:
            return estimate
        st = self.pool.call(host, "stats", 30.0)
        measured = st["cgroup_usage_bytes"] - sum((st.get("blocks") or {}).values())
        return max(estimate, measured + AGENT_MARGIN_BYTES)

    def snapshot(self, context_len: int, tokens_until_next_decision: int) -> ClusterSnapshot:
        dead = self.pool.dead()
        devices = tuple(
            DeviceState(h.name, self._cg(h.name).memory_limit(), self._overhead(h.name, h.name not in dead),
                        self.flops[h.name], h.source, h.name not in dead, self._call_s(h.name))
            for h in self.topology.hosts)
        names = self.hosts()
        paths = {(a, b): self._path_state(a, b) for a in names for b in names if a != b}
        return ClusterSnapshot(devices, paths, context_len, tokens_until_next_decision, self.placement,
                               weights_shipped=self.weights_from == "source")

    def peak_mem_bytes(self) -> dict[str, int]:
        return {h: self._cg(h).peak_bytes() for h in self.hosts()}

    def mem_bytes(self) -> dict[str, int]:
        return {h: self._cg(h).usage_bytes() for h in self.hosts()}

    # ------------------------------------------------------------------ scenario changes
    def apply_link(self, a: str, b: str, *, bandwidth_mbps: float | None = None, delay_ms: float | None = None,
                   loss_pct: float | None = None, up: bool | None = None, direction: str | None = None) -> dict:
        if direction is not None and direction not in (a, b):
            raise BackendError(f"link {a}-{b}: direction must leave {a} or {b}, got {direction!r}")
        link = self.net._live(a, b)
        before = dict(link.state[direction or a], up=link.up)
        self.net.set_link(a, b, bandwidth_mbps=bandwidth_mbps, delay_ms=delay_ms, loss_pct=loss_pct, up=up,
                          direction=direction)
        self._changed_links.add((a, b))
        back = self._read_rates(a, b)
        if delay_ms is not None or bandwidth_mbps is not None or up is not None:
            self.pool.push_delays(self.live_hosts())  # delays and the serialisation floor's rates
        return {**back, "before": before}

    def set_host_limits(self, host: str, *, mem_limit_mib: float | None = None,
                        cpu_cores: float | None = None) -> dict:
        g = self._cg(host)
        before = {"mem_limit_mib": g.memory_limit() / MIB, "cpu_cores": self.cpu_cores[host]}
        self._changed_hosts.add(host)
        try:
            stats = self.net.set_host_limits(host, mem_limit_mib=mem_limit_mib)
        except CgroupError as exc:
            raise AlgorithmFailure(f"memory limit of {host} cannot drop to {mem_limit_mib} MiB: {exc}") from None
        if cpu_cores is not None:
            self._set_cpu(host, cpu_cores)
            self._calibrate(host)
            stats = {**stats, "cpu_cores": cpu_cores, "cgroup_cpu_cores": g.cpu_cores(),
                     "pacing": self.pool.pacing[host]}
        return {**stats, "flops_per_s": self.flops[host], "before": before}

    # ------------------------------------------------------------------ tokens
    def load(self, placement: Placement, prompt_ids: list[int]) -> TokenRecord:
        cfg = self.pool.config
        placement.validate(cfg["n_layers"], cfg["n_kv_heads"], cfg["ffn_dim"])
        unknown = placement.devices() - set(self.hosts())
        if unknown:
            raise BackendError(f"placement uses unknown hosts {sorted(unknown)}")
        self.placement, self.pv = placement, self.pv + 1
        self._check_paths(placement)
        pj = placement.to_json()
        self._guard("load", lambda: self.pool.each(lambda h: self.pool.call(h, "load", 300.0, placement=pj,
                                                                            pv=self.pv)))
        self.context_len = 0
        return self._forward(list(prompt_ids))

    def step(self, token_id: int) -> TokenRecord:
        if self.placement is None:
            raise BackendError("step() before load()")
        self._check_paths(self.placement)
        return self._forward([int(token_id)])

    def _forward(self, ids: list[int]) -> TokenRecord:
        self.seq += 1
        r = self._guard(f"token {self.seq}", lambda: self.pool.call(
            self.placement.source, "forward", self.token_timeout_s + 10.0, self._watchdog, ids=ids,
            start_pos=self.context_len, seq=self.seq, token_timeout_s=self.token_timeout_s))
        self.context_len += len(ids)
        self.last_reply = r
        return TokenRecord(int(r["token_id"]), r["latency_s"], r["compute_s"], r["transfer_s"], r["wait_s"],
                           int(r["bytes_moved"]), dict(r["bytes_by_link"]))

    # ------------------------------------------------------------------ migration
    def _waves(self, items: dict[tuple[str, str], list[dict]]) -> list[dict[tuple[str, str], list[dict]]]:
        """A memory-safe order for the moves (``schedule_waves``) from the agents' room (less
        ``DRIFT_BYTES``) and blocks; ``MigrationRefused`` before anything is sent when none fits."""
        hosts = sorted({h for pair in items for h in pair})
        blocks = {h: self.pool.call(h, "stats", 30.0)["blocks"] for h in hosts}
        avail = {h: self.pool.call(h, "budget", 30.0)["available_bytes"] - DRIFT_BYTES for h in hosts}
        cfg, q = self.pool.config, self.pool.config["n_heads"] // self.pool.config["n_kv_heads"]
        wq_share = q / (q + 2)  # of a group's weights, the part in its shard's largest tensor (W_q)

        def transient(dst: str, item: dict, n: int) -> int:
            """The payload while it is imported plus the agent's import copies (import_needed)."""
            if item["kind"] != "head":  # beyond the kept copy: the payload (and a projection's re-layout)
                return (2 * n if item["kind"] == "proj" else n) + IMPORT_SLACK
            held = sum(b for k, b in blocks[dst].items() if k.startswith(f"L{item['layer']}.H"))
            return n + int(IMPORT_OVERHEAD * wq_share * (held + n)) + IMPORT_SLACK

        try:
            return schedule_waves(items, blocks, avail, AGENT_MARGIN_BYTES - TRANSIENT_RESERVE, transient)
        except MigrationBlocked as exc:
            raise MigrationRefused(f"migration refused: {exc}") from None

    def migrate(self, new: Placement) -> MigrationRecord:
        if self.placement is None:
            raise BackendError("migrate() before load()")
        cfg = self.pool.config
        new.validate(cfg["n_layers"], cfg["n_kv_heads"], cfg["ffn_dim"])
        self._check_paths(new)
        waves = self._waves(migration_items(self.placement, new))
        t0 = time.time()
        sent_bytes = 0
        for wave in waves:  # senders of one wave in parallel; the next wave once they are acked
            by_src: dict[str, list[tuple[str, list[dict]]]] = {}
            for (src, dst), its in wave.items():
                by_src.setdefault(src, []).append((dst, its))

            def send_all(src: str, by_src=by_src) -> int:
                return sum(self.pool.call(src, "migrate_out", 330.0, self._watchdog, dst=dst, items=its,
                                          mig_timeout_s=300.0, weights_from=self.weights_from)["bytes"]
                           for dst, its in by_src[src])
            sent = self._guard("migration", lambda: self.pool.each(send_all, list(by_src)))
            sent_bytes += int(sum(sent.values()))
        self.pv += 1
        pj = new.to_json()
        self._guard("switching placement", lambda: self.pool.each(
            lambda h: self.pool.call(h, "set_placement", 120.0, placement=pj, pv=self.pv)))
        old, self.placement = self.placement, new
        return MigrationRecord(time.time() - t0, sent_bytes, moved_blocks(old, new))

    # ------------------------------------------------------------------ reset / close
    def reset(self) -> None:
        """Fresh agents (a freed tensor's pages may stay with the process and its cgroup, so
        dropping blocks would leave the next algorithm less memory), initial links and limits."""
        for h in self.hosts():
            self.pool.respawn(h)
        self.down = set()
        self.pool.configure_all()
        self.dirty = False
        for a, b in sorted(self._changed_links):
            spec = self.topology.find_link(a, b)
            for src in (spec.a, spec.b):
                d = spec.direction(src)
                self.net.set_link(spec.a, spec.b, bandwidth_mbps=d.bandwidth_mbps, delay_ms=d.delay_ms,
                                  loss_pct=d.loss_pct, direction=src)
            self.net.set_link(spec.a, spec.b, up=True)
            self._read_rates(spec.a, spec.b)
        if self._changed_links:
            self.pool.push_delays()
        for h in sorted(self._changed_hosts):
            spec = self.topology.host(h)
            self.net.set_host_limits(h, mem_limit_mib=spec.mem_limit_mib)
            self._set_cpu(h, spec.cpu_cores)
            self._calibrate(h)
        self._changed_links, self._changed_hosts = set(), set()
        for h in self.hosts():
            self._cg(h).reset_peak()
        self._oom_seen = {h: self._cg(h).oom_kills() for h in self.hosts()}
        self.placement, self.context_len = None, 0
        self.failure_details = None

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
        finally:
            self.pool = None
            if self._own_net:
                self.net.stop()


def build_emulated_cluster(topo: TopologySpec, model, run_dir, recorder=None,
                           weights_from: str = "source", cpu_emulation: str = "pace") -> EmulatedCluster:
    """What ``testbed.run.runner`` builds for ``backend: emulated`` (manifest in the run directory)."""
    run_dir = Path(run_dir)
    cluster = EmulatedCluster(topo, model, run_dir, Manifest(run_dir / "resources.jsonl"), weights_from=weights_from,
                              cpu_emulation=cpu_emulation)
    if recorder is not None:
        from testbed.emulation.netcheck import bringup_check

        recorder.update_manifest(network_check=bringup_check(cluster.net),
                                 delay_mechanism=cluster.net.delay_mechanism,
                                 loss_mechanism="netem" if cluster.net.delay_mechanism == "netem" else "iptables statistic",
                                 serialisation="receivers hold a frame until sent_at + bytes/path rate + delay "
                                               "(HTB passes a lone small packet at line rate)",
                                 agents={h: a.pid for h, a in cluster.pool.agents.items()},
                                 agent_flops_per_s=cluster.flops, agent_idle_charge_bytes=cluster.baseline,
                                 cpu_emulation=cluster.net.cpu_emulation, agent_pacing=dict(cluster.pool.pacing),
                                 machine_roofline=cluster.pool.machine,
                                 agent_calibration=cluster.calibrations,
                                 migration_weights_from=weights_from,
                                 agent_working_overhead_bytes=cluster.working_overhead,
                                 agent_call_overhead_s=cluster.call_overhead_s,
                                 agent_message_overhead_s=cluster.message_overhead_s)
    return cluster
