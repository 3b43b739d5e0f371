"""Sweeps: several run directories of one experiment at different ``sweep_point`` values.

``sweep_frame`` is the tidy table (one row per run and algorithm); ``fig_sweep`` plots mean latency
and peak memory against the swept parameter, one line per algorithm (latency with its confidence
interval over repetitions as error bars), failed points as red crosses.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms as mtransforms  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.load import Run, short_failure  # noqa: E402
from analysis.style import FAIL_COLOR, MIB, MS, color  # noqa: E402

SWEEP_HOW = ("One line per algorithm across sweep points: mean decode latency (left) and the largest per-host "
             "peak memory (right); error bars are Student-t 95 % confidence intervals of the mean over "
             "repetitions (where there are several). A red cross is a point where the algorithm failed; at the "
             "bottom edge if it produced no tokens there.")


def swept_params(runs: list[Run]) -> list[str]:
    """Sweep-point keys whose value differs between runs (all keys if none differ)."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.sweep_point if k not in keys]
    varying = [k for k in keys if len({repr(r.sweep_point.get(k)) for r in runs}) > 1]
    return varying or keys


def sweep_frame(runs: list[Run]) -> pd.DataFrame:
    params = swept_params(runs)
    rows = []
    for i, r in enumerate(runs):
        label = ", ".join(f"{k}={r.sweep_point.get(k)}" for k in params) if params else r.label
        x = r.sweep_point.get(params[0]) if len(params) == 1 else None
        for algo in r.algorithms:
            s = r.summary.get(algo, {})
            rows.append({"run": i, "label": label, "x": x, "algorithm": algo,
                         "mean_token_latency_s": s.get("mean_token_latency_s"),
                         "mean_token_latency_s_ci": _half(s.get("latency_ci95_s")),
                         # workers only: the source's embeddings would flatten every line
                         "max_peak_mem_bytes": s.get("max_worker_peak_mem_bytes", s.get("max_peak_mem_bytes")),
                         "failed": bool(s.get("failed")),
                         "failure": short_failure(s.get("failure"), s.get("failed_at_token"))
                         if s.get("failed") else None})
    return pd.DataFrame(rows)


def _half(ci) -> float | None:
    return float(ci["half_width"]) if isinstance(ci, dict) and ci.get("half_width") is not None else None


def _numeric(values) -> bool:
    try:
        [float(v) for v in values]
    except (TypeError, ValueError):
        return False
    return all(v is not None and not isinstance(v, bool) for v in values)


MARKERS = "osD^vP*hX"


def _failure_text(df: pd.DataFrame, params: list[str]) -> str:
    lines = []
    for algo in dict.fromkeys(df["algorithm"]):
        d = df[(df["algorithm"] == algo) & df["failed"]]
        for failure, g in d.groupby("failure", sort=False):
            lines.append(f"{algo}: {failure} at {', '.join(map(str, g['label']))}")
    return "\n".join(lines)


def fig_sweep(runs: list[Run]):

    df = sweep_frame(runs)
    if df.empty:
        return None
    params = swept_params(runs)
    numeric = len(params) == 1 and _numeric(df["x"].tolist())
    labels = list(dict.fromkeys(df["label"]))
    df["xpos"] = df["x"].astype(float) if numeric else df["label"].map({lab: i for i, lab in enumerate(labels)})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, col, scale, ylabel in ((axes[0], "mean_token_latency_s", MS, "mean token latency [ms]"),
                                   (axes[1], "max_peak_mem_bytes", 1 / MIB, "max peak memory per worker [MiB]")):
        bottom = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        for k, algo in enumerate(dict.fromkeys(df["algorithm"])):
            d = df[df["algorithm"] == algo].sort_values("xpos")
            y = pd.to_numeric(d[col], errors="coerce").to_numpy(float) * scale
            bad = d["failed"].to_numpy()
            nfail = int(bad.sum())
            ax.plot(d["xpos"], np.where(bad, np.nan, y), marker=MARKERS[k % len(MARKERS)], color=color(algo),
                    ms=7 - k % 3, label=algo + (f" (failed at {nfail}/{len(d)} points)" if nfail else ""))
            if nfail:
                ax.plot(d["xpos"], y, ls=":", color=color(algo), lw=1)
            if f"{col}_ci" in d:
                err = pd.to_numeric(d[f"{col}_ci"], errors="coerce").fillna(0.0).to_numpy(float) * scale
                if err.any():
                    ax.errorbar(d["xpos"], y, yerr=err, fmt="none", ecolor=color(algo), capsize=3, lw=1)
            for xp, yv in zip(d["xpos"][bad], y[bad]):
                if np.isfinite(yv):
                    ax.plot(xp, yv, "X", color=FAIL_COLOR, ms=10, mec="k", zorder=5)
                else:
                    ax.plot(xp, 0.03, "X", color=FAIL_COLOR, ms=10, mec="k", transform=bottom, clip_on=False)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        elif df["xpos"].nunique() <= 12:
            ax.set_xticks(sorted(df["xpos"].unique()), [f"{v:g}" for v in sorted(df["xpos"].unique())])
        ax.set_ylim(bottom=0)
        ax.set(xlabel=", ".join(params) or "run", ylabel=ylabel)
        ax.grid(alpha=0.3)
    text = _failure_text(df, params)
    if text:
        fig.text(0.01, -0.02, "red X = failed point (partial data, dotted):\n" + text, va="top", fontsize=8,
                 color=FAIL_COLOR)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"Sweep over {', '.join(params) or 'runs'} — {runs[0].experiment}")
    return fig
