"""The run's record types and the one fold over them (DESIGN.md §3, §5 "append-only events").

``events.jsonl`` is append-only, one JSON object a line with ``t_s`` and ``type``; ``EVENT_FIELDS``
names every type the testbed writes and the fields a reader may rely on. ``tokens.csv`` has
``TOKEN_COLUMNS``. Everything derived (``summary.json``, the analysis tables) is a fold over these two
files: ``read_events`` -> ``latest_attempts`` -> ``fold_summary``. The recorder writes
``summary.json`` with this fold and ``analysis.load`` re-derives it with the same one.

Rules of the fold (one place, so the recorder and analysis cannot disagree):
- Torn lines: every line that does not decode to an object with a ``type`` is skipped and noted in
  ``problems``; the lines after it stand. A crash tears at most the last line; a resumed run
  appends after it (the recorder first ends the torn line), so nothing recorded later is lost.
- Attempts: of each (algorithm, repetition) only the events of its last ``algorithm_started``
  count (earlier attempts were interrupted); events of pairs never started are kept.
- Peaks: per host, the maximum over ``repetition_done.peak_mem_bytes`` and the ``mem_sample``
  events' ``host_peak_mem_bytes`` (``host_mem_bytes`` in runs written before that field). A completed
  repetition's peak is at least every sample, so this equals the backend's peak; an interrupted one
  keeps the highest peak it measured instead of none.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_COLUMNS = [
    "algorithm", "repetition", "token_index", "token_id", "context_len", "latency_s", "compute_s",
    "transfer_s", "wait_s", "migration_s", "bytes_moved", "migrated_bytes", "phase",
    "bytes_by_link",  # JSON {"h1->h2": bytes}: activation bytes per host pair for this token
]

# type -> fields beyond t_s/type that the writers always set (per-algorithm ones carry
# ``algorithm`` and ``repetition`` as well)
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "run_started": ("experiment", "backend"),
    "algorithm_started": ("algorithm", "repetition"),
    "scenario_applied": ("token_index", "change", "link", "host", "values", "readback"),
    "plan": ("token_index", "placement", "predicted_token_latency_s", "solve_time_s"),
    "migration": ("token_index", "duration_s", "bytes_moved", "moves", "trigger"),
    "migration_refused": ("token_index", "reason"),
    "mem_sample": ("token_index", "host_mem_bytes", "host_peak_mem_bytes"),
    "oom_kill": ("token_index", "host"),
    "algorithm_failed": ("token_index", "reason"),
    "repetition_done": ("failed", "peak_mem_bytes"),
}


def read_events(path: Path | str, problems: list[str] | None = None) -> list[dict]:
    """Every well-formed event of ``path`` (``events.jsonl`` or a run directory holding one), in
    file order; undecodable lines are skipped and noted in ``problems`` (see the module rules)."""
    path = Path(path)
    if path.is_dir() or path.name != "events.jsonl":
        path = path / "events.jsonl"
    problems = problems if problems is not None else []
    if not path.exists():
        problems.append(f"{path.name}: missing")
        return []
    out = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path.name}:{n}: torn or malformed line skipped")
            continue
        if isinstance(ev, dict) and "type" in ev:
            out.append(ev)
    return out


def latest_attempts(events: list[dict]) -> list[dict]:
    """Events of each (algorithm, repetition)'s last attempt only, in file order."""
    attempt: dict[tuple, int] = {}
    marks = []
    for ev in events:
        key = (ev.get("algorithm"), ev.get("repetition"))
        if "algorithm" in ev and ev["type"] == "algorithm_started":
            attempt[key] = attempt.get(key, -1) + 1
        marks.append(attempt.get(key, -1))
    return [ev for ev, m in zip(events, marks)
            if "algorithm" not in ev or m == attempt.get((ev.get("algorithm"), ev.get("repetition")), -1)]


def peaks_of(events: list[dict]) -> dict[str, int]:
    """Per-host peak memory of the given (one algorithm's) events (module rule "Peaks")."""
    peaks: dict[str, int] = {}
    for e in events:
        if e["type"] == "repetition_done":
            seen = e.get("peak_mem_bytes")
        elif e["type"] == "mem_sample":
            seen = e.get("host_peak_mem_bytes") or e.get("host_mem_bytes")
        else:
            continue
        for host, b in (seen or {}).items():
            peaks[host] = max(peaks.get(host, 0), int(b))
    return peaks


def fold_summary(tokens: Any, events: list[dict], algorithm: str, source: str | None = None) -> dict:
    """The summary.json entry of one algorithm (DESIGN.md §3) from the token table (a DataFrame
    with ``TOKEN_COLUMNS``) and the latest attempts' events."""
    mine = tokens[tokens["algorithm"] == algorithm]
    lat = mine[mine["phase"] == "decode"]["latency_s"].to_numpy(dtype=float)
    evs = [e for e in events if e.get("algorithm") == algorithm]
    migrations = [e for e in evs if e["type"] == "migration"]
    failures = [e for e in evs if e["type"] == "algorithm_failed"]
    peaks = peaks_of(evs)
    return {
        "mean_token_latency_s": float(lat.mean()) if lat.size else None,
        "p95_token_latency_s": float(np.percentile(lat, 95)) if lat.size else None,
        "tokens_generated": int(len(mine)),
        "migrations": int(sum(len(e.get("moves") or []) for e in migrations)),
        "migration_epochs": len(migrations),
        "migrated_bytes": int(sum(e.get("bytes_moved") or 0 for e in migrations)),
        "peak_mem_bytes": peaks,
        "max_peak_mem_bytes": max(peaks.values()) if peaks else None,
        "max_worker_peak_mem_bytes": max((b for h, b in peaks.items() if h != source), default=None),
        "failed": bool(failures),
        "failure": failures[-1].get("reason") if failures else None,
    }
