"""Emulated against simulated at the regime points (issue 13): the table that says whether the map holds.

    python -m analysis.regime_points EMULATED_RUN SIMULATED_RUN [--json OUT]
    python -m analysis.regime_points --verdict RUN     # one line per point: who won, by how much

Each argument is a run directory of ``experiments/paper/regime_points.yaml`` (its ``point-N``
sub-directories, one per topology of the sweep). Per point and algorithm: the emulated mean decode
latency over repetitions with its 95 % confidence interval (Student t over the per-repetition
means), the simulated mean, and their ratio (goal: within 15 %); RA against the best layer-based
baseline (EdgeShard, static or dynamic) and against Galaxy, as a speed-up with a Welch 95 % interval
of the difference (significant when it excludes 0, else "within noise"); whether RA's placement
splits a layer's heads across hosts; and whether every algorithm's tokens equal the monolithic
model's on each repetition's prompt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pandas as pd

from testbed.run.events import read_events
from testbed.run.stats import NOT_TESTABLE, mean_ci95, welch

LAYER_BASED = ("edgeshard", "edgeshard_dynamic")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its Student-t 95 % interval: ``testbed.run.stats.mean_ci95``); 0 for one value."""
    ci = mean_ci95(values)
    return (statistics.fmean(values), 0.0) if ci is None else (ci.mean, ci.half_width)


