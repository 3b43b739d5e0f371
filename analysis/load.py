"""Reading run directories (DESIGN.md §3) into tidy pandas frames; nothing here re-runs anything.

A run directory may be partial: a crash leaves a torn last line in ``events.jsonl`` or
``tokens.csv``, ``summary.json`` may be missing or older than the tables, an algorithm may have
started and failed or never started. ``load_run`` keeps everything that was recorded, notes what it
had to skip in ``Run.problems``, and derives the summary from the tables where the file lacks it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from testbed.run.events import TOKEN_COLUMNS, failure_kind, fold_summary, latest_attempts, read_events

NUMERIC_TOKEN_COLUMNS = [
    "repetition", "token_index", "token_id", "context_len", "latency_s", "compute_s", "transfer_s",
    "wait_s", "migration_s", "bytes_moved", "migrated_bytes",
]
BREAKDOWN = ["compute_s", "transfer_s", "wait_s", "migration_s"]
REFERENCE = "resource_aware"


@dataclass
class Run:
    """One run directory, loaded. Frames are tidy (one observation a row)."""

    path: Path
    config: dict
    manifest: dict
    summary: dict  # algorithm -> the summary.json entry, completed from the tables where missing
    tokens: pd.DataFrame  # TOKEN_COLUMNS, numeric columns as numbers
    events: list[dict]  # the last attempt of every (algorithm, repetition), in file order
    problems: list[str] = field(default_factory=list)

    @property
    def experiment(self) -> str:
        return str(self.manifest.get("experiment") or self.config.get("name") or self.path.parent.name)

    @property
    def sweep_point(self) -> dict:
        point = self.config.get("sweep_point")
        return dict(point) if isinstance(point, dict) else {}

    @property
    def label(self) -> str:
        point = self.sweep_point
        return ", ".join(f"{k}={v}" for k, v in point.items()) if point else self.path.name

    @property
    def algorithms(self) -> list[str]:
        """Configured order first, then any algorithm seen only in the data."""
        names: list[str] = []
        for a in self.config.get("algorithms") or []:
            names.append(a if isinstance(a, str) else str(a.get("name")))
        seen = list(self.summary) + list(pd.unique(self.tokens["algorithm"])) + \
            [e["algorithm"] for e in self.events if "algorithm" in e]
        for a in seen:
            if a not in names:
                names.append(a)
        return names

    def events_of(self, type_: str) -> pd.DataFrame:
        """Events of one type as a frame (columns: the union of their fields)."""
        rows = [e for e in self.events if e.get("type") == type_]
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["t_s", "type", "algorithm", "repetition"])

    def decode(self, algorithm: str | None = None) -> pd.DataFrame:
        t = self.tokens[self.tokens["phase"] == "decode"]
        return t if algorithm is None else t[t["algorithm"] == algorithm]


# -- raw files (events: ``testbed.run.events.read_events``, the recorder's reader) -----------------
def read_tokens(run_dir: Path, problems: list[str] | None = None) -> pd.DataFrame:
    """tokens.csv (or tokens.parquet) with numeric columns coerced; torn rows are dropped."""
    problems = problems if problems is not None else []
    csv_path, pq_path = run_dir / "tokens.csv", run_dir / "tokens.parquet"
    frame = pd.DataFrame(columns=TOKEN_COLUMNS)
    try:
        if csv_path.exists() and csv_path.stat().st_size:
            frame = pd.read_csv(csv_path, on_bad_lines="skip", engine="python")
        elif pq_path.exists():
            frame = pd.read_parquet(pq_path)
        else:
            problems.append("tokens table: missing or empty")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError, ImportError) as exc:  # parquet needs pyarrow
        problems.append(f"tokens table unreadable: {exc}")
    for col in TOKEN_COLUMNS:
        if col not in frame.columns:
            frame[col] = np.nan
    for col in NUMERIC_TOKEN_COLUMNS:
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    bad = frame["latency_s"].isna() | frame["algorithm"].isna() | frame["token_index"].isna()
    if bad.any():
        problems.append(f"tokens table: {int(bad.sum())} incomplete row(s) dropped")
    frame = frame[~bad].copy()
    frame["algorithm"] = frame["algorithm"].astype(str)
    frame["phase"] = frame["phase"].fillna("decode").astype(str)
    frame[["repetition", "token_index"]] = frame[["repetition", "token_index"]].astype(int)
    for col in BREAKDOWN + ["bytes_moved", "migrated_bytes"]:
        frame[col] = frame[col].fillna(0.0)
    return frame.reset_index(drop=True)


def _read_json(path: Path, problems: list[str]) -> dict:
    if not path.exists():
        problems.append(f"{path.name}: missing")
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path, problems: list[str]) -> dict:
    if not path.exists():
        problems.append(f"{path.name}: missing")
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return {}
    return data if isinstance(data, dict) else {}


# -- folds -------------------------------------------------------------------------------------
def derive_summary(tokens: pd.DataFrame, events: list[dict], algorithm: str, source: str | None = None,
                   varied: dict | None = None) -> dict:
    """The summary.json entry of one algorithm, folded from the tables: ``testbed.run.events.fold_summary``,
    the fold the recorder writes summary.json with."""
    return fold_summary(tokens, events, algorithm, source, varied)


def load_run(run_dir: Path | str) -> Run:
    """Load one run directory; never raises for missing or partial files (see ``Run.problems``)."""
    run_dir = Path(run_dir)
    problems: list[str] = []
    config = _read_yaml(run_dir / "config.resolved.yaml", problems)
    manifest = _read_json(run_dir / "manifest.json", problems)
    summary_file = _read_json(run_dir / "summary.json", problems)
    events = latest_attempts(read_events(run_dir / "events.jsonl", problems))
    tokens = read_tokens(run_dir, problems)
    run = Run(run_dir, config, manifest, {}, tokens, events, problems)
    source = topology_source(config)
    for algo in run.algorithms + [a for a in summary_file if a not in run.algorithms]:
        derived = derive_summary(tokens, events, algo, source, manifest.get("repetition_variation"))
        run.summary[algo] = _merge_summary(derived, summary_file.get(algo),
                                           tokens.empty, algo, problems)
        merged = run.summary[algo]
        merged["started"] = any(e.get("algorithm") == algo and e["type"] == "algorithm_started" for e in events) \
            or merged["tokens_generated"] > 0
        merged["completed"] = any(e.get("algorithm") == algo and e["type"] == "repetition_done" for e in events)
        merged["failed_at_token"] = failure_token(events, algo)
    return run


def _merge_summary(derived: dict, entry: Any, no_tokens: bool, algo: str, problems: list[str]) -> dict:
    """summary.json's entry where it agrees with the tables (it is rewritten only after each completed
    repetition, so after a crash it can be stale); otherwise the fold of the tables."""
    if not isinstance(entry, dict):
        return dict(derived)
    fresh = no_tokens or entry.get("tokens_generated") == derived["tokens_generated"]
    if not fresh:
        problems.append(f"summary.json is stale for {algo}: numbers derived from tokens/events instead")
        return dict(derived)
    merged = {**derived, **{k: v for k, v in entry.items() if v is not None and v != {}}}
    if derived["failed"] and not entry.get("failed"):
        merged.update(failed=True, failure=derived["failure"])  # the events are newer than the file
    return merged


def expand_run_dirs(paths: list[Path | str]) -> list[Path]:
    """Run directories from the given paths: a sweep's top directory expands to its point-* dirs."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "events.jsonl").exists() or (p / "tokens.csv").exists():
            out.append(p)
            continue
        points = sorted((d for d in p.glob("point-*") if d.is_dir()), key=_natural_key)
        out.extend(points or [p])
    return out


