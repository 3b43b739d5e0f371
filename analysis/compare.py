"""Comparisons between algorithms of one run: is a difference significant or within noise?

Each algorithm's repetitions give one value each (mean decode latency; largest per-device peak
memory, the source excluded: its embeddings are the same for every algorithm), taken from the
summary's ``per_repetition`` entries. Two algorithms are compared with Welch's t-test at the 5 % level (``testbed.run.stats.welch``). The reference (resource_aware) is
compared with every other algorithm that produced tokens; the best other (lowest mean latency among
those that did not fail, else among all) is marked, since "RA vs the best baseline" is the question
the report answers first.
"""
from __future__ import annotations

import pandas as pd

from analysis.load import REFERENCE, Run
from testbed.run import stats

METRICS = {"latency": "mean_token_latency_s", "peak memory": "max_worker_peak_mem_bytes"}
COLUMNS = ["a", "b", "metric", "mean_a", "mean_b", "ratio", "n_a", "n_b", "verdict", "t", "df", "t_crit",
           "reason", "best_other", "a_failed", "b_failed"]


def per_repetition_values(run: Run, algo: str, key: str) -> list[float]:
    """One value per repetition of ``algo`` (``key`` of its per_repetition entries; missing ones left out)."""
    reps = run.summary.get(algo, {}).get("per_repetition") or []
    return [float(r[key]) for r in reps if isinstance(r, dict) and r.get(key) is not None]


def best_other(run: Run, reference: str = REFERENCE) -> str | None:
    """The non-reference algorithm with the lowest mean latency (completed ones first)."""
    cands = [(bool(s.get("failed")), s["mean_token_latency_s"], a) for a, s in run.summary.items()
             if a != reference and s.get("mean_token_latency_s") is not None]
    return min(cands)[2] if cands else None


def compare(run: Run, a: str, b: str, metric: str) -> dict:
    """One row: ``a`` against ``b`` on ``metric`` (a key of METRICS)."""
    key = METRICS[metric]
    xa, xb = per_repetition_values(run, a, key), per_repetition_values(run, b, key)
    w = stats.welch(xa, xb)
    da, db = stats.describe(xa)["mean"], stats.describe(xb)["mean"]
    return {"a": a, "b": b, "metric": metric, "mean_a": da, "mean_b": db,
            "ratio": (da / db) if da is not None and db else None, "n_a": len(xa), "n_b": len(xb),
            "verdict": w.verdict, "t": w.t, "df": w.df, "t_crit": w.t_crit, "reason": w.reason,
            "best_other": False, "a_failed": bool(run.summary.get(a, {}).get("failed")),
            "b_failed": bool(run.summary.get(b, {}).get("failed"))}


def significance_table(run: Run, reference: str = REFERENCE) -> pd.DataFrame:
    """The reference against every other algorithm with tokens, on latency and peak memory; the best
    other's rows first and marked ``best_other``. Empty when the reference is not in the run."""
    if reference not in run.summary:
        return pd.DataFrame(columns=COLUMNS)
    best = best_other(run, reference)
    others = [a for a in run.algorithms if a != reference and run.summary.get(a, {}).get("tokens_generated")]
    others.sort(key=lambda a: a != best)
    rows = []
    for other in others:
        for metric in METRICS:
            row = compare(run, reference, other, metric)
            row["best_other"] = other == best
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def verdict_line(row: dict, unit_scale: float, unit: str) -> str:
    """'resource_aware 12.3 ms vs edgeshard 14.1 ms (0.87×): significant (|t| = 5.1 > 2.78)'."""
    def fmt(v):
        return "—" if v is None else f"{v * unit_scale:.3g} {unit}"
    ratio = f" ({row['ratio']:.2f}×)" if row.get("ratio") is not None else ""
    return (f"{row['a']} {fmt(row['mean_a'])} vs {row['b']} {fmt(row['mean_b'])}{ratio}: "
            f"{row['verdict']} ({row['reason']})")
