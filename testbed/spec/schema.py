"""Frozen, strictly validated specs for topologies and experiments (pydantic, ``extra="forbid"``).

Units live in key names: ``bandwidth_mbps``, ``delay_ms``, ``loss_pct``, ``mem_limit_mib``,
``cpu_cores``. Loading YAML and reporting errors with line numbers is ``testbed.spec.loader``'s job.
"""
from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from testbed.spec.base import (MAX_DELAY_MS, MAX_MBPS, MAX_MIB, MAX_REPETITIONS, MAX_SEED, MAX_TOKENS,  # noqa: F401
                               RESERVED_NETS, Seed, Spec, TokenIndex)
from testbed.spec.events import (QUANTITY_BY_UNIT, Direction, Ramp, RampItem, RandomWalk, RandomWalkItem,  # noqa: F401
                                 ScenarioEvent, ScenarioItem, Trace, TraceItem)


class LinkDirection(Spec):
    """Per-direction override of a link's shaping."""

    bandwidth_mbps: Optional[float] = Field(None, gt=0, le=MAX_MBPS)
    delay_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)
    loss_pct: Optional[float] = Field(None, ge=0, le=100)
    jitter_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)


class HostSpec(Spec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,9}$")
    mem_limit_mib: float = Field(gt=0, le=MAX_MIB)
    cpu_cores: float = Field(gt=0, le=256)
    source: bool = False
    profile: Optional[str] = None  # e.g. "rpi4-8gb": fills mem_limit_mib / cpu_cores where not given
    # device rates (testbed.spec.profiles): override the profile's, or give a device without one;
    # flops_per_s is one number (every weight format) or {format: FLOP/s}
    flops_per_s: Optional[Union[float, dict[str, float]]] = None
    mem_bw_bytes_per_s: Optional[float] = Field(None, gt=0)
    call_overhead_s: Optional[float] = Field(None, ge=0)
    # how the simulated backend times this host: "device" = the device's roofline (profile and
    # rate fields), "cores" = cpu_cores x this machine's per-core FLOP/s. Default: "device" when
    # the host gives flops_per_s, or a profile without its own cpu_cores; "cores" otherwise (a
    # cpu_cores written next to a profile is a share of this machine, as before profiles had rates)
    speed: Optional[Literal["device", "cores"]] = None

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("speed") is None:
            device = data.get("flops_per_s") is not None or (bool(data.get("profile")) and "cpu_cores" not in data)
            data = {**data, "speed": "device" if device else "cores"}
        if data.get("profile"):
            from testbed.spec.profiles import get_profile, known_profiles, resolve

            try:
                get_profile(data["profile"])
            except KeyError:
                raise ValueError(f"unknown profile {data['profile']!r} (known: {', '.join(known_profiles())})") from None
            return resolve(data)
        return data

    @model_validator(mode="after")
    def _check_rates(self) -> "HostSpec":
        from testbed.core.formats import FORMATS

        rates = self.flops_per_s if isinstance(self.flops_per_s, dict) else {"fp32": self.flops_per_s or 1.0}
        for fmt, rate in rates.items():
            if fmt not in FORMATS:
                raise ValueError(f"flops_per_s: unknown weight format {fmt!r} (known: {', '.join(FORMATS)})")
            if not rate > 0:
                raise ValueError(f"flops_per_s.{fmt}: must be > 0, got {rate}")
        if self.speed == "device" and not (self.profile or self.flops_per_s is not None):
            raise ValueError("speed: device needs a profile or flops_per_s")
        return self


