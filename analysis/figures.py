"""Figures from loaded runs (matplotlib, Agg): each saved as PNG and PDF into one output directory.

Per run: per-token latency over the token index, latency CDF, mean/p95 latency with its breakdown,
peak memory per host, memory over tokens per device with its limits and latency vs peak memory
(``analysis.capacity``), migrations, and predicted vs measured latency where plans carry a prediction.
With repetitions, means carry Student-t 95 % confidence intervals as error bars. Across runs (a
sweep): mean latency and peak memory against the swept parameter. A failed algorithm is never
dropped silently: it is drawn as far as it got and labelled with what happened ("OOM at token 37").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.capacity import MEMORY_HOW, PARETO_HOW, fig_memory_tokens, fig_pareto  # noqa: E402
from analysis.load import BREAKDOWN, Run, failure_label, latency_table, plan_vs_measured  # noqa: E402,F401
from analysis.style import FAIL_COLOR, MIB, MS, PART_COLORS, color, linestyle  # noqa: E402,F401
from analysis.sweep import SWEEP_HOW, fig_sweep  # noqa: E402



@dataclass
class Figure:
    name: str
    title: str
    how_to_read: str
    png: Path
    pdf: Path
    run: str | None = None  # the run directory's path; None for figures across runs


def _save(fig, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
    fig.savefig(png, dpi=130, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)
    return png, pdf


def _auto_log(ax, values, axis: str = "y") -> None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    if v.size and v.max() / v.min() > 30:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _num(v) -> float:
    """A number for drawing: None and NaN (no data) become 0."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if np.isfinite(f) else 0.0


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _failure_box(ax, run: Run) -> None:
    lines = [f"{a}: {lab}" for a in run.algorithms if (lab := failure_label(run, a))]
    if lines:
        ax.text(1.01, 0.0, "failed:\n" + "\n".join(lines), transform=ax.transAxes, va="bottom", ha="left", fontsize=8,
                color=FAIL_COLOR, bbox={"boxstyle": "round", "fc": "white", "ec": FAIL_COLOR, "alpha": 0.9})


def _scenario_lines(ax, run: Run) -> None:
    ev = run.events_of("scenario_applied")
    if ev.empty or "token_index" not in ev:
        return
    first = ev.dropna(subset=["token_index"]).drop_duplicates("token_index")
    for _, e in first.iterrows():
        ax.axvline(e["token_index"], color="k", ls=":", lw=0.9, alpha=0.7)
        text = re.sub(r"^token \d+:\s*", "", str(e.get("change", "")))
        ax.annotate(text, (e["token_index"], 0.98), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    va="top", ha="right", alpha=0.85, xytext=(-2, 0), textcoords="offset points")


def _per_token(dec: pd.DataFrame, col: str = "latency_s") -> pd.DataFrame:
    return dec.groupby("token_index")[col].agg(["mean", "min", "max"]).reset_index()