def load_runs(paths: list[Path | str]) -> list[Run]:
    return [load_run(p) for p in expand_run_dirs(paths)]


def _natural_key(path: Path) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


# -- derived tables ----------------------------------------------------------------------------
def failure_token(events: list[dict], algorithm: str) -> int | None:
    fails = [e for e in events if e.get("algorithm") == algorithm and e["type"] == "algorithm_failed"]
    if not fails or fails[-1].get("token_index") is None:
        return None
    return int(fails[-1]["token_index"])


def failure_label(run: Run, algo: str) -> str | None:
    """'OOM at token 37', 'not run', or None for an algorithm that completed."""
    s = run.summary.get(algo, {})
    if not s.get("failed"):
        return None if s.get("started", True) else "not run"
    return short_failure(s.get("failure"), s.get("failed_at_token"))


def short_failure(reason: str | None, token: int | None) -> str:
    """A one-phrase label for a failure: 'OOM at token 37', 'infeasible at token 0', ..."""
    kind = failure_kind(reason)
    return f"{kind} at token {token}" if token is not None else kind


def latency_table(run: Run) -> pd.DataFrame:
    """One row per algorithm: summary numbers, decode breakdown means, ratio to resource_aware."""
    rows = []
    for algo in run.algorithms:
        s = run.summary.get(algo, {})
        dec = run.decode(algo)
        row: dict[str, Any] = {"algorithm": algo, **{k: s.get(k) for k in (
            "mean_token_latency_s", "p95_token_latency_s", "tokens_generated", "migrations",
            "migrated_bytes", "max_peak_mem_bytes", "failed", "failure", "failed_at_token", "started",
            "p50_token_latency_s", "repetitions", "memory_ran_out")}}
        row["latency_ci95_half_s"] = _half(s.get("latency_ci95_s"))
        row["peak_ci95_half_bytes"] = _half((s.get("peak_memory") or {}).get("ci95_bytes"))
        row["context_reached"] = s.get("context_reached")
        for col in BREAKDOWN:
            row[f"mean_{col}"] = float(dec[col].mean()) if len(dec) else None
        # latency_s includes the stall of a migration just before the token; this mean leaves it out
        row["mean_excl_migration_s"] = float((dec["latency_s"] - dec["migration_s"]).mean()) if len(dec) else None
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ref = table.loc[table["algorithm"] == REFERENCE, "mean_token_latency_s"]
    ref_val = ref.iloc[0] if len(ref) and ref.iloc[0] else None
    table["ratio_to_resource_aware"] = [
        (m / ref_val) if (ref_val and m is not None and not pd.isna(m)) else None
        for m in table["mean_token_latency_s"]]
    return table