class LinkSpec(Spec):
    a: str
    b: str
    bandwidth_mbps: float = Field(gt=0, le=MAX_MBPS)
    delay_ms: float = Field(0.0, ge=0, le=MAX_DELAY_MS)
    loss_pct: float = Field(0.0, ge=0, le=100)
    # delay jitter: each frame's one-way delay on this link is delay_ms + U(-jitter_ms, +jitter_ms),
    # drawn independently per frame (no correlation; netem's default distribution); frames of one
    # connection are never released out of order (TCP delivers in order)
    jitter_ms: float = Field(0.0, ge=0, le=MAX_DELAY_MS)
    a_to_b: Optional[LinkDirection] = None
    b_to_a: Optional[LinkDirection] = None
    # ssh backend: the link is real and its values describe it; shape: true puts tc shaping of these
    # values on the devices' interfaces on top (and lets a scenario change it). The emulated backend
    # always shapes every link; the simulated one models it.
    shape: bool = False

    @model_validator(mode="after")
    def _jitter_within_delay(self) -> "LinkSpec":
        for src in (self.a, self.b):
            d = self.direction(src)
            if d.jitter_ms > d.delay_ms:
                raise ValueError(f"jitter_ms ({d.jitter_ms:g}) must not exceed delay_ms ({d.delay_ms:g}) "
                                 f"on {src}->{self.b if src == self.a else self.a}: a frame cannot arrive before it was sent")
        return self

    def direction(self, src: str) -> LinkDirection:
        """Effective shaping for traffic leaving ``src`` (one of a, b)."""
        override = self.a_to_b if src == self.a else self.b_to_a
        base = dict(bandwidth_mbps=self.bandwidth_mbps, delay_ms=self.delay_ms, loss_pct=self.loss_pct,
                    jitter_ms=self.jitter_ms)
        if override is not None:
            base.update({k: v for k, v in override.model_dump().items() if v is not None})
        return LinkDirection(**base)


