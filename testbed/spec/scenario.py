"""Expand an experiment's scenario (steps, ramps, random walks, traces — of a link's bandwidth, delay or
loss, in one direction or both) into a concrete timeline.

Pure and deterministic: the same spec and seed give the same timeline, so every algorithm replays
the identical sequence of changes. A change fires *before* the token with index ``at_token`` is
generated (index 0 = before the prompt is processed), or at the first token boundary at which the
algorithm's elapsed run time (sum of token and migration latencies) reaches ``at_s``.
"""
from __future__ import annotations

import csv
import math
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


class TraceError(ScenarioError):
    """A trace CSV is malformed; ``file`` and ``line`` point into the CSV."""

    def __init__(self, file: str, line: int, message: str):
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line, self.message = file, line, message


TRACE_QUANTITIES = ("bandwidth_mbps", "delay_ms", "loss_pct")
TRACE_COLUMNS = f"columns token (or t_s) and one or more of {', '.join(TRACE_QUANTITIES)}"
# per quantity: (lowest value, whether it is allowed, highest value or None)
_TRACE_BOUNDS = {"bandwidth_mbps": (0.0, False, None), "delay_ms": (0.0, True, None), "loss_pct": (0.0, True, 100.0)}


def trace_path(file: str, base_dir: Path) -> Path:
    return (base_dir / file) if not Path(file).is_absolute() else Path(file)


def read_trace(path: Path) -> list[tuple[int | None, float | None, dict[str, float]]]:
    """(token, t_s, {quantity: value}) per row of a trace CSV: one time column, increasing; values
    finite and in range; a row's empty cells change nothing. Raises TraceError naming the CSV's line."""
    from testbed.spec.yamltext import read_text
    from testbed.core.errors import ConfigError

    try:
        text = read_text(path, "trace")
    except ConfigError as exc:
        p = exc.problems[0]
        raise TraceError(str(path), p.line, p.message) from None
    reader = csv.DictReader(text.splitlines())
    cols = set(reader.fieldnames or ())
    time_col = "token" if "token" in cols else "t_s" if "t_s" in cols else None
    keys = [k for k in TRACE_QUANTITIES if k in cols]
    if time_col is None or not keys:
        raise TraceError(str(path), 1, f"expected {TRACE_COLUMNS}, got {sorted(cols)}")
    out, last = [], None
    for line, row in enumerate(reader, start=2):
        when, values = _trace_row(path, line, row, time_col, keys)
        if last is not None and when <= last:
            raise TraceError(str(path), line, f"{time_col} must be increasing: {when} after {last}")
        last = when
        out.append((when, None, values) if time_col == "token" else (None, when, values))
    if not out:
        raise TraceError(str(path), 1, "no rows: a trace needs at least one value")
    return out


def _trace_row(path: Path, line: int, row: dict, time_col: str, keys: list[str]) -> tuple[float, dict[str, float]]:
    cell = (row.get(time_col) or "").strip()
    try:
        when = int(cell) if time_col == "token" else float(cell)
    except ValueError:
        raise TraceError(str(path), line, f"{time_col}: expected a number, got {cell!r}") from None
    if not math.isfinite(when) or when < 0:
        raise TraceError(str(path), line, f"{time_col} must be a finite number >= 0, got {cell}")
    values = {}
    for key in keys:
        text = (row.get(key) or "").strip()
        if not text:
            continue
        try:
            v = float(text)
        except ValueError:
            raise TraceError(str(path), line, f"{key}: expected a number, got {text!r}") from None
        lo, lo_ok, hi = _TRACE_BOUNDS[key]
        if not math.isfinite(v) or v < lo or (v == lo and not lo_ok) or (hi is not None and v > hi):
            want = f"a finite number {'>=' if lo_ok else '>'} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
            raise TraceError(str(path), line, f"{key} must be {want}, got {text}")
        values[key] = v
    return when, values


def _trace(item: TraceItem, base_dir: Path) -> list[Change]:
    t = item.trace
    link, direction = tuple(t.link), _source_end(t.link, t.direction)
    return [Change(tok, at_s, link, None, values, direction)
            for tok, at_s, values in read_trace(trace_path(t.file, base_dir)) if values]


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
    """Hands out the changes due at each token boundary; one instance per algorithm replay.

    Changes are kept sorted by when they are due (stable: changes due together keep their order)
    and handed out from a cursor, so a call costs what it returns (16 000 link changes x 2000
    tokens were 32 M comparisons)."""

    def __init__(self, changes: list[Change]):
        self._token = sorted((c for c in changes if c.at_token is not None), key=lambda c: c.at_token)
        self._time = sorted((c for c in changes if c.at_s is not None), key=lambda c: c.at_s)
        self._i = self._j = 0

    def due(self, token_index: int, elapsed_s: float) -> list[Change]:
        i, j = self._i, self._j
        while self._i < len(self._token) and self._token[self._i].at_token <= token_index:
            self._i += 1
        while self._j < len(self._time) and self._time[self._j].at_s <= elapsed_s:
            self._j += 1
        return self._token[i:self._i] + self._time[j:self._j]