# -- per-run figures ---------------------------------------------------------------------------
def fig_latency_tokens(run: Run):
    fig, ax = plt.subplots(figsize=(9, 4.5))
    mig = run.events_of("migration")
    allv = []
    for k, algo in enumerate(run.algorithms):
        dec = run.decode(algo)
        lab = failure_label(run, algo)
        if dec.empty:
            ax.plot([], [], color=color(algo), label=f"{algo} ({lab or 'no tokens'})")
            continue
        pt = _per_token(dec)
        allv += list(pt["mean"] * MS)
        ax.plot(pt["token_index"], pt["mean"] * MS, color=color(algo), lw=1.6, ls=linestyle(algo, k),
                label=algo + (f" ({lab})" if lab else ""))
        if dec["repetition"].nunique() > 1:
            ax.fill_between(pt["token_index"], pt["min"] * MS, pt["max"] * MS, color=color(algo), alpha=0.15)
        _migration_dots(ax, dec, mig, algo, allv)
        if run.summary.get(algo, {}).get("failed"):
            last = pt.iloc[-1]
            ax.plot(last["token_index"], last["mean"] * MS, marker="X", ms=11, color=FAIL_COLOR, mec="k", zorder=5)
            ax.annotate(lab, (last["token_index"], last["mean"] * MS), xytext=(6, 6), textcoords="offset points",
                        color=FAIL_COLOR, fontsize=8, fontweight="bold")
    _scenario_lines(ax, run)
    _failure_box(ax, run)
    _auto_log(ax, allv)
    if ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)  # small differences are not blown up into cliffs
    ax.plot([], [], "o", color="grey", mec="k", label="migration (latency + stall)")
    ax.set(xlabel="token index (decode)", ylabel="token latency [ms]", title=f"Per-token latency — {run.label}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    ax.grid(alpha=0.3)
    return fig


def _migration_dots(ax, dec: pd.DataFrame, mig: pd.DataFrame, algo: str, allv: list) -> None:
    if mig.empty:
        return
    m = mig[mig["algorithm"] == algo]
    if m.empty:
        return
    per = dec.groupby("token_index")[["latency_s"]].mean()
    idx = [t for t in m["token_index"].dropna().astype(int).unique() if t in per.index]
    y = [per.loc[t, "latency_s"] * MS for t in idx]  # latency_s already includes the migration stall
    allv += y
    ax.scatter(idx, y, s=36, color=color(algo), edgecolor="k", zorder=4)


def fig_latency_cdf(run: Run):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    allv = []
    for k, algo in enumerate(run.algorithms):
        lat = np.sort(run.decode(algo)["latency_s"].to_numpy(float) * MS)
        lab = failure_label(run, algo)
        if not lat.size:
            ax.plot([], [], color=color(algo), label=f"{algo} ({lab or 'no tokens'})")
            continue
        allv += list(lat)
        ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post", color=color(algo), lw=1.5,
                ls=linestyle(algo, k), label=algo + (f" ({lab}; {lat.size} tokens)" if lab else ""))
    _auto_log(ax, allv, "x")
    ax.set(xlabel="token latency [ms]", ylabel="fraction of decode tokens ≤ x", ylim=(0, 1.02),
           title=f"Latency CDF — {run.label}")
    _legend(ax, fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def fig_latency_breakdown(run: Run):
    table = latency_table(run)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(table) + 2), 4.5))
    x = np.arange(len(table))
    top = 0.0
    for i, row in table.iterrows():
        bottom = 0.0
        for col in BREAKDOWN:
            v = _num(row[f"mean_{col}"]) * MS
            ax.bar(x[i] - 0.2, v, 0.38, bottom=bottom, color=PART_COLORS[col], edgecolor="k", lw=0.4)
            bottom += v
        half = _num(row.get("latency_ci95_half_s")) * MS
        if half:
            ax.errorbar(x[i] - 0.2, _num(row["mean_token_latency_s"]) * MS, yerr=half, fmt="none", ecolor="k",
                        capsize=5, lw=1.2)
            bottom = max(bottom, _num(row["mean_token_latency_s"]) * MS + half)
        p95 = _num(row["p95_token_latency_s"]) * MS
        ax.bar(x[i] + 0.2, p95, 0.38, color="white", edgecolor=color(row["algorithm"]), hatch="///", lw=1.2)
        top = max(top, bottom, p95)
    for i, row in table.iterrows():
        lab = failure_label(run, row["algorithm"])
        if lab:
            height = max(_num(row["p95_token_latency_s"]), sum(_num(row[f"mean_{c}"]) for c in BREAKDOWN)) * MS
            ax.annotate(lab if height else f"{lab}\n(no decode tokens)", (x[i], height), xytext=(0, 4),
                        textcoords="offset points", ha="center", va="bottom", color=FAIL_COLOR, fontsize=9,
                        fontweight="bold", bbox={"boxstyle": "round", "fc": "white", "ec": FAIL_COLOR})
    ax.set_ylim(0, max(top, 1e-3) * 1.18)
    for col in BREAKDOWN:
        ax.bar(0, 0, color=PART_COLORS[col], label=f"mean {col[:-2]}")
    ax.bar(0, 0, color="white", edgecolor="k", hatch="///", label="p95 latency")
    ax.set_xticks(x, table["algorithm"], rotation=20, ha="right")
    ax.set(ylabel="per decode token [ms]", title=f"Mean (stacked breakdown) and p95 latency — {run.label}")
    _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def fig_peak_memory(run: Run):
    algos = run.algorithms
    hosts = sorted({h for a in algos for h in (run.summary.get(a, {}).get("peak_mem_bytes") or {})})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(hosts) * max(1, len(algos)) / 2 + 2), 4.5))
    width = 0.8 / max(1, len(algos))
    x = np.arange(len(hosts))
    for k, algo in enumerate(algos):
        peaks = run.summary.get(algo, {}).get("peak_mem_bytes") or {}
        lab = failure_label(run, algo)
        vals = [peaks.get(h, 0) / MIB for h in hosts]
        ax.bar(x - 0.4 + width * (k + 0.5), vals, width, color=color(algo), edgecolor="k", lw=0.4,
               hatch="xx" if lab else None, label=algo + (f" ({lab})" if lab else ""))
    limits = {h.get("name"): h.get("mem_limit_mib") for h in (run.config.get("topology") or {}).get("hosts", [])
              if isinstance(h, dict)} if isinstance(run.config.get("topology"), dict) else {}
    for i, h in enumerate(hosts):
        if limits.get(h):
            ax.hlines(limits[h], x[i] - 0.45, x[i] + 0.45, colors="k", linestyles="--", lw=1)
    if any(limits.get(h) for h in hosts):
        ax.plot([], [], "k--", lw=1, label="initial memory limit")
    ax.set_xticks(x, hosts)
    ax.set(xlabel="host", ylabel="peak memory [MiB]", title=f"Peak memory per host — {run.label}")
    _legend(ax, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def fig_migrations(run: Run):
    table = latency_table(run)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(table) + 4), 4))
    x = np.arange(len(table))
    cols = [color(a) for a in table["algorithm"]]
    counts = table["migrations"].fillna(0).astype(float)
    mib = table["migrated_bytes"].fillna(0).astype(float) / MIB
    for ax, vals, ylabel, fmt in ((a1, counts, "blocks migrated", "{:.0f}"), (a2, mib, "bytes migrated [MiB]", "{:.2f}")):
        ax.bar(x, vals, color=cols, edgecolor="k", lw=0.4)
        for i, v in enumerate(vals):
            lab = failure_label(run, table["algorithm"][i])
            ax.annotate(fmt.format(v) + (f"\n{lab}" if lab else ""), (x[i], v), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8, color=FAIL_COLOR if lab else "k")
        ax.set_xticks(x, table["algorithm"], rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(1.0, float(vals.max()) * 1.3 if len(vals) else 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Migrations — {run.label}")
    return fig


def fig_plan_accuracy(run: Run):
    pv = plan_vs_measured(run)
    if pv.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for algo in run.algorithms:
        d = pv[pv["algorithm"] == algo]
        if not d.empty:
            lab = failure_label(run, algo)
            ax.scatter(d["predicted_s"] * MS, d["measured_s"] * MS, color=color(algo), edgecolor="k", lw=0.4,
                       s=30, label=f"{algo} ({len(d)} plans" + (f"; {lab})" if lab else ")"))
    lo = float(min(pv["predicted_s"].min(), pv["measured_s"].min()) * MS)
    hi = float(max(pv["predicted_s"].max(), pv["measured_s"].max()) * MS)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
    _auto_log(ax, [lo, hi])
    _auto_log(ax, [lo, hi], "x")
    ax.set(xlabel="predicted token latency [ms]", ylabel="measured mean until next plan [ms]",
           title=f"Plan vs measurement — {run.label}")
    _legend(ax, fontsize=8)
    ax.grid(alpha=0.3)
    return fig


PER_RUN = [
    ("latency_tokens", fig_latency_tokens, "Per-token latency",
     "One line per algorithm (mean over repetitions, band = min–max); dotted verticals are scenario changes, "
     "dots are migrations drawn at token latency + migration stall, a red X marks where an algorithm failed."),
    ("latency_cdf", fig_latency_cdf, "Latency CDF",
     "Further left is faster; a long right tail means stalls. Algorithms that failed part-way are labelled with "
     "the failure and the number of tokens they produced."),
    ("latency_breakdown", fig_latency_breakdown, "Mean and p95 latency with breakdown",
     "Left bar of each pair: mean decode latency split into compute, transfer, wait and amortised migration, "
     "with the Student-t 95 % confidence interval of the mean over repetitions as an error bar (none with one "
     "repetition); right hatched bar: p95 latency over all decode tokens."),
    ("peak_memory", fig_peak_memory, "Peak memory per host",
     "Grouped bars per host, one per algorithm; the dashed line is the host's initial memory limit. "
     "Cross-hatched bars belong to algorithms that failed."),
    ("memory_tokens", fig_memory_tokens, "Memory over tokens per device, with limits", MEMORY_HOW),
    ("pareto", fig_pareto, "Latency vs peak memory (Pareto view)", PARETO_HOW),
    ("migrations", fig_migrations, "Migrations",
     "Blocks moved (left) and bytes moved (right) per algorithm over the whole run."),
    ("plan_accuracy", fig_plan_accuracy, "Predicted vs measured latency",
     "Each dot is a plan: the planner's predicted token latency against the measured mean until the next plan; "
     "dots above the diagonal mean the cost model is optimistic."),
]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


def run_figures(run: Run, out_dir: Path, suffix: str = "") -> list[Figure]:
    out: list[Figure] = []
    if not run.algorithms:  # nothing recorded beyond the run's start: the report says so
        return out
    for name, fn, title, how in PER_RUN:
        fig = fn(run)
        if fig is None:
            continue
        png, pdf = _save(fig, out_dir, name + suffix)
        out.append(Figure(name, title, how, png, pdf, str(run.path)))
    return out


def make_figures(runs: list[Run], out_dir: Path) -> list[Figure]:
    """Every applicable figure for every run, plus the sweep figure when there are several runs."""
    figs = []
    used: set[str] = set()
    for k, run in enumerate(runs):
        suffix = "" if len(runs) == 1 else "__" + _slug(run.label)
        suffix = suffix if suffix not in used else f"{suffix}_{k}"
        used.add(suffix)
        figs += run_figures(run, Path(out_dir), suffix)
    if len(runs) > 1:

        fig = fig_sweep(runs)
        if fig is not None:
            png, pdf = _save(fig, Path(out_dir), "sweep")
            figs.append(Figure("sweep", "Sweep: latency and peak memory vs parameter", SWEEP_HOW, png, pdf))
    return figs