def welch_diff(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """(mean(a) - mean(b), half-width of its Welch 95 % interval); None without repetitions."""
    w = welch(a, b)
    if w.verdict == NOT_TESTABLE:
        return None
    if w.t is None:  # no spread at all (the simulated backend): any difference is real
        return w.diff, 0.0
    return w.diff, w.t_crit * abs(w.diff / w.t) if w.t else 0.0


def per_repetition_means(point: Path) -> dict[str, list[float]]:
    tok = pd.read_csv(point / "tokens.csv")
    dec = tok[tok["phase"] == "decode"]
    means = dec.groupby(["algorithm", "repetition"])["latency_s"].mean()
    return {a: [float(v) for v in means[a].values] for a in means.index.get_level_values(0).unique()}


def splits_heads(point: Path, algorithm: str = "resource_aware") -> bool | None:
    """Whether any plan of ``algorithm`` put one layer's heads on more than one host."""
    plans = [e for e in read_events(point) if e["type"] == "plan" and e.get("algorithm") == algorithm]
    if not plans:
        return None
    return any(len(set(lp["heads"])) > 1 for e in plans for lp in e["placement"]["layers"])


def tokens_match_monolithic(point: Path) -> dict[str, bool]:
    """Per algorithm: every repetition's tokens equal the monolithic model's greedy tokens."""
    from node_agent.model import load_model
    from testbed.run.runner import prompt_for
    from testbed.spec.modelref import resolve_model
    from testbed.spec.schema import ExperimentSpec
    import yaml

    cfg = yaml.safe_load((point / "config.resolved.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k in ExperimentSpec.model_fields}
    spec = ExperimentSpec.model_validate(cfg)
    ref = resolve_model(spec.model)
    model = load_model(ref.load_arg, seed=ref.seed)
    expected: dict[int, list[int]] = {}
    out: dict[str, bool] = {}
    for e in read_events(point):
        if e["type"] != "repetition_done" or e.get("failed"):
            continue
        rep = int(e["repetition"])
        if rep not in expected:
            expected[rep] = model.generate(prompt_for(spec, ref, rep), spec.workload.new_tokens)
        out[e["algorithm"]] = out.get(e["algorithm"], True) and e["tokens"] == expected[rep]
    return out


def compare_point(emu: Path, sim: Path, check_tokens: bool = True) -> dict:
    e_reps, s_reps = per_repetition_means(emu), per_repetition_means(sim)
    topo = json.loads((emu / "manifest.json").read_text()).get("experiment"), emu.name
    rows = {}
    for algo, reps in e_reps.items():
        m, h = mean_ci(reps)
        s = statistics.fmean(s_reps[algo]) if algo in s_reps else None
        rows[algo] = {"emulated_mean_s": m, "emulated_ci95_s": h, "repetitions": len(reps),
                      "simulated_mean_s": s, "emulated_over_simulated": m / s if s else None}
    ra = e_reps.get("resource_aware")
    versus = {}
    for label, names in (("best layer-based", LAYER_BASED), ("galaxy", ("galaxy",))):
        cands = [n for n in names if n in e_reps]
        if ra is None or not cands:
            continue
        best = min(cands, key=lambda n: statistics.fmean(e_reps[n]))
        d = welch_diff(ra, e_reps[best])
        ref = statistics.fmean(e_reps[best])
        versus[label] = {"baseline": best, "ra_speedup": 1.0 - statistics.fmean(ra) / ref,
                         "diff_s": d[0] if d else None, "diff_ci95_s": d[1] if d else None,
                         "significant": (abs(d[0]) > d[1]) if d else None}
    return {"point": emu.name, "topology": _topology_name(emu), "algorithms": rows, "ra_versus": versus,
            "ra_splits_heads": splits_heads(emu),
            "tokens_equal_monolithic": tokens_match_monolithic(emu) if check_tokens else None,
            "experiment": topo[0]}


def _topology_name(point: Path) -> str:
    import yaml

    cfg = yaml.safe_load((point / "config.resolved.yaml").read_text())
    topo = cfg.get("topology")
    return topo.get("name", "?") if isinstance(topo, dict) else str(topo)


def _points(run: Path) -> list[Path]:
    pts = sorted(run.glob("point-*"), key=lambda p: int(p.name.split("-")[1]))
    return pts or [run]


def render(results: list[dict]) -> str:
    lines = ["| point | algorithm | emulated mean ± 95 % CI (ms) | simulated (ms) | emu/sim |",
             "|---|---|---|---|---|"]
    for r in results:
        for algo, a in r["algorithms"].items():
            s = a["simulated_mean_s"]
            ratio = a["emulated_over_simulated"]
            lines.append(f"| {r['topology']} | {algo} | {a['emulated_mean_s'] * 1e3:.1f} ± {a['emulated_ci95_s'] * 1e3:.1f}"
                         f" (n={a['repetitions']}) | {s * 1e3 if s else float('nan'):.1f} | "
                         f"{ratio if ratio else float('nan'):.3f} |")
    lines += ["", "| point | RA vs | RA speed-up | difference ± 95 % CI (ms) | verdict | RA splits heads | tokens = monolithic |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        tok = r["tokens_equal_monolithic"]
        tok_s = "n/a" if tok is None else ("all" if all(tok.values()) else
                                          "NO: " + ", ".join(a for a, ok in tok.items() if not ok))
        for label, v in r["ra_versus"].items():
            verdict = ("n/a" if v["significant"] is None else
                       ("significant" if v["significant"] else "within noise"))
            diff = (f"{v['diff_s'] * 1e3:+.1f} ± {v['diff_ci95_s'] * 1e3:.1f}" if v["diff_s"] is not None else "n/a")
            lines.append(f"| {r['topology']} | {label} ({v['baseline']}) | {v['ra_speedup']:+.1%} | {diff} | "
                         f"{verdict} | {r['ra_splits_heads']} | {tok_s} |")
    return "\n".join(lines)


def leaders(reps: dict[str, list[float]]) -> list[str]:
    """The fastest algorithm and every one within noise of it (Welch 95 %), sorted by name — a
    stable answer where a single winner would flip from run to run."""
    best = min(reps, key=lambda a: statistics.fmean(reps[a]))
    tied = [a for a in reps if a == best or ((d := welch_diff(reps[a], reps[best])) is not None and abs(d[0]) <= d[1])]
    return sorted(tied)


def verdict_facts(point: Path) -> dict:
    """Who won at ``point`` (``leaders``), whether their placements split heads, and the margin to
    each slower algorithm."""
    reps = per_repetition_means(point)
    top = leaders(reps)
    lead = max(statistics.fmean(reps[a]) for a in top)
    margins = {}
    for other in sorted(set(reps) - set(top), key=lambda a: statistics.fmean(reps[a])):
        d = welch_diff(reps[top[0]], reps[other])
        margins[other] = {"faster_by": 1.0 - lead / statistics.fmean(reps[other]),
                          "significant": None if d is None else abs(d[0]) > d[1]}
    split = [bool(splits_heads(point, a)) for a in top]
    kind = "head-level" if all(split) else ("layer-level" if not any(split) else "mixed")
    return {"point": _topology_name(point), "leaders": top, "kind": kind, "repetitions": len(reps[top[0]]),
            "leader_ms": {a: statistics.fmean(reps[a]) * 1e3 for a in top}, "margins": margins}


def point_verdict(point: Path) -> str:
    """One line: which kind of placement won at ``point``, by whom, and by how much."""
    f = verdict_facts(point)
    who = " and ".join(f"{a} {f['leader_ms'][a]:.0f} ms" for a in f["leaders"])
    tie = " tie, within noise" if len(f["leaders"]) > 1 else ""
    parts = [f"{m['faster_by']:.0%} faster than {o}" + ("" if m["significant"] is None else
                                                         (" (significant)" if m["significant"] else " (within noise)"))
             for o, m in f["margins"].items()]
    return (f"{f['point']}: {f['kind']} wins — {who} per token{tie} (means of {f['repetitions']} repetitions); "
            + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("emulated", type=Path)
    ap.add_argument("simulated", type=Path, nargs="?")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-tokens", action="store_true", help="skip the monolithic token check")
    ap.add_argument("--verdict", action="store_true", help="one line per point of EMULATED only")
    args = ap.parse_args(argv)
    if args.verdict:
        for p in _points(args.emulated):
            print(point_verdict(p))
        return 0
    if args.simulated is None:
        ap.error("SIMULATED run needed (or --verdict)")
    emu, sim = _points(args.emulated), _points(args.simulated)
    if len(emu) != len(sim):
        print(f"error: {args.emulated} has {len(emu)} points, {args.simulated} has {len(sim)}", file=sys.stderr)
        return 2
    results = [compare_point(e, s, not args.no_tokens) for e, s in zip(emu, sim)]
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
