"""Build the simulated backend from a topology spec: unit conversion and the measured per-core speed.

``SimulatedCluster`` (testbed.backends.simulated.cluster) takes plain SI data; this module converts the spec
(Mbit/s, ms, MiB, cores) and records in the run manifest where the compute speed came from.
A link with per-direction overrides is simulated with its slower direction's rate and its larger
delay (the simulated network is symmetric).
"""
from __future__ import annotations

from testbed.backends.calibrate import per_core_flops
from testbed.spec.modelref import ModelRef
from testbed.backends.simulated.cluster import SimulatedCluster
from testbed.spec.schema import TopologySpec

MIB = 1 << 20


def topology_as_plain(topo: TopologySpec) -> tuple[list, list]:
    hosts = [(h.name, int(h.mem_limit_mib * MIB), h.cpu_cores, h.source) for h in topo.hosts]
    links = []
    for link in topo.links:
        fwd, back = link.direction(link.a), link.direction(link.b)
        rate_bytes = min(fwd.bandwidth_mbps, back.bandwidth_mbps) * 1e6 / 8
        delay_s = max(fwd.delay_ms, back.delay_ms) / 1e3
        links.append((link.a, link.b, rate_bytes, delay_s))
    return hosts, links


def build_simulated_cluster(topo: TopologySpec, model: ModelRef, recorder=None, seed: int = 0,
                            host_overhead_mib: float = 0.0, weights_from: str = "source") -> SimulatedCluster:
    flops, provenance = per_core_flops()
    overhead = int(host_overhead_mib * MIB)
    if recorder is not None:
        recorder.update_manifest(per_core_flops=flops, per_core_flops_source=provenance,
                                 delay_mechanism="simulated", token_ids="pseudo (no model runs in simulation)",
                                 simulated_host_overhead_bytes=overhead)
    hosts, links = topology_as_plain(topo)
    return SimulatedCluster(hosts, links, model.dims, per_core_flops=flops, mem_overhead_bytes=overhead, seed=seed,
                            weights_shipped=weights_from == "source")
