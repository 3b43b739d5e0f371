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
import math
from pathlib import Path
from typing import Any

import numpy as np

from testbed.run import stats

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
    # crashed agents restarted, their blocks rebuilt and every KV cache replayed (``Cluster.recover``)
    "recovery": ("token_index", "hosts", "duration_s", "replayed_tokens", "replayed_bytes", "cause"),
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
    return _parse(path.read_text(errors="replace"), path.name, problems)


def _parse(text: str, name: str, problems: list[str], first_line: int = 1) -> list[dict]:
    out = []
    for n, line in enumerate(text.splitlines(), first_line):
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{name}:{n}: torn or malformed line skipped")
            continue
        if isinstance(ev, dict) and "type" in ev:
            out.append(ev)
    return out


class EventTail:
    """``read_events`` of a file that is only appended to (a run's own ``events.jsonl`` while it
    runs, which the runner folds after every algorithm): each ``read`` parses only the complete
    lines appended since the last one (a 128-device run's log is ~20 MB)."""

    def __init__(self, path: Path | str):
        path = Path(path)
        self.path = path / "events.jsonl" if path.is_dir() or path.name != "events.jsonl" else path
        self.offset, self.events, self.lines = 0, [], 0

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a torn last line is parsed again next time, never kept
        done = data[:end].decode(errors="replace")
        self.events += _parse(done, self.path.name, [], self.lines + 1)
        self.offset, self.lines = self.offset + end, self.lines + done.count("\n")
        return self.events + _parse(data[end:].decode(errors="replace"), self.path.name, [])


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
            if isinstance(b, (int, float)) and math.isfinite(b):  # a peak that is not a number is no peak
                peaks[host] = max(peaks.get(host, 0), int(b))
    return peaks


STATISTICS_NOTE = ("latency_ci95_s and peak_memory.ci95_bytes: Student-t 95 % interval of the mean over "
                   "per-repetition values (decode-token mean latency; largest per-device peak, source excluded); "
                   "p50/p95 latency over all decode tokens of all repetitions; testbed.run.stats")


def failure_kind(reason: str | None) -> str:
    """'infeasible', 'OOM', 'timeout' or 'failed' from a failure's text (the planner's "infeasible"
    is checked first: its message names memory)."""
    text = (reason or "").lower()
    if "infeasible" in text:
        return "infeasible"
    if any(w in text for w in ("oom", "out of memory", "memory", "killed", "-9")):
        return "OOM"
    if "timeout" in text or "timed out" in text:
        return "timeout"
    return "failed"


def memory_ran_out(reason: str | None, oom_event: bool = False) -> bool:
    """A failure caused by memory: an OOM kill, or no placement because the devices' memory is too small."""
    text = (reason or "").lower()
    if oom_event or failure_kind(reason) == "OOM":
        return True
    return failure_kind(reason) == "infeasible" and any(
        w in text for w in ("mib short", "memory", "cannot hold", "does not fit", "no room"))


def _repetition_entry(mine: Any, evs: list[dict], rep: int, source: str | None) -> dict:
    """One repetition of one algorithm: its latency mean, tokens, peaks and how it ended."""
    rows = mine[mine["repetition"] == rep]
    lat = stats.finite(as_floats(rows[rows["phase"] == "decode"]["latency_s"]))
    rev = [e for e in evs if e.get("repetition") == rep]
    fails = [e for e in rev if e["type"] == "algorithm_failed"]
    peaks = peaks_of(rev)
    reason = fails[-1].get("reason") if fails else None
    bad = rows[~np.isfinite(as_floats(rows["latency_s"]))]
    if not fails and len(bad):  # a latency that is not a number is a failure, never a NaN mean
        reason = (f"non-finite latency at token {int(bad['token_index'].iloc[0])}: "
                  "the backend produced no usable time (recorded as a failure)")
    ran_out = bool(reason) and memory_ran_out(reason, any(e["type"] == "oom_kill" for e in rev))
    ctx = stats.finite(as_floats(rows["context_len"]))
    context = int(ctx.max()) + 1 if ran_out and ctx.size else None  # the last token's context, plus it
    return {"repetition": int(rep), "mean_token_latency_s": float(lat.mean()) if lat.size else None,
            "tokens_generated": int(len(rows)), "peak_mem_bytes": peaks,
            "max_peak_mem_bytes": max(peaks.values()) if peaks else None,
            "max_worker_peak_mem_bytes": max((b for h, b in peaks.items() if h != source), default=None),
            "failed": reason is not None, "failure": reason,
            "memory_ran_out": ran_out, "context_len_reached": context}


