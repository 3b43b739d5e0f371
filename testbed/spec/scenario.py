"""Expand an experiment's scenario (steps, ramps, random walks, traces — of a link's bandwidth, delay or
loss, in one direction or both) into a concrete timeline.

Pure and deterministic: the same spec and seed give the same timeline, so every algorithm replays
the identical sequence of changes. A change fires *before* the token with index ``at_token`` is
generated (index 0 = before the prompt is processed), or at the first token boundary at which the
algorithm's elapsed run time (sum of token and migration latencies) reaches ``at_s``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testbed.spec.schema import ExperimentSpec, RampItem, RandomWalkItem, ScenarioEvent, TraceItem
from testbed.core.errors import ConfigError


class ScenarioError(ConfigError, ValueError):
    """A scenario item cannot be expanded (e.g. a malformed trace file)."""


@dataclass(frozen=True)
class Change:
    """One concrete change: a link's shaping/state or a host's limits (or killing its agent)."""

    at_token: int | None
    at_s: float | None
    link: tuple[str, str] | None = None
    host: str | None = None
    values: dict = field(default_factory=dict)  # e.g. {"bandwidth_mbps": 4.0} or {"mem_limit_mib": 256}
    direction: str | None = None  # a link change touching one direction only: the node it leaves (None: both)

    def describe(self) -> str:
        target = f"link {self.link[0]}-{self.link[1]}" if self.link else f"host {self.host}"
        if self.direction is not None:
            target = f"link {self.direction}->{self.link[1] if self.direction == self.link[0] else self.link[0]}"
        when = f"token {self.at_token}" if self.at_token is not None else f"{self.at_s:.3f} s"
        return f"{when}: {target} " + ", ".join(f"{k}={v}" for k, v in self.values.items())


def _source_end(link, direction: str) -> str | None:
    """The node a one-direction change's traffic leaves (``a_to_b``: the link's first name); None for both."""
    return {"a_to_b": link[0], "b_to_a": link[1]}.get(direction)


def _from_event(ev: ScenarioEvent) -> Change:
    keys = ("bandwidth_mbps", "delay_ms", "loss_pct", "up", "mem_limit_mib", "cpu_cores")
    values = {k: getattr(ev, k) for k in keys if getattr(ev, k) is not None}
    if ev.kill_agent:
        values["kill_agent"] = True
    if ev.down is not None:
        values["down"] = ev.down
    link = tuple(ev.link) if ev.link else None
    return Change(ev.at_token, ev.at_s, link, ev.host, values, _source_end(link, ev.direction) if link else None)


def _ramp(item: RampItem) -> list[Change]:
    r = item.ramp
    key, start, end = r.quantity()
    link, direction = tuple(r.link), _source_end(r.link, r.direction)
    tokens = np.linspace(r.from_token, r.to_token, r.steps + 1)[1:]
    values = np.linspace(start, end, r.steps + 1)[1:]
    first = Change(r.from_token, None, link, None, {key: float(start)}, direction)
    return [first] + [Change(int(round(t)), None, link, None, {key: round(float(v), 4)}, direction)
                      for t, v in zip(tokens, values)]


REPETITION_SEED_STRIDE = 1_000_003  # far beyond any link count, so link k of one repetition never reuses another's seed


def repetition_seed(seed: int, repetition: int) -> int:
    """The random-walk seed of ``repetition`` (repetition 0 keeps the configured seed)."""
    return int(seed) + REPETITION_SEED_STRIDE * int(repetition)


def _walk_values(lo: float, hi: float, start: float, steps: int, step_pct: float, rng) -> list[float]:
    """``steps`` values of a walk in [lo, hi] from ``start``: multiplicative (a step scales by up to
    ±step_pct %) when lo > 0, else additive (up to step_pct % of the range's width a step)."""
    out, value = [], float(np.clip(start, lo, hi))
    for _ in range(steps):
        out.append(value)
        u = rng.uniform(-1.0, 1.0)
        value = value * (1.0 + step_pct / 100.0 * u) if lo > 0 else value + step_pct / 100.0 * (hi - lo) * u
        value = float(np.clip(value, lo, hi))
    return out


def _random_walk(item: RandomWalkItem, horizon: int, all_links: list[tuple[str, str]],
                 repetition: int = 0, nominal: dict | None = None) -> list[Change]:
    """``nominal``: each link's values in the topology, (a, b) -> {quantity: value} (a relative range needs it)."""
    w = item.random_walk
    if repetition:
        w = w.model_copy(update={"seed": repetition_seed(w.seed, repetition)})
    if w.all_links:
        out = []
        for k, link in enumerate(all_links):
            one = w.model_copy(update={"link": link, "all_links": False, "seed": w.seed + k})
            out += _random_walk(RandomWalkItem(random_walk=one), horizon, [], nominal=nominal)
        return out
    link = tuple(w.link)
    absolute = w.absolute_range()
    if absolute is None:
        key = w.quantity
        own = (nominal or {}).get(link, (nominal or {}).get(link[::-1]))
        if own is None:
            raise ScenarioError(f"random_walk on {list(link)}: no such link in the topology")
        lo, hi, start = w.min_frac * own[key], w.max_frac * own[key], own[key]
    else:
        key, lo, hi = absolute
        start = float(np.sqrt(lo * hi)) if lo > 0 else (lo + hi) / 2.0
    stop = w.stop_token if w.stop_token is not None else horizon
    tokens = list(range(w.start_token, stop, w.every_tokens))
    values = _walk_values(lo, hi, start, len(tokens), w.step_pct, np.random.default_rng(w.seed))
    direction = _source_end(link, w.direction)
    return [Change(t, None, link, None, {key: round(v, 4)}, direction) for t, v in zip(tokens, values)]


TRACE_COLUMNS = ("bandwidth_mbps", "delay_ms", "loss_pct")
_TRACE_BOUNDS = {"bandwidth_mbps": (0.0, False, None), "delay_ms": (0.0, True, None), "loss_pct": (0.0, True, 100.0)}


def _trace_value(path: Path, line: int, key: str, cell: str) -> float:
    lo, lo_ok, hi = _TRACE_BOUNDS[key]
    try:
        v = float(cell)
    except ValueError:
        raise ScenarioError(f"{path}:{line}: {key}: expected a number, got {cell!r}") from None
    if not np.isfinite(v) or v < lo or (v == lo and not lo_ok) or (hi is not None and v > hi):
        want = f"{'>=' if lo_ok else '>'} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise ScenarioError(f"{path}:{line}: {key} must be {want}, got {cell}")
    return v


def _trace(item: TraceItem, base_dir: Path) -> list[Change]:
    t = item.trace
    path = (base_dir / t.file) if not Path(t.file).is_absolute() else Path(t.file)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except OSError as exc:
        raise ScenarioError(f"trace {path}: {exc.strerror}") from None
    when = "token" if "token" in header else "t_s" if "t_s" in header else None
    keys = [k for k in TRACE_COLUMNS if k in header]
    if when is None or not keys:
        raise ScenarioError(f"{path}:1: expected a column token (or t_s) and one or more of "
                            f"{', '.join(TRACE_COLUMNS)}, got {header}")
    link, direction, out = tuple(t.link), _source_end(t.link, t.direction), []
    for line, row in enumerate(rows, start=2):
        values = {k: _trace_value(path, line, k, row[k]) for k in keys if (row.get(k) or "").strip()}
        at = (row.get(when) or "").strip()
        try:
            at_token, at_s = (int(at), None) if when == "token" else (None, float(at))
        except ValueError:
            raise ScenarioError(f"{path}:{line}: {when}: expected a number, got {at!r}") from None
        if values:
            out.append(Change(at_token, at_s, link, None, values, direction))
    return out


def expand(spec: ExperimentSpec, base_dir: Path = Path("."), repetition: int = 0) -> list[Change]:
    """All changes of the scenario, token-indexed ones sorted by token, then time-indexed by time.
    ``repetition`` > 0 re-seeds every random walk with ``repetition_seed`` (all else is fixed data)."""
    horizon = spec.workload.new_tokens
    changes: list[Change] = []
    for item in spec.scenario:
        if isinstance(item, RampItem):
            changes += _ramp(item)
        elif isinstance(item, RandomWalkItem):
            changes += _random_walk(item, horizon, [(l.a, l.b) for l in spec.topology.links], repetition,
                                    nominal={(l.a, l.b): {"bandwidth_mbps": l.bandwidth_mbps, "delay_ms": l.delay_ms,
                                                          "loss_pct": l.loss_pct} for l in spec.topology.links})
        elif isinstance(item, TraceItem):
            changes += _trace(item, base_dir)
        else:
            changes.append(_from_event(item))
    by_token = sorted((c for c in changes if c.at_token is not None), key=lambda c: c.at_token)
    by_time = sorted((c for c in changes if c.at_s is not None), key=lambda c: c.at_s)
    return by_token + by_time


class Timeline:
    """Hands out the changes due at each token boundary; one instance per algorithm replay."""

    def __init__(self, changes: list[Change]):
        self._token = [c for c in changes if c.at_token is not None]
        self._time = [c for c in changes if c.at_s is not None]

    def due(self, token_index: int, elapsed_s: float) -> list[Change]:
        out = [c for c in self._token if c.at_token <= token_index]
        self._token = [c for c in self._token if c.at_token > token_index]
        out += [c for c in self._time if c.at_s <= elapsed_s]
        self._time = [c for c in self._time if c.at_s > elapsed_s]
        return out