def _half(ci) -> float | None:
    return float(ci["half_width"]) if isinstance(ci, dict) and ci.get("half_width") is not None else None


def mem_samples(run: Run) -> pd.DataFrame:
    """Long frame: algorithm, repetition, token_index, host, bytes (from mem_sample events)."""
    rows = [{"algorithm": e.get("algorithm"), "repetition": e.get("repetition"), "token_index": e.get("token_index"),
             "host": h, "bytes": b}
            for e in run.events if e["type"] == "mem_sample" for h, b in (e.get("host_mem_bytes") or {}).items()]
    return pd.DataFrame(rows, columns=["algorithm", "repetition", "token_index", "host", "bytes"])


def plan_vs_measured(run: Run) -> pd.DataFrame:
    """Each plan with a prediction against the measured mean decode latency until the next plan."""
    rows = []
    plans = [e for e in run.events if e["type"] == "plan" and e.get("predicted_token_latency_s") is not None]
    for (algo, rep), group in _group(plans).items():
        dec = run.decode(algo)
        dec = dec[dec["repetition"] == rep]
        starts = sorted({int(e.get("token_index") or 0) for e in group})
        for i, e in enumerate(sorted(group, key=lambda e: int(e.get("token_index") or 0))):
            start = int(e.get("token_index") or 0)
            end = next((s for s in starts if s > start), None)
            sel = dec[(dec["token_index"] >= start) & ((dec["token_index"] < end) if end is not None else True)]
            if len(sel):
                rows.append({"algorithm": algo, "repetition": rep, "token_index": start,
                             "predicted_s": float(e["predicted_token_latency_s"]),
                             "measured_s": float(sel["latency_s"].mean()), "solve_time_s": e.get("solve_time_s")})
    return pd.DataFrame(rows, columns=["algorithm", "repetition", "token_index", "predicted_s", "measured_s",
                                       "solve_time_s"])


def _group(events: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for e in events:
        out.setdefault((e.get("algorithm"), e.get("repetition")), []).append(e)
    return out


def topology_source(config: dict) -> str | None:
    """The source host of the resolved config's topology (the one with ``source: true``)."""
    return next((h.get("name") for h in topology_summary(config)["hosts"] if h.get("source")), None)


def topology_summary(config: dict) -> dict:
    """Hosts (memory, cores, source) and links (rate, delay) from the resolved config."""
    topo = config.get("topology") if isinstance(config.get("topology"), dict) else {}
    hosts = [h for h in topo.get("hosts") or [] if isinstance(h, dict)]
    links = [ln for ln in topo.get("links") or [] if isinstance(ln, dict)]
    return {"name": topo.get("name"), "hosts": hosts, "links": links, "switches": topo.get("switches") or []}


def manifest_facts(run: Run) -> dict:
    """Git SHA, kernel, backend, delay/loss mechanism and resource counts from the manifest (and the
    ``meta`` notes of the resources file it names, where the emulated backend records the mechanism)."""
    m = run.manifest
    versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
    facts = {"git_sha": m.get("git_sha"), "kernel": versions.get("kernel") or m.get("kernel"),
             "backend": m.get("backend") or run.config.get("backend"),
             "delay_mechanism": m.get("delay_mechanism"), "loss_mechanism": m.get("loss_mechanism"),
             "versions": versions, "resources": {},
             # emulated runs: the network as measured at bring-up (testbed.emulation.netcheck.bringup_check)
             "network": m.get("network_check") if isinstance(m.get("network_check"), dict) else None}
    res_path = run.path / str(m.get("resources_file") or "resources.jsonl")
    if res_path.is_file():
        for line in res_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(entry, dict):
                continue
            if entry.get("kind") == "meta" and entry.get("key") in facts and facts[entry["key"]] is None:
                facts[entry["key"]] = entry.get("value")
            elif entry.get("kind") != "meta":
                facts["resources"][entry.get("kind")] = facts["resources"].get(entry.get("kind"), 0) + 1
    return facts
