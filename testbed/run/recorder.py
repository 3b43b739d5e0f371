"""The run directory: resolved config, manifest, append-only events, per-token table, summary.

Everything is written as it happens (each event line and token row is flushed and fsync'd), so a
run that dies half-way keeps what it recorded. ``summary.json`` is a fold over ``tokens.csv`` and
``events.jsonl`` and is rewritten atomically after every completed (algorithm, repetition).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

TOKEN_COLUMNS = [
    "algorithm", "repetition", "token_index", "token_id", "context_len", "latency_s", "compute_s",
    "transfer_s", "wait_s", "migration_s", "bytes_moved", "migrated_bytes", "phase",
    "bytes_by_link",  # JSON {"h1->h2": bytes}: activation bytes per host pair for this token
]


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "kernel": platform.release()}
    for pkg in ("torch", "numpy", "pydantic", "highspy", "ortools", "mininet"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


class RunRecorder:
    """Owns one run directory. Open it, append events and token rows, close it."""

    def __init__(self, run_dir: Path, *, resume: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.time()
        self._events = open(self.dir / "events.jsonl", "a", buffering=1)
        tokens_path = self.dir / "tokens.csv"
        new_table = not tokens_path.exists() or tokens_path.stat().st_size == 0
        if resume and not new_table:
            self._truncate_incomplete()
        self._tokens_file = open(tokens_path, "a", newline="", buffering=1)
        self._tokens = csv.DictWriter(self._tokens_file, fieldnames=TOKEN_COLUMNS)
        if new_table:
            self._tokens.writeheader()

    # -- writing -------------------------------------------------------------------------------
    def write_config(self, resolved: dict) -> None:
        (self.dir / "config.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    def write_manifest(self, extra: dict) -> None:
        manifest = {"git_sha": _git_sha(), "versions": _versions(), "started_at": self._t0,
                    "resources_file": "resources.jsonl", **extra}
        _atomic_write(self.dir / "manifest.json", json.dumps(manifest, indent=2, default=str))

    def update_manifest(self, **fields: Any) -> None:
        path = self.dir / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {}
        manifest.update(fields)
        _atomic_write(path, json.dumps(manifest, indent=2, default=str))

    def merge_manifest(self, key: str, entries: dict) -> None:
        """Add ``entries`` to the mapping ``manifest[key]`` (e.g. per algorithm/repetition)."""
        path = self.dir / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {}
        self.update_manifest(**{key: {**(manifest.get(key) or {}), **entries}})

    def event(self, type_: str, **fields: Any) -> None:
        line = json.dumps({"t_s": round(time.time() - self._t0, 6), "wall": time.time(), "type": type_, **fields},
                          default=str)
        self._events.write(line + "\n")
        self._events.flush()
        os.fsync(self._events.fileno())

    def token(self, row: dict) -> None:
        self._tokens.writerow({k: row.get(k, "") for k in TOKEN_COLUMNS})
        self._tokens_file.flush()
        os.fsync(self._tokens_file.fileno())

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.dir / "summary.json", json.dumps(summary, indent=2, default=float))

    def close(self) -> None:
        self._events.close()
        self._tokens_file.close()

    # -- resume --------------------------------------------------------------------------------
    def completed(self) -> set[tuple[str, int]]:
        """(algorithm, repetition) pairs whose ``repetition_done`` event was recorded."""
        done = set()
        for ev in read_events(self.dir):
            if ev["type"] == "repetition_done":
                done.add((ev["algorithm"], int(ev["repetition"])))
        return done

    def _truncate_incomplete(self) -> None:
        """Drop token rows of (algorithm, repetition) pairs that never completed."""
        done = self.completed()
        path = self.dir / "tokens.csv"
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if (r["algorithm"], int(r["repetition"])) in done]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=TOKEN_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything before it stands
    return out


def _latest_attempts(events: list[dict]) -> list[dict]:
    """Events of each (algorithm, repetition)'s last attempt only (earlier ones were interrupted)."""
    attempts: dict[tuple, list[dict]] = {}
    other = []
    for ev in events:
        if "algorithm" not in ev:
            other.append(ev)
            continue
        key = (ev["algorithm"], ev.get("repetition"))
        if ev["type"] == "algorithm_started":
            attempts[key] = []
        attempts.setdefault(key, []).append(ev)
    return other + [ev for evs in attempts.values() for ev in evs]


def summarize(run_dir: Path, algorithms: list[str], source: str | None = None) -> dict:
    """Fold tokens.csv and events.jsonl into the per-algorithm summary (DESIGN.md §3)."""
    import pandas as pd

    path = Path(run_dir) / "tokens.csv"
    table = pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame(columns=TOKEN_COLUMNS)
    events = _latest_attempts(read_events(run_dir))
    summary = {}
    for algo in algorithms:
        rows = table[(table["algorithm"] == algo) & (table["phase"] == "decode")]
        lat = rows["latency_s"].to_numpy(dtype=float)
        evs = [e for e in events if e.get("algorithm") == algo]
        migrations = [e for e in evs if e["type"] == "migration"]
        failures = [e for e in evs if e["type"] == "algorithm_failed"]
        peaks: dict[str, int] = {}
        for e in evs:
            if e["type"] == "repetition_done":
                for host, b in (e.get("peak_mem_bytes") or {}).items():
                    peaks[host] = max(peaks.get(host, 0), int(b))
        summary[algo] = {
            "mean_token_latency_s": float(lat.mean()) if lat.size else None,
            "p95_token_latency_s": float(np.percentile(lat, 95)) if lat.size else None,
            "tokens_generated": int(len(table[table["algorithm"] == algo])),
            "migrations": int(sum(len(e.get("moves", [])) for e in migrations)),
            "migration_epochs": len(migrations),
            "migrated_bytes": int(sum(e.get("bytes_moved", 0) for e in migrations)),
            "peak_mem_bytes": peaks,
            "max_peak_mem_bytes": max(peaks.values()) if peaks else None,
            "max_worker_peak_mem_bytes": max((b for h, b in peaks.items() if h != source), default=None),
            "failed": bool(failures),
            "failure": failures[-1].get("reason") if failures else None,
        }
    return summary
