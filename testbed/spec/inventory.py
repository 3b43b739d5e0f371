"""The SSH backend's inventory: which real devices there are and how to reach them (YAML, validated
like topologies: frozen pydantic specs with ``extra="forbid"``, errors as ``FILE:LINE: field: message``).

A topology host maps to the inventory device of the same name. Per device: ``address``/``port``/
``user``, ``key_file`` or ``agent: true`` (an ssh-agent), the ``interface`` facing the other devices
(the agents' data ports bind to its address only; shaping goes on it), optionally ``mem_limit_mib``
/ ``cpu_cores`` (override the topology host's caps for the device's cgroup), ``profile`` (recorded
with the run) and ``python`` (the interpreter with torch on the device). Fleet-wide: ``known_hosts``
(host keys are verified against it; unknown hosts are refused unless ``trust_on_first_use: true``,
which records the fingerprint), ``connect_netns`` (open the SSH connections from inside this network
namespace, e.g. ``/proc/PID/ns/net`` — the test rig's controller host), ``work_dir``, ``data_port``
and ``ingress_shaping`` (``ifb`` or ``senders``: see ``testbed.backends.ssh.shaping``).
No secret is ever part of an inventory: key files are named by path, never inlined.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, model_validator

from testbed.core.errors import ConfigError
from testbed.spec.schema import Spec, TopologySpec


class DeviceSpec(Spec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,9}$")
    address: str = Field(min_length=1)
    port: int = Field(22, ge=1, le=65535)
    user: str = Field("root", min_length=1)
    key_file: Optional[str] = None
    agent: bool = False
    interface: str = Field(min_length=1, max_length=15)
    mem_limit_mib: Optional[float] = Field(None, gt=0)
    cpu_cores: Optional[float] = Field(None, gt=0, le=256)
    profile: Optional[str] = None
    python: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> "DeviceSpec":
        if self.key_file is None and not self.agent:
            raise ValueError("give key_file or agent: true (how to authenticate)")
        if self.profile is not None:
            from testbed.spec.profiles import known_profiles

            if self.profile not in known_profiles():
                raise ValueError(f"unknown profile {self.profile!r} (known: {', '.join(known_profiles())})")
        return self

    def public(self) -> dict:
        """What may be written to manifests and logs (no secret is held here; paths are not secrets)."""
        return self.model_dump()


class InventorySpec(Spec):
    name: str = "fleet"
    devices: tuple[DeviceSpec, ...] = Field(min_length=1)
    known_hosts: str = "~/.ssh/known_hosts"
    trust_on_first_use: bool = False
    connect_netns: Optional[str] = None
    python: str = "python3"
    work_dir: str = "/tmp"
    data_port: int = Field(7070, ge=1, le=65535)
    connect_timeout_s: float = Field(10.0, gt=0)
    measure: bool = True  # measure RTT and TCP rate between device pairs at bring-up
    # where the hop into a device of a shape: true link is shaped: an IFB on the receiver (shared by
    # all senders, as the real downlink is) or per path at the senders (no IFB needed, no contention)
    ingress_shaping: Literal["ifb", "senders"] = "ifb"

    @model_validator(mode="after")
    def _unique(self) -> "InventorySpec":
        names = [d.name for d in self.devices]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate device names: {dup}")
        return self

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def python_for(self, name: str) -> str:
        return self.device(name).python or self.python

    def resolved(self, base: Path) -> "InventorySpec":
        """Relative ``key_file``/``known_hosts`` paths made absolute against ``base`` (the file's folder)."""
        def fix(p: Optional[str]) -> Optional[str]:
            if p is None:
                return None
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())
        devices = tuple(d.model_copy(update={"key_file": fix(d.key_file)}) for d in self.devices)
        return self.model_copy(update={"devices": devices, "known_hosts": fix(self.known_hosts)})


def check_hosts_mapped(topology: TopologySpec, inventory: InventorySpec) -> list[str]:
    """One message per topology host without an inventory device of its name."""
    names = {d.name for d in inventory.devices}
    return [f"host {h.name!r} has no device in inventory {inventory.name!r} (devices: {sorted(names)})"
            for h in topology.hosts if h.name not in names]


def effective_topology(topology: TopologySpec, inventory: InventorySpec) -> TopologySpec:
    """The topology with each host's caps replaced by its device's, where the inventory gives them."""
    hosts = []
    for h in topology.hosts:
        d = inventory.device(h.name)
        caps = {k: getattr(d, k) for k in ("mem_limit_mib", "cpu_cores") if getattr(d, k) is not None}
        hosts.append(h.model_copy(update=caps))
    return topology.model_copy(update={"hosts": tuple(hosts)})


def load_inventory(path: str | Path) -> InventorySpec:
    """Load and validate an inventory file; ``ConfigError`` with ``FILE:LINE: field: message`` lines."""
    from testbed.spec.loader import _problems_from
    from testbed.spec.yamltext import Where, compose, to_python

    path = Path(path)
    root = compose(path)
    data: Any = to_python(root)
    try:
        return InventorySpec.model_validate(data).resolved(path.parent.resolve())
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc, Where(str(path), root))) from None
