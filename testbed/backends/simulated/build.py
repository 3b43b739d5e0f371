"""Build the simulated backend from a topology spec: unit conversion, device rates, per-core speed.

``SimulatedCluster`` (testbed.backends.simulated.cluster) takes plain SI data; this module converts the spec
(Mbit/s, ms, MiB, cores) and records in the run manifest where the compute speed came from: a host
with a device profile (or its own ``flops_per_s``) computes at the device's roofline for the model's
weight format (``testbed.spec.profiles.host_device``), any other host at ``cpu_cores`` times this
machine's measured per-core FLOP/s.
A link with per-direction overrides keeps them: each direction is simulated with its own rate and delay.
"""
from __future__ import annotations

from testbed.backends.calibrate import per_core_flops
from testbed.core.errors import ConfigError
from testbed.spec.modelref import ModelRef
from testbed.backends.simulated.cluster import DeviceRates, SimulatedCluster
from testbed.spec.profiles import host_device
from testbed.spec.schema import TopologySpec

MIB = 1 << 20
MAX_ROOFLINE_MODEL_BYTES = 2 << 30  # larger models are not built in fp32 here to time their blocks


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
        links.append((link.a, link.b, fwd.bandwidth_mbps * 1e6 / 8, fwd.delay_ms / 1e3,
                      back.bandwidth_mbps * 1e6 / 8, back.delay_ms / 1e3))
    return hosts, links


def with_message_overhead(links: list, hosts: list, message_overhead_s: float) -> list:
    """Charge a per-message runtime cost once per host-to-host path: on each host's access link,
    half on either side when both ends are hosts (a host-switch-host path crosses two access links)."""
    if not message_overhead_s:
        return links
    names = {h[0] for h in hosts}
    out = []
    for a, b, rate, delay, *back in links:
        ends = (a in names) + (b in names)
        extra = message_overhead_s / 2 if ends == 1 else message_overhead_s if ends == 2 else 0.0
        rate_back, delay_back = back or (rate, delay)
        out.append((a, b, rate, delay + extra, rate_back, delay_back + extra))
    return out


def device_speed(model: ModelRef) -> tuple[float, float, dict | None, str]:
    """(FLOP/s per core, seconds per block call per core, the roofline or None, provenance).

    A model whose weights this machine can build (registry entries, checkpoints, SmolLM2 from its
    package) is timed as the emulated backend paces it: this machine's measured one-core roofline
    on the model's own blocks (cached, shared with the emulated backend), at the matrix-vector rate
    decode runs at, plus its per-call cost; a host of ``cpu_cores`` then has ``min(1, cpu_cores)``
    of it, as a paced agent (one worker thread) has. Otherwise: the older 256x256 gemv figure."""
    from testbed.backends.calibrate import cached_machine_roofline, measure_roofline_here
    from testbed.partition.cost.roofline import matvec_rate

    d = model.dims
    fp32_bytes = 4 * (d.n_layers * (d.d_model * d.head_dim * (2 * d.n_heads + 2 * d.n_kv_heads)
                                    + (3 if d.gated_ffn else 2) * d.d_model * d.ffn_dim) + d.vocab_size * d.d_model)
    if not getattr(model, "has_weights", True) or fp32_bytes > MAX_ROOFLINE_MODEL_BYTES:
        flops, provenance = per_core_flops()
        return flops, 0.0, None, f"{provenance}; model not built here for a roofline (no weights, or > 2 GiB in fp32)"
    try:
        roof = cached_machine_roofline(model.load_arg, model.seed, lambda: measure_roofline_here(model.load_arg, model.seed))
    except Exception as exc:  # no weights here (a published config only): the generic figure
        flops, provenance = per_core_flops()
        return flops, 0.0, None, f"{provenance}; no roofline for this model ({type(exc).__name__}: {exc})"
    matvec = matvec_rate(roof["flops_per_s"], roof["bytes_per_s"], model.dims.bytes_per_param)
    return matvec, roof["call_s"], roof, "this machine's one-core roofline on the model's blocks (node_agent.machine)"


def build_simulated_cluster(topo: TopologySpec, model: ModelRef, recorder=None, seed: int = 0,
                            host_overhead_mib: float = 0.0, weights_from: str = "source",
                            message_overhead_s: float = 0.0) -> SimulatedCluster:
    hosts, links = topology_as_plain(topo, model.weight_format)
    if all(h[4] is not None for h in hosts):  # every host computes at its profile's rates
        flops, call_s, roof, provenance = 0.0, 0.0, None, "not used: every host has a device profile's rates"
    else:
        flops, call_s, roof, provenance = device_speed(model)
    overhead = int(host_overhead_mib * MIB)
    if recorder is not None:
        recorder.update_manifest(per_core_flops=flops, per_core_flops_source=provenance,
                                 per_core_call_s=call_s, machine_roofline=roof,
                                 simulated_message_overhead_s=message_overhead_s,
                                 delay_mechanism="simulated", token_ids="pseudo (no model runs in simulation)",
                                 simulated_host_overhead_bytes=overhead, weight_format_simulated=model.weight_format,
                                 simulated_devices={h[0]: (h[4].to_json() if h[4] else "cpu_cores x per_core_flops")
                                                    for h in hosts})
    links = with_message_overhead(links, hosts, message_overhead_s)
    return SimulatedCluster(hosts, links, model.dims, per_core_flops=flops, mem_overhead_bytes=overhead, seed=seed,
                            weights_shipped=weights_from == "source", per_core_call_s=call_s,
                            one_thread=roof is not None)
