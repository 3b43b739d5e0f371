"""The run directory: resolved config, manifest, append-only events, per-token table, summary.

Everything is written as it happens: each event line and token row is flushed to the OS at once
(a run whose process dies half-way keeps what it recorded) and fsync'd at most every
``SYNC_EVERY_S`` seconds and at every run/repetition boundary event and on close (an fsync a
line cost ~2 ms here: 40 000 of them were most of a 128-device simulated run, issue 18). ``summary.json`` is ``testbed.run.events.fold_summary`` over
``tokens.csv`` and ``events.jsonl`` and is rewritten atomically after every completed (algorithm,
repetition).

``manifest.json`` is append-only across attempts: a resumed run (``--resume``) leaves every field of
the earlier attempts as it was (scenario read-backs, agent PIDs, calibrations) and records its own
under ``attempts[k]`` (k >= 1); mappings merged per (algorithm, repetition) only gain new keys.
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

import yaml

from testbed.run.events import TOKEN_COLUMNS, EventTail, fold_summary, latest_attempts, read_events

SYNC_EVERY_S = 1.0  # the longest stretch of recorded lines an OS crash (not a process crash) can lose
_SYNC_EVENTS = frozenset({"run_started", "run_resumed", "algorithm_started", "repetition_done", "run_done",
                          "run_interrupted"})

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
    for pkg in ("torch", "numpy", "pydantic", "highspy", "mininet"):
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
        self._resume, self._attempt = resume, 0
        _end_torn_line(self.dir / "events.jsonl")  # a resumed run's next event must not join a torn one
        self._events = open(self.dir / "events.jsonl", "a", buffering=1)
        tokens_path = self.dir / "tokens.csv"
        new_table = not tokens_path.exists() or tokens_path.stat().st_size == 0
        if resume and not new_table:
            self._truncate_incomplete()
        self._tokens_file = open(tokens_path, "a", newline="", buffering=1)
        self._tokens = csv.DictWriter(self._tokens_file, fieldnames=TOKEN_COLUMNS)
        if new_table:
            self._tokens.writeheader()
        self._synced = time.monotonic()
        self._manifest: dict | None = None

    # -- writing -------------------------------------------------------------------------------
    def write_config(self, resolved: dict) -> None:
        (self.dir / "config.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    def write_manifest(self, extra: dict) -> None:
        """The first attempt writes the manifest; a resumed one appends its own entry to ``attempts``."""
        fields = {"git_sha": _git_sha(), "versions": _versions(), "started_at": self._t0, **extra}
        path = self.dir / "manifest.json"
        old = _read_json(path) if self._resume else None
        if old is None:
            _atomic_write(path, _dump({**fields, "resources_file": "resources.jsonl", "attempts": []}))
            self._attempt = 0
            return
        attempts = list(old.get("attempts") or [])
        self._attempt = len(attempts) + 1
        attempts.append({"attempt": self._attempt, **fields})
        _atomic_write(path, _dump({**old, "attempts": attempts}))

    def update_manifest(self, **fields: Any) -> None:
        """Set fields of this attempt (top level for the first, ``attempts[k]`` for a resumed one)."""
        path = self.dir / "manifest.json"
        manifest = _read_json(path) or {}
        if self._attempt:
            attempts = manifest.setdefault("attempts", [])
            entry = next((a for a in attempts if a.get("attempt") == self._attempt), None)
            if entry is None:
                attempts.append(entry := {"attempt": self._attempt})
            entry.update(fields)
        else:
            manifest.update(fields)
        _atomic_write(path, _dump(manifest))

    def merge_manifest(self, key: str, entries: dict) -> None:
        """Add ``entries`` to the mapping ``manifest[key]`` (e.g. per algorithm/repetition); a key an
        earlier attempt recorded keeps its value (this attempt's goes to ``attempts[k][key]``)."""
        path = self.dir / "manifest.json"
        manifest = _read_json(path) or {}
        have = manifest.get(key) or {}
        kept = {k: v for k, v in entries.items() if k in have}
        manifest[key] = {**have, **{k: v for k, v in entries.items() if k not in have}}
        _atomic_write(path, _dump(manifest))
        if kept and self._attempt:
            attempt = next(a for a in _read_json(path)["attempts"] if a.get("attempt") == self._attempt)
            self.update_manifest(**{key: {**(attempt.get(key) or {}), **kept}})
        elif kept:
            self.update_manifest(**{key: {**have, **kept}})

    def event(self, type_: str, **fields: Any) -> None:
        line = json.dumps({"t_s": round(time.time() - self._t0, 6), "wall": time.time(), "type": type_, **fields},
                          default=str)
        self._events.write(line + "\n")
        self._events.flush()
        self._sync(force=type_ in _SYNC_EVENTS)

    def token(self, row: dict) -> None:
        self._tokens.writerow({k: row.get(k, "") for k in TOKEN_COLUMNS})
        self._tokens_file.flush()
        self._sync()

    def _sync(self, force: bool = False) -> None:
        """fsync both files when forced or ``SYNC_EVERY_S`` has passed since the last one."""
        now = time.monotonic()
        if force or now - self._synced >= SYNC_EVERY_S:
            os.fsync(self._tokens_file.fileno())
            os.fsync(self._events.fileno())
            self._synced = now

    def write_summary(self, summary: dict) -> None:
        # allow_nan=False: the fold replaces every non-finite number by null with a reason, and a
        # regression must fail loudly here rather than write NaN (issue 15 item 3)
        _atomic_write(self.dir / "summary.json", json.dumps(summary, indent=2, default=float, allow_nan=False))

    def close(self) -> None:
        self._sync(force=True)
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


def _end_torn_line(path: Path) -> None:
    """Terminate a last line a crash left without its newline (it stays one skipped line)."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _dump(manifest: dict) -> str:
    # one top-level key a line, each value in compact JSON: the C encoder (``indent`` selects
    # Python's, ~15 s for a 128-device run's 20 MB of scenario records)
    return "{\n" + ",\n".join(f"  {json.dumps(str(k))}: {json.dumps(v, default=str)}"
                               for k, v in manifest.items()) + "\n}\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(run_dir: Path, algorithms: list[str], source: str | None = None, tail: EventTail | None = None,
              varied: dict | None | bool = False) -> dict:
    """Fold tokens.csv and events.jsonl into the per-algorithm summary (DESIGN.md §3).
    ``tail``: read the events through it (only what was appended since its last read);
    ``varied``: the manifest's ``repetition_variation`` when the caller has it (else read)."""
    import pandas as pd

    path = Path(run_dir) / "tokens.csv"
    table = pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame(columns=TOKEN_COLUMNS)
    events = latest_attempts(tail.read() if tail is not None else read_events(run_dir))
    if varied is False:
        manifest_path = Path(run_dir) / "manifest.json"
        try:
            varied = json.loads(manifest_path.read_text()).get("repetition_variation") if manifest_path.exists() else None
        except (json.JSONDecodeError, OSError):
            varied = None
    return {algo: fold_summary(table, events, algo, source, varied) for algo in algorithms}