def as_floats(col: Any) -> np.ndarray:
    """A column as floats; what is not a number becomes NaN."""
    return np.asarray([_to_float(v) for v in col], dtype=float)


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _repetitions_of(mine: Any, evs: list[dict]) -> list[int]:
    reps = {int(r) for r in mine["repetition"].dropna()} | \
        {int(e["repetition"]) for e in evs if e.get("repetition") is not None}
    return sorted(reps)


def _latency_block(mine: Any, per_rep: list[dict], nulls: dict) -> dict:
    lat = stats.finite(as_floats(mine[mine["phase"] == "decode"]["latency_s"]))
    pooled = stats.describe(lat)
    ci = stats.mean_ci95([r["mean_token_latency_s"] for r in per_rep])
    if not lat.size:
        for key in ("mean_token_latency_s", "p50_token_latency_s", "p95_token_latency_s"):
            nulls[key] = "no decode token was produced"
    if ci is None:
        nulls["latency_ci95_s"] = (f"{sum(r['mean_token_latency_s'] is not None for r in per_rep)} repetition(s) "
                                   "with decode tokens: a confidence interval needs >= 2")
    return {"mean_token_latency_s": pooled["mean"], "p50_token_latency_s": pooled["p50"],
            "p95_token_latency_s": pooled["p95"], "latency_ci95_s": ci.to_json() if ci else None}


def _memory_block(per_rep: list[dict], peaks: dict[str, int], source: str | None, nulls: dict) -> dict:
    largest = [r["max_worker_peak_mem_bytes"] for r in per_rep]  # the source's embeddings are everyone's
    d = stats.describe(largest)
    ci = stats.mean_ci95(largest)
    if ci is None:
        nulls["peak_memory.ci95_bytes"] = (f"{d['n']} repetition(s) with a measured peak: "
                                           "a confidence interval needs >= 2")
    if not peaks:
        nulls["max_peak_mem_bytes"] = "no memory was measured (no repetition_done or mem_sample event)"
    ran_out = [r for r in per_rep if r["memory_ran_out"]]
    context = min(ran_out, key=lambda r: r["tokens_generated"]) if ran_out else None
    if context is None:
        nulls["context_reached"] = "memory did not run out"
    return {
        "peak_mem_bytes": peaks,
        "max_peak_mem_bytes": max(peaks.values()) if peaks else None,
        "max_worker_peak_mem_bytes": max((b for h, b in peaks.items() if h != source), default=None),
        "peak_memory": {"over": "per-repetition largest per-device peak, the source excluded",
                        "mean_bytes": d["mean"], "p50_bytes": d["p50"], "p95_bytes": d["p95"], "n": d["n"],
                        "ci95_bytes": ci.to_json() if ci else None},
        "memory_ran_out": bool(ran_out),
        "context_reached": None if context is None else {
            "repetition": context["repetition"], "tokens_generated": context["tokens_generated"],
            "context_len": context["context_len_reached"]},
    }


def fold_summary(tokens: Any, events: list[dict], algorithm: str, source: str | None = None,
                 varied: dict | None = None) -> dict:
    """The summary.json entry of one algorithm (DESIGN.md §3; docs/experiments.md "Statistics") from
    the token table (a DataFrame with ``TOKEN_COLUMNS``) and the latest attempts' events. Holds no NaN:
    a value that cannot be given is null and ``null_reasons`` says why."""
    mine = tokens[tokens["algorithm"] == algorithm]
    evs = [e for e in events if e.get("algorithm") == algorithm]
    migrations = [e for e in evs if e["type"] == "migration"]
    per_rep = [_repetition_entry(mine, evs, r, source) for r in _repetitions_of(mine, evs)]
    failed = [r for r in per_rep if r["failed"]]
    nulls: dict[str, str] = {}
    out = {
        **_latency_block(mine, per_rep, nulls),
        "tokens_generated": int(len(mine)),
        "repetitions": len(per_rep),
        "migrations": int(sum(len(e.get("moves") or []) for e in migrations)),
        "migration_epochs": len(migrations),
        "migrated_bytes": int(sum(e.get("bytes_moved") or 0 for e in migrations)),
        **_memory_block(per_rep, peaks_of(evs), source, nulls),
        "failed": bool(failed),
        "failure": failed[-1]["failure"] if failed else None,
        "per_repetition": per_rep,
        "varied_across_repetitions": varied or {},
        "statistics": STATISTICS_NOTE,
    }
    if not out["failed"]:
        nulls["failure"] = "did not fail"
    out["null_reasons"] = nulls
    return without_nan(out, nulls)


def without_nan(value: Any, nulls: dict[str, str], key: str = "") -> Any:
    """``value`` with every non-finite float replaced by None (and a reason under its dotted key)."""
    if isinstance(value, dict):
        return {k: (v if k == "null_reasons" else without_nan(v, nulls, f"{key}.{k}" if key else str(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v, nulls, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        nulls.setdefault(key, f"non-finite value ({value}) recorded")
        return None
    return value
