"""Capacity figures of one run: latency against peak memory (a Pareto view with confidence
intervals) and memory over tokens per device with the memory limits drawn.

The numbers come from the summary (``per_repetition``, ``latency_ci95_s``) and the ``mem_sample`` /
``scenario_applied`` events; nothing is recomputed from the backend.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.load import Run, failure_label, mem_samples, topology_source  # noqa: E402
from analysis.style import FAIL_COLOR, MIB, MS, color  # noqa: E402
from testbed.run import stats  # noqa: E402

PARETO_HOW = ("One point per algorithm: mean decode latency against the largest per-device peak memory "
              "(workers; the source's embeddings are the same for all), each the mean over repetitions with a "
              "Student-t 95 % interval as error bars. Lower-left is better; the dashed line joins the plans no "
              "other plan beats on both. A red cross marks an algorithm that failed (with what happened).")
MEMORY_HOW = ("Memory charged per device at each decision epoch (mean over repetitions; band = min–max), one "
              "line per algorithm; the black dashed step is the device's memory limit, including scenario changes. "
              "A red cross is where an algorithm ran out of memory.")


def largest_worker_peaks(run: Run, algo: str) -> list[float]:
    """Per repetition, the largest peak over the devices other than the source (all devices if unknown)."""
    source = topology_source(run.config)
    out = []
    for rep in run.summary.get(algo, {}).get("per_repetition") or []:
        if rep.get("max_worker_peak_mem_bytes") is not None:
            out.append(float(rep["max_worker_peak_mem_bytes"]))
            continue
        peaks = {h: b for h, b in (rep.get("peak_mem_bytes") or {}).items() if h != source}
        if peaks:
            out.append(float(max(peaks.values())))
    return out


def pareto_points(run: Run) -> pd.DataFrame:
    """algorithm, latency mean and CI half-width [s], peak mean and CI half-width [bytes], failed, label."""
    rows = []
    for algo in run.algorithms:
        s = run.summary.get(algo, {})
        lat = [r.get("mean_token_latency_s") for r in s.get("per_repetition") or []]
        peaks = largest_worker_peaks(run, algo)
        if not stats.finite(lat).size or not peaks:
            continue
        ci_l, ci_p = stats.mean_ci95(lat), stats.mean_ci95(peaks)
        rows.append({"algorithm": algo, "latency_s": float(stats.finite(lat).mean()),
                     "latency_ci_s": ci_l.half_width if ci_l else 0.0, "peak_bytes": float(np.mean(peaks)),
                     "peak_ci_bytes": ci_p.half_width if ci_p else 0.0, "failed": bool(s.get("failed")),
                     "label": failure_label(run, algo)})
    return pd.DataFrame(rows, columns=["algorithm", "latency_s", "latency_ci_s", "peak_bytes", "peak_ci_bytes",
                                       "failed", "label"])


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The completed points no other completed point beats on both latency and peak (ties kept)."""
    ok = points[~points["failed"]]
    keep = [i for i, p in ok.iterrows()
            if not any((q["latency_s"] <= p["latency_s"] and q["peak_bytes"] <= p["peak_bytes"])
                       and (q["latency_s"] < p["latency_s"] or q["peak_bytes"] < p["peak_bytes"])
                       for _, q in ok.iterrows())]
    return ok.loc[keep].sort_values("peak_bytes")


def fig_pareto(run: Run):
    pts = pareto_points(run)
    if pts.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    for k, (_, p) in enumerate(pts.iterrows()):  # shapes and shrinking sizes keep coinciding points visible
        ax.errorbar(p["peak_bytes"] / MIB, p["latency_s"] * MS, xerr=p["peak_ci_bytes"] / MIB,
                    yerr=p["latency_ci_s"] * MS, fmt="X" if p["failed"] else "osD^vP*h"[k % 8],
                    ms=max(4, 11 - 1.5 * k),
                    color=FAIL_COLOR if p["failed"] else color(p["algorithm"]), mec="k", capsize=4,
                    label=p["algorithm"] + (f" ({p['label']})" if isinstance(p["label"], str) else ""))
    front = pareto_front(pts)
    if len(front) > 1:
        ax.plot(front["peak_bytes"] / MIB, front["latency_s"] * MS, "k--", lw=0.9, alpha=0.7, label="Pareto front")
    ax.set(xlabel="largest per-device peak memory [MiB] (workers)", ylabel="mean decode token latency [ms]",
           title=f"Latency vs peak memory — {run.label}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return fig


def limit_steps(run: Run, host: str) -> list[tuple[int, float]]:
    """(token index, limit MiB) from the topology's initial limit and every applied ``mem_limit_mib``
    change of ``host`` (the first algorithm's record: every algorithm replays the same timeline)."""
    topo = run.config.get("topology") if isinstance(run.config.get("topology"), dict) else {}
    init = next((h.get("mem_limit_mib") for h in topo.get("hosts") or []
                 if isinstance(h, dict) and h.get("name") == host), None)
    steps = [(0, float(init))] if init else []
    first = next((e.get("algorithm") for e in run.events if e.get("type") == "scenario_applied"), None)
    for e in run.events:
        vals = e.get("values") if isinstance(e.get("values"), dict) else {}
        if (e.get("type") == "scenario_applied" and e.get("host") == host and e.get("algorithm") == first
                and e.get("repetition") in (0, None) and vals.get("mem_limit_mib") is not None):
            steps.append((int(e.get("token_index") or 0), float(vals["mem_limit_mib"])))
    return sorted(steps)


def _memory_panel(ax, run: Run, ms: pd.DataFrame, host: str, last_token: int) -> None:
    for algo in run.algorithms:
        d = ms[(ms["host"] == host) & (ms["algorithm"] == algo)]
        if d.empty:
            continue
        g = d.groupby("token_index")["bytes"].agg(["mean", "min", "max"]) / MIB
        ax.step(g.index, g["mean"], where="post", color=color(algo), marker=".", label=algo)
        if d["repetition"].nunique() > 1:
            ax.fill_between(g.index, g["min"], g["max"], step="post", color=color(algo), alpha=0.15)
        s = run.summary.get(algo, {})
        if s.get("memory_ran_out") and s.get("failed_at_token") is not None:
            ax.plot(g.index[-1], g["mean"].iloc[-1], "X", color=FAIL_COLOR, mec="k", ms=9)
    steps = limit_steps(run, host)
    if steps:
        xs = [t for t, _ in steps] + [last_token]
        ys = [v for _, v in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", color="k", ls="--", lw=1.1, label="memory limit")
    ax.set(title=host, xlabel="token index")
    ax.grid(alpha=0.3)


def fig_memory_tokens(run: Run):
    ms = mem_samples(run)
    if ms.empty:
        return None
    hosts = sorted(ms["host"].unique())
    last = int(max(ms["token_index"].max(), run.tokens["token_index"].max() if len(run.tokens) else 0))
    # each device on its own scale: the source's large limit would flatten the workers' curves
    fig, axes = plt.subplots(1, len(hosts), figsize=(3.4 * len(hosts) + 1, 3.6), squeeze=False)
    for ax, host in zip(axes[0], hosts):
        _memory_panel(ax, run, ms, host, last)
    axes[0][0].set_ylabel("memory charged at decision epochs [MiB]")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Memory over tokens per device, with limits — {run.label}")
    return fig
