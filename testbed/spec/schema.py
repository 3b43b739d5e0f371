"""Frozen, strictly validated specs for topologies and experiments (pydantic, ``extra="forbid"``).

Units live in key names: ``bandwidth_mbps``, ``delay_ms``, ``loss_pct``, ``mem_limit_mib``,
``cpu_cores``. Loading YAML and reporting errors with line numbers is ``testbed.spec.loader``'s job.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkDirection(Spec):
    """Per-direction override of a link's shaping."""

    bandwidth_mbps: Optional[float] = Field(None, gt=0)
    delay_ms: Optional[float] = Field(None, ge=0)
    loss_pct: Optional[float] = Field(None, ge=0, le=100)


class HostSpec(Spec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,9}$")
    mem_limit_mib: float = Field(gt=0)
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
    bandwidth_mbps: float = Field(gt=0)
    delay_ms: float = Field(0.0, ge=0)
    loss_pct: float = Field(0.0, ge=0, le=100)
    a_to_b: Optional[LinkDirection] = None
    b_to_a: Optional[LinkDirection] = None
    # ssh backend: the link is real and its values describe it; shape: true puts tc shaping of these
    # values on the devices' interfaces on top (and lets a scenario change it). The emulated backend
    # always shapes every link; the simulated one models it.
    shape: bool = False

    def direction(self, src: str) -> LinkDirection:
        """Effective shaping for traffic leaving ``src`` (one of a, b)."""
        override = self.a_to_b if src == self.a else self.b_to_a
        base = dict(bandwidth_mbps=self.bandwidth_mbps, delay_ms=self.delay_ms, loss_pct=self.loss_pct)
        if override is not None:
            base.update({k: v for k, v in override.model_dump().items() if v is not None})
        return LinkDirection(**base)


