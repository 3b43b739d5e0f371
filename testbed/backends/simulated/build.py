"""Build the simulated backend from a topology spec: unit conversion, device rates, per-core speed.

``SimulatedCluster`` (testbed.backends.simulated.cluster) takes plain SI data; this module converts the spec
(Mbit/s, ms, MiB, cores) and records in the run manifest where the compute speed came from: a host
with a device profile (or its own ``flops_per_s``) computes at the device's roofline for the model's
weight format (``testbed.spec.profiles.host_device``), any other host at ``cpu_cores`` times this
machine's measured per-core FLOP/s.
A link with per-direction overrides is simulated with its slower direction's rate and its larger
delay (the simulated network is symmetric).
"""
from __future__ import annotations

from testbed.backends.calibrate import per_core_flops
from testbed.core.errors import ConfigError
from testbed.spec.modelref import ModelRef
from testbed.backends.simulated.cluster import DeviceRates, SimulatedCluster
from testbed.spec.profiles import host_device
from testbed.spec.schema import TopologySpec

MIB = 1 << 20


def device_rates(host, weight_format: str) -> DeviceRates | None:
    """The host's device rates for ``weight_format`` (None: a share of this machine's cores)."""
    dev = host_device(host)
    if dev is None:
        return None
    rate = dev.flops_for(weight_format)
    if not rate > 0:
        raise ConfigError(f"host {host.name}: flops_per_s gives no rate for weight format {weight_format!r} "
                          f"(it has {sorted(k for k, v in dev.flops_per_s.items() if v > 0)})")
    return DeviceRates(rate, dev.mem_bw_bytes_per_s, dev.call_overhead_s, dev.cpu_cores, dev.name)


def topology_as_plain(topo: TopologySpec, weight_format: str = "fp32") -> tuple[list, list]:
    hosts = [(h.name, int(h.mem_limit_mib * MIB), h.cpu_cores, h.source, device_rates(h, weight_format))
             for h in topo.hosts]
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
    hosts, links = topology_as_plain(topo, model.weight_format)
    if recorder is not None:
        recorder.update_manifest(per_core_flops=flops, per_core_flops_source=provenance,
                                 delay_mechanism="simulated", token_ids="pseudo (no model runs in simulation)",
                                 simulated_host_overhead_bytes=overhead, weight_format_simulated=model.weight_format,
                                 simulated_devices={h[0]: (h[4].to_json() if h[4] else "cpu_cores x per_core_flops")
                                                    for h in hosts})
    return SimulatedCluster(hosts, links, model.dims, per_core_flops=flops, mem_overhead_bytes=overhead, seed=seed,
                            weights_shipped=weights_from == "source")
