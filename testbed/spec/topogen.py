"""Generated topologies: a star or a two-tier edge cluster of N hosts from a few parameters.

Used where writing N hosts by hand is pointless (device-count sweeps, 100+ device simulations).
Generation is pure and seeded: the same parameters give the same topology. Device heterogeneity
comes from cycling through ``profiles`` (the source is ``source_profile``, or with
``source_profile: null`` the first device of the cycle) and drawing each access link's rate from ``bandwidths_mbps``.
"""
from __future__ import annotations

import numpy as np
from testbed.spec.profiles import get_profile
from testbed.spec.schema import GeneratedTopology, TopologySpec


def _host(name: str, profile: str, scale: float, source: bool = False) -> dict:
    p = get_profile(profile)
    # timed as the device (its profile's roofline), not as a share of this machine's core: the
    # profile's cpu_cores written next to it would otherwise select speed "cores" (HostSpec)
    return {"name": name, "mem_limit_mib": round(p.mem_limit_mib * scale, 3), "cpu_cores": p.cpu_cores,
            "source": source, "profile": profile, "speed": "device"}


def generate(g: GeneratedTopology) -> TopologySpec:
    rng = np.random.default_rng(g.seed)
    if g.source_profile is not None:  # a requesting device apart, with its full memory
        hosts = [_host("h1", g.source_profile, 1.0, source=True)]
        hosts += [_host(f"h{i}", g.profiles[(i - 2) % len(g.profiles)], g.mem_scale) for i in range(2, g.n_hosts + 1)]
    else:  # the source is the first of the devices (profiles cycled from h1)
        hosts = [_host(f"h{i}", g.profiles[(i - 1) % len(g.profiles)], g.mem_scale, source=i == 1)
                 for i in range(1, g.n_hosts + 1)]
    rates = rng.choice(np.asarray(g.bandwidths_mbps), size=g.n_hosts)
    rates[0] = max(g.bandwidths_mbps)  # the source gets the best access link
    if g.generate == "star":
        switches = ["s1"]
        edge_of = ["s1"] * g.n_hosts
        trunk: list[dict] = []
    else:
        n_edge = -(-g.n_hosts // g.hosts_per_edge)
        switches = ["r1"] + [f"e{k + 1}" for k in range(n_edge)]
        edge_of = [f"e{i // g.hosts_per_edge + 1}" for i in range(g.n_hosts)]
        trunk = [{"a": f"e{k + 1}", "b": "r1", "bandwidth_mbps": g.uplink_mbps, "delay_ms": g.uplink_delay_ms}
                 for k in range(n_edge)]
    links = [{"a": h["name"], "b": sw, "bandwidth_mbps": float(r), "delay_ms": g.delay_ms}
             for h, sw, r in zip(hosts, edge_of, rates)]
    name = g.name or f"{g.generate}{g.n_hosts}"
    return TopologySpec.model_validate({"name": name, "hosts": hosts, "switches": switches, "links": links + trunk})
