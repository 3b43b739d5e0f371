"""Device profiles: named edge devices and the memory and CPU limits a host emulating one gets.

Memory is what an inference process can realistically use on the device (total RAM minus the OS
and desktop), CPU is in cores of *this* machine (the emulation cannot make a core slower, only give
a share of one). ``resolve(host_fields)`` fills ``mem_limit_mib``/``cpu_cores`` from ``profile``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    mem_limit_mib: float
    cpu_cores: float
    description: str


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("rpi4", 1536, 0.5, "Raspberry Pi 4 (2 GB), 4x Cortex-A72 @1.5 GHz"),
    DeviceProfile("rpi5", 3072, 1.0, "Raspberry Pi 5 (4 GB), 4x Cortex-A76 @2.4 GHz"),
    DeviceProfile("jetson-nano", 3072, 0.75, "Jetson Nano (4 GB shared CPU/GPU), 4x Cortex-A57"),
    DeviceProfile("jetson-orin-nano", 6144, 1.5, "Jetson Orin Nano (8 GB), 6x Cortex-A78AE"),
    DeviceProfile("laptop", 8192, 2.0, "a mid-range laptop (16 GB), the cluster's strongest node"),
)}


def get_profile(name: str) -> DeviceProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown device profile {name!r} (known: {', '.join(sorted(PROFILES))})") from None


def resolve(host: dict) -> dict:
    """A host mapping with ``profile`` gets the profile's limits where it does not set its own."""
    if not host.get("profile"):
        return dict(host)
    p = get_profile(host["profile"])
    out = dict(host)
    out.setdefault("mem_limit_mib", p.mem_limit_mib)
    out.setdefault("cpu_cores", p.cpu_cores)
    return out