class TopologySpec(Spec):
    name: str
    hosts: tuple[HostSpec, ...] = Field(min_length=1)
    switches: tuple[str, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    subnet: str = "10.0.0.0/8"

    @model_validator(mode="after")
    def _check_references(self) -> "TopologySpec":
        names = [h.name for h in self.hosts] + list(self.switches)
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate node names: {sorted(dup)}")
        known = set(names)
        for i, link in enumerate(self.links):
            for end in ("a", "b"):
                node = getattr(link, end)
                if node not in known:
                    raise ValueError(f"links[{i}].{end}: unknown node {node!r} (known: {sorted(known)})")
            if link.a == link.b:
                raise ValueError(f"links[{i}]: a link needs two different ends, got {link.a!r} twice")
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
    mem_scale: float = Field(1.0, gt=0)  # multiplies every worker profile's memory (the source keeps its own)
    bandwidths_mbps: tuple[float, ...] = (10.0, 20.0, 50.0)
    delay_ms: float = Field(2.0, ge=0)
    uplink_mbps: float = Field(100.0, gt=0)  # two_tier: edge switch to regional switch
    uplink_delay_ms: float = Field(10.0, ge=0)
    hosts_per_edge: int = Field(8, ge=1)
    seed: int = 0
    name: Optional[str] = None


class ModelChoice(Spec):
    """A registry name, a local HF checkpoint directory, or explicit dims (random weights);
    ``weight_format`` is the format planned and simulated (agents compute fp32 whatever it is)."""

    name: Optional[str] = None
    path: Optional[str] = None
    seed: int = 0
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
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(32, ge=1)
    seed: int = 0


class Simulation(Spec):
    """Settings of the simulated backend only (the emulated one measures these)."""

    # memory charged per host that is not model blocks: the emulated agents' idle charge plus their
    # refusal margin is ~6 MiB, so 6 makes a simulated run of an emulated experiment comparable
    host_overhead_mib: float = Field(0.0, ge=0)
    # the agents' runtime cost per activation message between hosts (the emulated backend measures
    # it in its warm-up: ``agent_message_overhead_s`` in an emulated run's manifest); added to every
    # path's latency so a simulated run of an emulated experiment is comparable
    message_overhead_ms: float = Field(0.0, ge=0)


class MigrationSettings(Spec):
    """How blocks move. ``weights_from: destination`` ships only KV caches: the receiver copies the
    weights from its own full copy of the model (devices that all hold the checkpoint on disk)."""

    weights_from: Literal["source", "destination"] = "source"


class ScenarioEvent(Spec):
    """One scripted change, at a token index or a wall time (seconds since the algorithm started)."""

    at_token: Optional[int] = Field(None, ge=0)
    at_s: Optional[float] = Field(None, ge=0)
    link: Optional[tuple[str, str]] = None
    host: Optional[str] = None
    bandwidth_mbps: Optional[float] = Field(None, gt=0)
    delay_ms: Optional[float] = Field(None, ge=0)
    loss_pct: Optional[float] = Field(None, ge=0, le=100)
    up: Optional[bool] = None
    mem_limit_mib: Optional[float] = Field(None, gt=0)
    cpu_cores: Optional[float] = Field(None, gt=0)
    kill_agent: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ScenarioEvent":
        if (self.at_token is None) == (self.at_s is None):
            raise ValueError("give exactly one of at_token, at_s")
        if (self.link is None) == (self.host is None):
            raise ValueError("give exactly one of link, host")
        link_fields = [k for k in ("bandwidth_mbps", "delay_ms", "loss_pct", "up") if getattr(self, k) is not None]
        host_fields = [k for k in ("mem_limit_mib", "cpu_cores") if getattr(self, k) is not None]
        if self.kill_agent:
            host_fields.append("kill_agent")
        if self.link is not None and (host_fields or not link_fields):
            raise ValueError("a link event changes bandwidth_mbps, delay_ms, loss_pct or up (and nothing else)")
        if self.host is not None and (link_fields or not host_fields):
            raise ValueError("a host event changes mem_limit_mib, cpu_cores or kill_agent (and nothing else)")
        return self


class Ramp(Spec):
    """A linear bandwidth ramp on one link, applied as ``steps`` step changes."""

    link: tuple[str, str]
    from_token: int = Field(ge=0)
    to_token: int = Field(ge=1)
    from_mbps: float = Field(gt=0)
    to_mbps: float = Field(gt=0)
    steps: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "Ramp":
        if self.to_token <= self.from_token:
            raise ValueError("to_token must be after from_token")
        return self


class RandomWalk(Spec):
    """A seeded multiplicative random walk of a link's bandwidth, a step every ``every_tokens``.

    ``all_links: true`` instead of ``link`` walks every link of the topology independently
    (link k uses seed + k). The range is absolute (``min_mbps``/``max_mbps``: the walk starts at
    its geometric middle) or relative to each link's own rate in the topology
    (``min_frac``/``max_frac``: the walk starts at the link's rate, clipped into the range) — the
    relative form keeps one scenario meaningful across a bandwidth sweep."""

    link: Optional[tuple[str, str]] = None
    all_links: bool = False
    every_tokens: int = Field(4, ge=1)
    start_token: int = Field(0, ge=0)
    stop_token: Optional[int] = Field(None, ge=1)
    min_mbps: Optional[float] = Field(None, gt=0)
    max_mbps: Optional[float] = Field(None, gt=0)
    min_frac: Optional[float] = Field(None, gt=0)
    max_frac: Optional[float] = Field(None, gt=0)
    step_pct: float = Field(30.0, gt=0, le=100)
    seed: int = 0

    @model_validator(mode="after")
    def _target(self) -> "RandomWalk":
        if (self.link is None) == (not self.all_links):
            raise ValueError("give either link or all_links: true")
        absolute = (self.min_mbps, self.max_mbps)
        relative = (self.min_frac, self.max_frac)
        if any(v is not None for v in absolute) == any(v is not None for v in relative):
            raise ValueError("give either min_mbps and max_mbps or min_frac and max_frac (of each link's rate)")
        lo, hi = absolute if absolute != (None, None) else relative
        if lo is None or hi is None:
            raise ValueError("give both bounds of the range (min_mbps/max_mbps or min_frac/max_frac)")
        if lo > hi:
            raise ValueError("the range's minimum must not exceed its maximum")
        return self


class Trace(Spec):
    """Replay a bandwidth trace: a CSV with columns ``token`` (or ``t_s``) and ``bandwidth_mbps``."""

    link: tuple[str, str]
    file: str


class RampItem(Spec):
    ramp: Ramp


class RandomWalkItem(Spec):
    random_walk: RandomWalk


class TraceItem(Spec):
    trace: Trace


def _scenario_kind(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("ramp", "random_walk", "trace"):
            if key in value:
                return key
        return "event"
    return {RampItem: "ramp", RandomWalkItem: "random_walk", TraceItem: "trace"}.get(type(value), "event")


ScenarioItem = Annotated[
    Union[Annotated[ScenarioEvent, Tag("event")], Annotated[RampItem, Tag("ramp")],
          Annotated[RandomWalkItem, Tag("random_walk")], Annotated[TraceItem, Tag("trace")]],
    Discriminator(_scenario_kind),
]


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


class ExperimentSpec(Spec):
    name: str
    topology: Union[str, TopologySpec]
    topology_generated: Optional[GeneratedTopology] = None  # set by the loader when topology: {generate: ...}
    model: ModelChoice
    workload: Workload = Workload()
    algorithms: tuple[Union[str, AlgorithmSpec], ...] = Field(min_length=1)
    repartition_every_tokens: int = Field(8, ge=1)
    replan_threshold_pct: float = Field(20.0, ge=0, le=100)  # a drop this large re-plans at once
    cost_model: Literal["decode", "paper"] = "decode"
    allow_blocks_on_source: bool = False
    scenario: tuple[ScenarioItem, ...] = ()
    repetitions: int = Field(1, ge=1)
    backend: Literal["emulated", "simulated", "ssh"] = "emulated"
    ssh: Optional[SshSettings] = None
    simulation: Simulation = Simulation()
    emulation: Emulation = Emulation()
    migration: MigrationSettings = MigrationSettings()
    placement: Optional[dict[str, Any]] = None  # for the "fixed" algorithm: Placement.to_json() form
    sweep: Optional[dict[str, list[Any]]] = None

    def algorithm_specs(self) -> list[AlgorithmSpec]:
        return [a if isinstance(a, AlgorithmSpec) else AlgorithmSpec(name=a) for a in self.algorithms]
