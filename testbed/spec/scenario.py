"""Expand an experiment's scenario (steps, ramps, random walks, traces) into a concrete timeline.

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


def _trace(item: TraceItem, base_dir: Path) -> list[Change]:
    t = item.trace
    path = (base_dir / t.file) if not Path(t.file).is_absolute() else Path(t.file)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ScenarioError(f"trace {path}: {exc.strerror}") from None
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            bw = float(row["bandwidth_mbps"])
            if "token" in row and row["token"] not in (None, ""):
                out.append(Change(int(row["token"]), None, tuple(t.link), None, {"bandwidth_mbps": bw}))
            else:
                out.append(Change(None, float(row["t_s"]), tuple(t.link), None, {"bandwidth_mbps": bw}))
        except (KeyError, ValueError, TypeError):
            raise ScenarioError(f"{path}:{line}: expected columns token (or t_s) and bandwidth_mbps > 0, got {row}") from None
        if bw <= 0:
            raise ScenarioError(f"{path}:{line}: bandwidth_mbps must be > 0, got {bw}")
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
                                    rates={(l.a, l.b): l.bandwidth_mbps for l in spec.topology.links})
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
