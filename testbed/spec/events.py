"""Scenario items of an experiment (validated specs): one-off events on a link or host, ramps,
random walks and traces of a link quantity, in one direction or both. Expanding them into a
timeline is ``testbed.spec.scenario``'s job.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, model_validator

from testbed.spec.base import MAX_DELAY_MS, MAX_MBPS, MAX_MIB, MAX_TOKENS, Seed, Spec, TokenIndex


# which traffic of a link a scenario change touches: a -> b, b -> a (as the link is written in the
# event) or both directions
Direction = Literal["a_to_b", "b_to_a", "both"]


class ScenarioEvent(Spec):
    """One scripted change, at a token index or a wall time (seconds since the algorithm started)."""

    at_token: Optional[TokenIndex] = None
    at_s: Optional[float] = Field(None, ge=0, le=1e9)
    link: Optional[tuple[str, str]] = None
    host: Optional[str] = None
    bandwidth_mbps: Optional[float] = Field(None, gt=0, le=MAX_MBPS)
    delay_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)
    loss_pct: Optional[float] = Field(None, ge=0, le=100)
    up: Optional[bool] = None
    mem_limit_mib: Optional[float] = Field(None, gt=0, le=MAX_MIB)
    cpu_cores: Optional[float] = Field(None, gt=0)
    kill_agent: bool = False  # the agent on ``host`` crashes; the device stays (the run restarts it)
    down: Optional[bool] = None  # true: the device is gone (its blocks re-placed); false: it is back
    direction: Direction = "both"  # a link event: change only the traffic a -> b (or b -> a)

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
        if self.down is not None:
            host_fields.append("down")
            if len(host_fields) > 1:
                raise ValueError("down: a device going or coming back changes nothing else in the same event")
        if self.link is not None and (host_fields or not link_fields):
            raise ValueError("a link event changes bandwidth_mbps, delay_ms, loss_pct or up (and nothing else)")
        if self.host is not None and (link_fields or not host_fields):
            raise ValueError("a host event changes mem_limit_mib, cpu_cores, kill_agent or down (and nothing else)")
        if self.direction != "both" and (self.link is None or self.up is not None):
            raise ValueError("direction applies to a link's bandwidth_mbps, delay_ms or loss_pct (up is both ways)")
        return self


# the quantities a ramp, walk or trace can drive, by the unit suffix of their range keys
QUANTITY_BY_UNIT = {"mbps": "bandwidth_mbps", "ms": "delay_ms", "pct": "loss_pct"}


def _one_range(obj, lo_prefix: str, hi_prefix: str, what: str) -> tuple[str, float, float]:
    """(quantity, low, high) from exactly one pair of ``{lo_prefix}_{unit}``/``{hi_prefix}_{unit}``."""
    pairs = [(q, getattr(obj, f"{lo_prefix}_{u}"), getattr(obj, f"{hi_prefix}_{u}")) for u, q in QUANTITY_BY_UNIT.items()]
    given = [(q, lo, hi) for q, lo, hi in pairs if lo is not None or hi is not None]
    keys = " or ".join(f"{lo_prefix}_{u}/{hi_prefix}_{u}" for u in QUANTITY_BY_UNIT)
    if len(given) != 1 or given[0][1] is None or given[0][2] is None:
        raise ValueError(f"{what}: give exactly one pair of {keys}")
    return given[0]


class Ramp(Spec):
    """A linear ramp of one link quantity — bandwidth (``from_mbps``/``to_mbps``), delay
    (``from_ms``/``to_ms``) or loss (``from_pct``/``to_pct``) — applied as ``steps`` step changes."""

    link: tuple[str, str]
    from_token: TokenIndex
    to_token: int = Field(ge=1, le=MAX_TOKENS)
    from_mbps: Optional[float] = Field(None, gt=0, le=MAX_MBPS)
    to_mbps: Optional[float] = Field(None, gt=0, le=MAX_MBPS)
    from_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)
    to_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)
    from_pct: Optional[float] = Field(None, ge=0, le=100)
    to_pct: Optional[float] = Field(None, ge=0, le=100)
    steps: int = Field(4, ge=1, le=MAX_TOKENS)
    direction: Direction = "both"

    @model_validator(mode="after")
    def _order(self) -> "Ramp":
        if self.to_token <= self.from_token:
            raise ValueError("to_token must be after from_token")
        _one_range(self, "from", "to", "ramp")
        return self

    def quantity(self) -> tuple[str, float, float]:
        """(changed key, start value, end value)."""
        return _one_range(self, "from", "to", "ramp")


class RandomWalk(Spec):
    """A seeded random walk of one link quantity, a step every ``every_tokens``.

    ``all_links: true`` instead of ``link`` walks every link of the topology independently
    (link k uses seed + k). The range is absolute — ``min_mbps``/``max_mbps`` (bandwidth),
    ``min_ms``/``max_ms`` (one-way delay) or ``min_pct``/``max_pct`` (loss) — or relative to each
    link's own value in the topology (``min_frac``/``max_frac`` of ``quantity``, default bandwidth).
    A range with a positive minimum is walked multiplicatively (a step scales the value by up to
    ±``step_pct`` %), starting at its geometric middle (absolute) or at the link's own value
    clipped into it (relative); a range from 0 (e.g. loss) additively, by up to ``step_pct`` % of
    its width a step, from its middle. The relative form keeps one scenario meaningful across a sweep."""

    link: Optional[tuple[str, str]] = None
    all_links: bool = False
    every_tokens: int = Field(4, ge=1, le=MAX_TOKENS)
    start_token: TokenIndex = 0
    stop_token: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
    min_mbps: Optional[float] = Field(None, gt=0, le=MAX_MBPS)
    max_mbps: Optional[float] = Field(None, gt=0, le=MAX_MBPS)
    min_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)
    max_ms: Optional[float] = Field(None, ge=0, le=MAX_DELAY_MS)
    min_pct: Optional[float] = Field(None, ge=0, le=100)
    max_pct: Optional[float] = Field(None, ge=0, le=100)
    min_frac: Optional[float] = Field(None, gt=0, le=1e6)
    max_frac: Optional[float] = Field(None, gt=0, le=1e6)
    quantity: Literal["bandwidth_mbps", "delay_ms", "loss_pct"] = "bandwidth_mbps"  # of min_frac/max_frac
    step_pct: float = Field(30.0, gt=0, le=100)
    seed: Seed = 0
    direction: Direction = "both"

    @model_validator(mode="after")
    def _target(self) -> "RandomWalk":
        if (self.link is None) == (not self.all_links):
            raise ValueError("give either link or all_links: true")
        absolute = any(getattr(self, f"{b}_{u}") is not None for b in ("min", "max") for u in QUANTITY_BY_UNIT)
        relative = (self.min_frac, self.max_frac)
        if absolute == any(v is not None for v in relative):
            raise ValueError("give either an absolute range (min_mbps/max_mbps, min_ms/max_ms or min_pct/max_pct) "
                             "or min_frac and max_frac (of each link's own value)")
        if absolute:
            _, lo, hi = _one_range(self, "min", "max", "random_walk")
        else:
            lo, hi = relative
            if lo is None or hi is None:
                raise ValueError("give both bounds of the range (min_frac/max_frac)")
        if lo > hi:
            raise ValueError("the range's minimum must not exceed its maximum")
        return self

    def absolute_range(self) -> tuple[str, float, float] | None:
        """(key, low, high) of an absolute range; None for a relative one."""
        if self.min_frac is not None:
            return None
        return _one_range(self, "min", "max", "random_walk")


class Trace(Spec):
    """Replay a link trace: a CSV with a column ``token`` (or ``t_s``) and one or more of
    ``bandwidth_mbps``, ``delay_ms``, ``loss_pct`` (a row changes the quantities whose cells are not empty)."""

    link: tuple[str, str]
    file: str
    direction: Direction = "both"


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