class TopologySpec(Spec):
    name: str
    hosts: tuple[HostSpec, ...] = Field(min_length=1)
    switches: tuple[str, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    subnet: str = "10.0.0.0/8"

    @field_validator("subnet")
    @classmethod
    def _check_subnet(cls, value: str) -> str:
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            if "host bits" in str(exc):
                raise ValueError(f"{value} has host bits set (write the network address)") from None
            raise ValueError(f"{value!r} is not a valid IPv4 network (expected e.g. 10.0.0.0/8)") from None
        if net.version != 4:
            raise ValueError(f"{value}: emulated hosts take IPv4 addresses (expected e.g. 10.0.0.0/8)")
        clash = next((r for r in RESERVED_NETS if net.overlaps(r)), None)
        if clash is not None:
            raise ValueError(f"{value} overlaps the reserved range {clash} (loopback, link-local, multicast ...)")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> "TopologySpec":
        seen: set[str] = set()
        for where, name in [(f"hosts[{i}].name", h.name) for i, h in enumerate(self.hosts)] + \
                [(f"switches[{i}]", s) for i, s in enumerate(self.switches)]:
            if name in seen:
                raise ValueError(f"{where}: duplicate node names: {name!r} is used twice")
            seen.add(name)
        joined: dict[frozenset, int] = {}
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                node = getattr(link, end)
                if node not in seen:
                    raise ValueError(f"links[{i}].{end}: unknown node {node!r} (known: {sorted(seen)})")
            if link.a == link.b:
                raise ValueError(f"links[{i}]: a link needs two different ends, got {link.a!r} twice")
            pair = frozenset((link.a, link.b))
            if pair in joined:
                raise ValueError(f"links[{i}]: duplicate link between {link.a} and {link.b} (links[{joined[pair]}] "
                                 "already joins them; per-direction settings go in a_to_b / b_to_a)")
            joined[pair] = i
        sources = [h.name for h in self.hosts if h.source]
        if len(sources) != 1:
            raise ValueError(f"hosts: exactly one host must have source: true, found {sources}")
        return self

    @property
    def source(self) -> str:
        return next(h.name for h in self.hosts if h.source)

    def host(self, name: str) -> HostSpec:
        return next(h for h in self.hosts if h.name == name)

    def find_link(self, a: str, b: str) -> LinkSpec:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise KeyError(f"no link between {a} and {b}")


class GeneratedTopology(Spec):
    """Parameters of a generated star / two-tier topology (see testbed.spec.topogen)."""

    generate: Literal["star", "two_tier"]
    n_hosts: int = Field(ge=2, le=4096)
    profiles: tuple[str, ...] = ("rpi4", "rpi5", "jetson-nano")
    source_profile: Optional[str] = "laptop"  # None: the source is one more device of ``profiles``
    mem_scale: float = Field(1.0, gt=0, le=1e6)  # multiplies every worker profile's memory (the source keeps its own)
    bandwidths_mbps: tuple[Annotated[float, Field(gt=0, le=MAX_MBPS)], ...] = (10.0, 20.0, 50.0)
    delay_ms: float = Field(2.0, ge=0, le=MAX_DELAY_MS)
    uplink_mbps: float = Field(100.0, gt=0, le=MAX_MBPS)  # two_tier: edge switch to regional switch
    uplink_delay_ms: float = Field(10.0, ge=0, le=MAX_DELAY_MS)
    hosts_per_edge: int = Field(8, ge=1, le=4096)
    seed: Seed = 0
    name: Optional[str] = None


class ModelChoice(Spec):
    """A registry name, a local HF checkpoint directory, or explicit dims (random weights);
    ``weight_format`` is the format planned and simulated (agents compute fp32 whatever it is)."""

    name: Optional[str] = None
    path: Optional[str] = None
    seed: Seed = 0
    dims: Optional[dict[str, Any]] = None
    weight_format: str = "fp32"

    @field_validator("weight_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from testbed.core.formats import FORMATS

        if value not in FORMATS:
            raise ValueError(f"unknown weight format {value!r} (known: {', '.join(FORMATS)})")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelChoice":
        given = [k for k in ("name", "path", "dims") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of name, path, dims (got {given or 'none'})")
        return self


class Workload(Spec):
    prompt_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    new_tokens: int = Field(32, ge=1, le=MAX_TOKENS)
    seed: Seed = 0


class Simulation(Spec):
    """Settings of the simulated backend only (the emulated one measures these)."""

    # memory charged per host that is not model blocks: the emulated agents' idle charge plus their
    # refusal margin is ~6 MiB, so 6 makes a simulated run of an emulated experiment comparable
    host_overhead_mib: float = Field(0.0, ge=0, le=MAX_MIB)
    # the agents' runtime cost per activation message between hosts (the emulated backend measures
    # it in its warm-up: ``agent_message_overhead_s`` in an emulated run's manifest); added to every
    # path's latency so a simulated run of an emulated experiment is comparable
    message_overhead_ms: float = Field(0.0, ge=0, le=MAX_DELAY_MS)


class MigrationSettings(Spec):
    """How blocks move. ``weights_from: destination`` ships only KV caches: the receiver copies the
    weights from its own full copy of the model (devices that all hold the checkpoint on disk)."""

    weights_from: Literal["source", "destination"] = "source"


class Emulation(Spec):
    """How the emulated backend realises hosts (``testbed.emulation.cpu``): ``cpu: pace`` (agents hold
    each block until the device's time for it has passed), ``cfs-short`` or ``cfs`` (a CFS quota)."""

    cpu: Literal["pace", "cfs-short", "cfs"] = "pace"


class SshSettings(Spec):
    """``backend: ssh``: the inventory of real devices (``testbed.spec.inventory``), a path relative
    to the experiment file (the loader validates it and makes it absolute)."""

    inventory: str


class AlgorithmSpec(Spec):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class ExperimentSpec(Spec):
    name: str
    topology: Union[str, TopologySpec]
    topology_generated: Optional[GeneratedTopology] = None  # set by the loader when topology: {generate: ...}
    model: ModelChoice
    workload: Workload = Workload()
    algorithms: tuple[Union[str, AlgorithmSpec], ...] = Field(min_length=1)
    repartition_every_tokens: int = Field(8, ge=1, le=MAX_TOKENS)
    replan_threshold_pct: float = Field(20.0, ge=0, le=100)  # a drop this large re-plans at once
    cost_model: Literal["decode", "paper"] = "decode"
    allow_blocks_on_source: bool = False
    scenario: tuple[ScenarioItem, ...] = ()
    repetitions: int = Field(1, ge=1, le=MAX_REPETITIONS)
    backend: Literal["emulated", "simulated", "ssh"] = "emulated"
    ssh: Optional[SshSettings] = None
    simulation: Simulation = Simulation()
    emulation: Emulation = Emulation()
    migration: MigrationSettings = MigrationSettings()
    placement: Optional[dict[str, Any]] = None  # for the "fixed" algorithm: Placement.to_json() form
    sweep: Optional[dict[str, list[Any]]] = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        import re

        if not re.match(NAME_PATTERN, value) or value in (".", ".."):
            raise ValueError(f"{value!r}: a plain name is expected (letters, digits, '.', '_', '-'; at most 100), "
                             "not a path: the run directory is <-o>/<name>/ and must stay under -o")
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep_not_empty(cls, value: Optional[dict]) -> Optional[dict]:
        if value is not None and not value:
            raise ValueError("an empty sweep runs nothing: give at least one path with a list of values, or drop sweep")
        for key, values in (value or {}).items():
            if not values:
                raise ValueError(f"{key}: empty list of values: this axis would run no point at all")
        return value

    def algorithm_specs(self) -> list[AlgorithmSpec]:
        return [a if isinstance(a, AlgorithmSpec) else AlgorithmSpec(name=a) for a in self.algorithms]
