"""The regime map (issue 12): where head-level partitioning beats the layer split, and the rule.

    python -m analysis.regime_map RUN_DIR [-o OUT_DIR]     # RUN_DIR: a run of experiments/paper/regime_map.yaml

Per sweep point (its ``config.resolved.yaml`` and ``summary.json``): each algorithm's mean decode
latency (per repetition means: Student-t 95 % interval where there are several), the largest
per-device peak memory (the source included), and the ratios RA / best layer-based (EdgeShard static or dynamic) and
RA / best baseline (those and Galaxy). Each point also gets the dimensionless ratio

    R = one layer's decode time on the cluster's fastest device / one hop's cost,
    one hop = the path's latency (2 x one-way link delay on the star) + hidden-state bytes / link rate

(the fastest device, because a split has to beat what that device does alone or in a layer split:
with the median device instead, a mix of a laptop and three boards reads R up to 47 where the laptop
holding the layers makes every split lose — 55 of the 600 static points misclassified, 90.3 %
right, against 98.0 % with the fastest device; the median is kept as ``R_median``)

(the layer's time by the same roofline as the planners: attention, W_o and FFN calls at the
device's rate for the weight format, its memory bandwidth and per-call cost). A head split pays a
few hops per layer to divide that layer's time between devices, so it wins when R is large; the
rule is ``head-level wins by more than 5 % iff R > R*``, with R* the threshold that classifies the
static points best (its accuracy is reported). Figures: heatmaps of RA / best layer-based latency
and peak memory (device set x model rows, link rate columns, one panel per device count and delay)
with the cells where head-level wins outlined; the ratio against R with R*; latency against the
number of devices in three regimes. ``regime_map.json`` holds every row and the figures' numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from testbed.run.stats import NOT_TESTABLE, welch  # noqa: E402

LAYER_BASED = ("edgeshard", "edgeshard_dynamic")
BASELINES = ("edgeshard", "edgeshard_dynamic", "galaxy")
WIN = 0.95  # head-level "wins" when RA is more than 5 % faster than the best layer split
DOMINANCE = 1.02  # issue 12 item 6: RA at most 2 % slower than the best baseline


def _device_label(point: dict) -> str:
    profiles, source = point["topology.profiles+topology.source_profile"]
    if source is None and len(set(profiles)) == 1:
        return profiles[0]
    return f"{source}+" + "/".join(profiles) if source else "/".join(profiles)


def _model_label(model: dict) -> str:
    return f"{model['name']} {model.get('weight_format', 'fp32')}"


@lru_cache(maxsize=None)
def _dims(name: str, weight_format: str):
    from testbed.spec.modelref import resolve_model
    from testbed.spec.schema import ModelChoice

    return resolve_model(ModelChoice(name=name, weight_format=weight_format), Path(".")).dims


def layer_time_s(dims, profile: str, context_len: int) -> float:
    """One decode layer on one device of ``profile`` (``testbed.partition.regime.layer_time_s``)."""
    from testbed.partition.regime import layer_time_s as on_device
    from testbed.spec.profiles import get_profile

    p = get_profile(profile)
    return on_device(dims, p.flops_for(dims.weight_format), p.mem_bw_bytes_per_s, p.call_overhead_s, context_len)


def hop_s(dims, rate_mbps: float, delay_ms: float) -> float:
    from testbed.partition.cost import blocks as B

    return 2 * delay_ms / 1e3 + B.hidden_bytes(dims, 1) * 8 / (rate_mbps * 1e6)


def _rep_means(entry: dict) -> list[float]:
    reps = entry.get("per_repetition") or []
    vals = [r.get("mean_token_latency_s") for r in reps if isinstance(r, dict)]
    vals = [v for v in vals if v is not None]
    if not vals and entry.get("mean_token_latency_s") is not None:
        vals = [entry["mean_token_latency_s"]]
    return vals


def point_row(point_dir: Path) -> dict:
    cfg = yaml.load((point_dir / "config.resolved.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    summary = json.loads((point_dir / "summary.json").read_text())
    algos = summary.get("algorithms", summary)
    sp = cfg["sweep_point"]
    model = sp["model"]
    dims = _dims(model["name"], model.get("weight_format", "fp32"))
    hosts = cfg["topology"]["hosts"]
    T = cfg["workload"]["prompt_tokens"] + cfg["workload"]["new_tokens"] // 2
    times = [layer_time_s(dims, h["profile"], T) for h in hosts]
    layer, layer_median = min(times), statistics.median(times)
    rate, delay = sp["topology.bandwidths_mbps"][0], sp["topology.delay_ms"]
    row = {"point": point_dir.name, "devices": _device_label(sp), "model": _model_label(model),
           "rate_mbps": rate, "delay_ms": delay, "n": sp["topology.n_hosts"],
           "scenario": "fluctuating" if cfg.get("scenario") else "static", "repetitions": cfg["repetitions"],
           "layer_ms": layer * 1e3, "hop_ms": hop_s(dims, rate, delay) * 1e3}
    row["R"] = row["layer_ms"] / row["hop_ms"]
    row["R_median"] = layer_median * 1e3 / row["hop_ms"]
    reps = {}
    for a in ("resource_aware", *BASELINES):
        e = algos.get(a) or {}
        ok = e and not e.get("failed") and e.get("mean_token_latency_s") is not None
        reps[a] = _rep_means(e) if ok else []
        row[f"{a}_ms"] = statistics.fmean(reps[a]) * 1e3 if reps[a] else np.nan
        peak = e.get("max_peak_mem_bytes") if ok else None  # the most loaded device, source included
        row[f"{a}_peak_mib"] = peak / 2**20 if peak is not None else np.nan
        row[f"{a}_failure"] = (e.get("failure") or "failed") if e and not ok else None
    layer_best = min(LAYER_BASED, key=lambda a: row[f"{a}_ms"] if row[f"{a}_ms"] == row[f"{a}_ms"] else np.inf)
    best = min(BASELINES, key=lambda a: row[f"{a}_ms"] if row[f"{a}_ms"] == row[f"{a}_ms"] else np.inf)
    ra = row["resource_aware_ms"]
    row["best_layer"], row["best_baseline"] = layer_best, best
    row["ra_over_layer"] = ra / row[f"{layer_best}_ms"]
    row["ra_over_best"] = ra / row[f"{best}_ms"]
    row["ra_over_galaxy"] = ra / row["galaxy_ms"]
    ra_peak, layer_peak = row["resource_aware_peak_mib"], row[f"{layer_best}_peak_mib"]
    # both 0: every block on the source (a computing source holds the whole model)
    row["peak_ratio"] = (ra_peak / layer_peak if layer_peak > 0 else 1.0 if ra_peak == 0 else np.inf)
    w = welch(reps["resource_aware"], reps[best]) if reps["resource_aware"] and reps[best] else None
    row["vs_best_verdict"] = w.verdict if w is not None else NOT_TESTABLE
    return row


def load_map(run_dir: Path) -> pd.DataFrame:
    points = sorted(Path(run_dir).glob("point-*"), key=lambda p: int(p.name.split("-")[1]))
    if not points:
        raise SystemExit(f"{run_dir}: no point-* directories (a run of experiments/paper/regime_map.yaml?)")
    return pd.DataFrame([point_row(p) for p in points if (p / "summary.json").exists()])


def best_threshold(df: pd.DataFrame) -> tuple[float, float]:
    """(R*, accuracy) of the rule ``head-level wins iff R > R*`` on the points where RA ran."""
    d = df[np.isfinite(df["ra_over_layer"])]
    wins = (d["ra_over_layer"] < WIN).to_numpy()
    R = d["R"].to_numpy()
    cands = np.unique(np.concatenate([R, [0.0, np.inf]]))
    best = (np.inf, 0.0)
    for r in cands:
        acc = float(((R > r) == wins).mean())
        if acc > best[1]:
            best = (float(r), acc)
    return best


def summarize(df: pd.DataFrame) -> dict:
    out: dict = {"points": int(len(df))}
    for scen, d in df.groupby("scenario"):
        ran = d[np.isfinite(d["ra_over_best"])]
        worse = ran[ran["ra_over_best"] > DOMINANCE]
        sig_worse = worse[worse["vs_best_verdict"] == "significant"] if scen == "fluctuating" else worse
        r_star, acc = best_threshold(d)
        out[scen] = {
            "points": int(len(d)), "ra_ran": int(len(ran)),
            "nothing_fits": int((~np.isfinite(d["resource_aware_ms"]) & ~np.isfinite(d["edgeshard_ms"])
                                 & ~np.isfinite(d["galaxy_ms"])).sum()),
            "head_level_wins": int((ran["ra_over_layer"] < WIN).sum()),
            "head_level_wins_25pct": int((ran["ra_over_layer"] < 0.75).sum()),
            "ra_over_best_max": float(ran["ra_over_best"].max()) if len(ran) else None,
            "ra_worse_than_1.02x_best": int(len(worse)),
            "ra_worse_than_1.02x_best_significant": int(len(sig_worse)),
            "ra_beats_galaxy_2pct": int((ran["ra_over_galaxy"] < 0.98).sum()),
            "ra_beats_galaxy_by_devices": {k: int(v) for k, v in
                                           ran[ran["ra_over_galaxy"] < 0.98].groupby("devices").size().items()},
            "galaxy_failed_ra_ran": int(ran["galaxy_failure"].notna().sum()),
            "rule_R_star": r_star, "rule_accuracy": acc,
            "wins_need_R_above": float(ran[ran["ra_over_layer"] < WIN]["R"].min()) if (ran["ra_over_layer"] < WIN).any() else None,
        }
    return out


# ------------------------------------------------------------------------------------------ figures
def _rows(df: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(df["devices"], df["model"])))


def fig_heatmaps(df: pd.DataFrame, value: str, title: str, out: Path, vmin: float, vmax: float) -> Path:
    d = df[df["scenario"] == "static"]
    ns, delays, rates = sorted(d["n"].unique()), sorted(d["delay_ms"].unique()), sorted(d["rate_mbps"].unique())
    rows = _rows(d)
    fig, axes = plt.subplots(len(delays), len(ns), figsize=(3.1 * len(ns) + 1.5, 0.28 * len(rows) * len(delays) + 1.6),
                             squeeze=False, sharey=True)
    norm = matplotlib.colors.LogNorm(vmin=vmin, vmax=vmax)
    for i, delay in enumerate(delays):
        for j, n in enumerate(ns):
            ax = axes[i][j]
            grid = np.full((len(rows), len(rates)), np.nan)
            win = np.zeros_like(grid, dtype=bool)
            sub = d[(d["delay_ms"] == delay) & (d["n"] == n)].set_index(["devices", "model", "rate_mbps"])
            for r, key in enumerate(rows):
                for c, rate in enumerate(rates):
                    if (*key, rate) in sub.index:
                        x = sub.loc[(*key, rate)]
                        grid[r, c] = x[value]
                        win[r, c] = x["ra_over_layer"] < WIN
            im = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
            for r in range(len(rows)):  # the boundary: outline the cells where head-level wins
                for c in range(len(rates)):
                    if win[r, c]:
                        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.2, ec="black"))
            ax.set_xticks(range(len(rates)), [f"{x:g}" for x in rates], fontsize=7)
            ax.set_yticks(range(len(rows)), [f"{a} | {b}" for a, b in rows], fontsize=6)
            ax.set_title(f"{n} devices, {delay:g} ms", fontsize=8)
            if i == len(delays) - 1:
                ax.set_xlabel("link rate (Mbit/s)", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label=title)
    fig.suptitle(f"{title} (static scenario; outlined: head-level > 5 % faster than the best layer split; "
                 "blank: no plan fits)", fontsize=9)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    fig.savefig(out.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return out


def fig_rule(df: pd.DataFrame, r_star: float, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    d = df[np.isfinite(df["ra_over_layer"])]
    for n, g in d.groupby("n"):
        ax.scatter(g["R"], g["ra_over_layer"], s=9, alpha=0.6, label=f"{n} devices")
    ax.axvline(r_star, color="black", ls="--", lw=1, label=f"R* = {r_star:.2g}")
    ax.axhline(WIN, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("R = one layer's time on the fastest device / one hop (2 x delay + hidden bytes / rate)")
    ax.set_ylabel("RA / best layer-based latency")
    ax.set_title("The boundary rule: head-level pays when a layer's compute dwarfs a hop", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    fig.savefig(out.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return out


REGIMES = (("compute-bound", 1000, 0.2), ("boundary", 100, 0.2), ("link-bound", 5, 2.0))


def fig_devices(df: pd.DataFrame, out: Path, devices: str = "rpi4-8gb", model: str = "llama-2-7b q4_0") -> Path:
    d = df[(df["scenario"] == "static") & (df["devices"] == devices) & (df["model"] == model)]
    fig, axes = plt.subplots(1, len(REGIMES), figsize=(11, 3.4), squeeze=False)
    for ax, (name, rate, delay) in zip(axes[0], REGIMES):
        g = d[(d["rate_mbps"] == rate) & (d["delay_ms"] == delay)].sort_values("n")
        for a in ("resource_aware", *BASELINES):
            ax.plot(g["n"], g[f"{a}_ms"], marker="o", ms=3, label=a)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(d["n"].unique()), [str(x) for x in sorted(d["n"].unique())])
        ax.set_title(f"{name}: {rate:g} Mbit/s, {delay:g} ms", fontsize=8)
        ax.set_xlabel("devices")
    axes[0][0].set_ylabel("ms per token")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Latency against devices, {devices} x n, {model} (static)", fontsize=9)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    fig.savefig(out.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(fig)
    return out


def render(summary: dict) -> str:
    lines = [f"regime map: {summary['points']} points"]
    for scen in ("static", "fluctuating"):
        s = summary.get(scen)
        if not s:
            continue
        lines.append(
            f"{scen}: {s['points']} points, RA ran at {s['ra_ran']} (nothing fits at {s['nothing_fits']}); head-level "
            f"> 5 % faster than the best layer split at {s['head_level_wins']} (> 25 %: {s['head_level_wins_25pct']}); "
            f"RA / best of EdgeShard, EdgeShard-dynamic, Galaxy: max {s['ra_over_best_max']:.3f}, above 1.02x at "
            f"{s['ra_worse_than_1.02x_best']} point(s) ({s['ra_worse_than_1.02x_best_significant']} significant); "
            f"RA > 2 % faster than Galaxy at {s['ra_beats_galaxy_2pct']} {s['ra_beats_galaxy_by_devices']} "
            f"(Galaxy has no plan at {s['galaxy_failed_ra_ran']}); rule R > {s['rule_R_star']:.3g}: "
            f"{100 * s['rule_accuracy']:.1f} % of points classified right")
    return "\n".join(lines)


def analyze_map(run_dir: Path, out_dir: Path | None = None) -> dict:
    df = load_map(run_dir)
    out_dir = Path(out_dir or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    r_star = summary.get("static", {}).get("rule_R_star", 1.0)
    figs = {
        "regime_latency": fig_heatmaps(df, "ra_over_layer", "RA / best layer-based latency",
                                       out_dir / "regime_latency.png", 0.25, 4.0),
        "regime_memory": fig_heatmaps(df, "peak_ratio", "RA / best layer-based peak memory of the most loaded device",
                                      out_dir / "regime_memory.png", 0.125, 8.0),
        "regime_rule": fig_rule(df, r_star if np.isfinite(r_star) else 1.0, out_dir / "regime_rule.png"),
        "regime_devices": fig_devices(df, out_dir / "regime_devices.png"),
    }
    (out_dir / "regime_map.json").write_text(json.dumps(
        {"summary": summary, "rows": json.loads(df.to_json(orient="records"))}, indent=1))
    df.to_csv(out_dir / "regime_map.csv", index=False)
    report = out_dir / "report.html"
    report.write_text(_html(summary, figs))
    return {"summary": summary, "figures": {k: str(v) for k, v in figs.items()}, "frame": df, "report": report}


def _html(summary: dict, figs: dict) -> str:
    from jinja2 import Template

    return Template("""<!doctype html><html><head><meta charset="utf-8"><title>Regime map</title></head>
<body style="font-family: sans-serif; max-width: 1200px">
<h1>Regime map</h1>
{% for line in lines %}<p>{{ line }}</p>{% endfor %}
<p>Table: regime_map.csv (one row per point); numbers: regime_map.json. How the ratio R and the rule
are defined: analysis/regime_map.py.</p>
{% for name, path in figs.items() %}<h2>{{ name }}</h2><img src="{{ path.name }}" style="max-width: 100%">{% endfor %}
</body></html>""").render(lines=render(summary).split("\n"), figs=figs)


def is_regime_map(run_dir: Path) -> bool:
    """A run of ``experiments/paper/regime_map.yaml`` (its sweep has the map's device-set axis)."""
    first = Path(run_dir) / "point-0" / "config.resolved.yaml"
    if not first.exists():
        return False
    cfg = yaml.load(first.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    return "topology.profiles+topology.source_profile" in (cfg.get("sweep_point") or {})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"{args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    res = analyze_map(args.run_dir, args.out)
    print(render(res["summary"]))
    for name, path in res["figures"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
