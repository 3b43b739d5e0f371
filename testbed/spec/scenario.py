"""Expand an experiment's scenario (steps, ramps, random walks, traces) into a concrete timeline.

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

    def describe(self) -> str:
        target = f"link {self.link[0]}-{self.link[1]}" if self.link else f"host {self.host}"
        when = f"token {self.at_token}" if self.at_token is not None else f"{self.at_s:.3f} s"
        return f"{when}: {target} " + ", ".join(f"{k}={v}" for k, v in self.values.items())


def _from_event(ev: ScenarioEvent) -> Change:
    keys = ("bandwidth_mbps", "delay_ms", "loss_pct", "up", "mem_limit_mib", "cpu_cores")
    values = {k: getattr(ev, k) for k in keys if getattr(ev, k) is not None}
    if ev.kill_agent:
        values["kill_agent"] = True
    return Change(ev.at_token, ev.at_s, tuple(ev.link) if ev.link else None, ev.host, values)


def _ramp(item: RampItem) -> list[Change]:
    r = item.ramp
    tokens = np.linspace(r.from_token, r.to_token, r.steps + 1)[1:]
    rates = np.linspace(r.from_mbps, r.to_mbps, r.steps + 1)[1:]
    first = Change(r.from_token, None, tuple(r.link), None, {"bandwidth_mbps": float(r.from_mbps)})
    return [first] + [Change(int(round(t)), None, tuple(r.link), None, {"bandwidth_mbps": round(float(b), 4)})
                      for t, b in zip(tokens, rates)]


REPETITION_SEED_STRIDE = 1_000_003  # far beyond any link count, so link k of one repetition never reuses another's seed


def repetition_seed(seed: int, repetition: int) -> int:
    """The random-walk seed of ``repetition`` (repetition 0 keeps the configured seed)."""
    return int(seed) + REPETITION_SEED_STRIDE * int(repetition)


def _random_walk(item: RandomWalkItem, horizon: int, all_links: list[tuple[str, str]],
                 repetition: int = 0, rates: dict | None = None) -> list[Change]:
    """``rates``: each link's rate in the topology, (a, b) -> Mbit/s (a relative range needs it)."""
    w = item.random_walk
    if repetition:
        w = w.model_copy(update={"seed": repetition_seed(w.seed, repetition)})
    if w.all_links:
        out = []
        for k, link in enumerate(all_links):
            one = w.model_copy(update={"link": link, "all_links": False, "seed": w.seed + k})
            out += _random_walk(RandomWalkItem(random_walk=one), horizon, [], rates=rates)
        return out
    rng = np.random.default_rng(w.seed)
    stop = w.stop_token if w.stop_token is not None else horizon
    if w.min_frac is not None:
        link = tuple(w.link)
        nominal = (rates or {}).get(link, (rates or {}).get(link[::-1]))
        if nominal is None:
            raise ScenarioError(f"random_walk on {list(link)}: no such link in the topology")
        lo, hi = w.min_frac * nominal, w.max_frac * nominal
        rate = float(np.clip(nominal, lo, hi))  # start at the link's own rate
    else:
        lo, hi = w.min_mbps, w.max_mbps
        rate = float(np.sqrt(lo * hi))  # start at the geometric middle of the range
    out = []
    for tok in range(w.start_token, stop, w.every_tokens):
        out.append(Change(tok, None, tuple(w.link), None, {"bandwidth_mbps": round(rate, 4)}))
        factor = 1.0 + w.step_pct / 100.0 * rng.uniform(-1.0, 1.0)
        rate = float(np.clip(rate * factor, lo, hi))
    return out


class TraceError(ScenarioError):
    """A trace CSV is malformed; ``file`` and ``line`` point into the CSV."""

    def __init__(self, file: str, line: int, message: str):
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line, self.message = file, line, message


TRACE_COLUMNS = "columns token (or t_s) and bandwidth_mbps"


def trace_path(file: str, base_dir: Path) -> Path:
    return (base_dir / file) if not Path(file).is_absolute() else Path(file)


def read_trace(path: Path) -> list[tuple[int | None, float | None, float]]:
    """(token, t_s, bandwidth_mbps) per row of a trace CSV: one time column, increasing; rates finite
    and > 0. Raises TraceError naming the CSV's line."""
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
    if time_col is None or "bandwidth_mbps" not in cols:
        raise TraceError(str(path), 1, f"expected {TRACE_COLUMNS}, got {sorted(cols)}")
    out, last = [], None
    for line, row in enumerate(reader, start=2):
        when, bw = _trace_row(path, line, row, time_col)
        if last is not None and when <= last:
            raise TraceError(str(path), line, f"{time_col} must be increasing: {when} after {last}")
        last = when
        out.append((when, None, bw) if time_col == "token" else (None, when, bw))
    if not out:
        raise TraceError(str(path), 1, "no rows: a trace needs at least one rate")
    return out


def _trace_row(path: Path, line: int, row: dict, time_col: str) -> tuple[float, float]:
    try:
        when = int(row[time_col]) if time_col == "token" else float(row[time_col])
        bw = float(row["bandwidth_mbps"])
    except (KeyError, ValueError, TypeError):
        raise TraceError(str(path), line, f"expected {TRACE_COLUMNS} as numbers, got {row}") from None
    if not (math.isfinite(bw) and math.isfinite(when)):
        raise TraceError(str(path), line, f"values must be finite numbers, got {row}")
    if bw <= 0 or when < 0:
        raise TraceError(str(path), line, f"bandwidth_mbps must be > 0 and {time_col} >= 0, got {row}")
    return when, bw


def _trace(item: TraceItem, base_dir: Path) -> list[Change]:
    t = item.trace
    return [Change(tok, at_s, tuple(t.link), None, {"bandwidth_mbps": bw})
            for tok, at_s, bw in read_trace(trace_path(t.file, base_dir))]


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
                                    rates={(l.a, l.b): l.bandwidth_mbps for l in spec.topology.links})
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
