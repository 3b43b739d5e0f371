"""``analyze``: run directories in, figures (PNG + PDF) and ``report.html`` out.

The report states what was run and where (experiment, topology, git SHA, kernel, delay mechanism),
the summary table with each algorithm's mean latency as a multiple of resource_aware's and its 95 %
confidence interval over repetitions, resource_aware against every other algorithm marked
"significant", "within noise" or "not testable" (Welch's t-test at 5 %, ``analysis.compare``), what
the repetitions varied, every failure in words, and the figures with one line on how to read each.
"""
from __future__ import annotations

import os
from pathlib import Path

import jinja2

from analysis.compare import significance_table
from analysis.figures import Figure, _num, failure_label, make_figures
from analysis.load import Run, latency_table, load_runs, manifest_facts, short_failure, topology_summary
from analysis.template import REPORT_TEMPLATE


def default_out_dir(run_dirs: list[Path]) -> Path:
    """``<run_dir>/figures`` for one run; ``<common parent>/figures`` for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "figures"
    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in run_dirs]))
    return common / "figures"


def _fmt(v, scale: float = 1.0, digits: int = 3) -> str:
    if v is None or v != v:  # None or NaN
        return "—"
    return f"{float(v) * scale:.{digits}f}"


def _pm(half, scale: float, digits: int) -> str:
    """'± 0.123' for a confidence half-width; '—' where there is none (fewer than two repetitions)."""
    return "—" if half is None or half != half else f"± {float(half) * scale:.{digits}f}"


def _context(reached) -> str:
    if not isinstance(reached, dict):
        return "—"
    return f"{reached.get('tokens_generated')} tokens (context {reached.get('context_len') or '—'})"


def _significance_rows(run: Run) -> list[dict]:
    """RA against each other algorithm on latency and peak memory (analysis.compare), best other first."""
    rows = []
    for _, r in significance_table(run).iterrows():
        ms = r["metric"] == "latency"
        scale, unit, digits = (1e3, "ms", 3) if ms else (2.0 ** -20, "MiB", 2)
        rows.append({"a": r["a"], "b": r["b"], "metric": r["metric"], "best": bool(r["best_other"]),
                     "mean_a": _fmt(r["mean_a"], scale, digits), "mean_b": _fmt(r["mean_b"], scale, digits),
                     "unit": unit, "ratio": _fmt(r["ratio"], 1, 2) + "×" if r["ratio"] is not None else "—",
                     "verdict": r["verdict"], "reason": r["reason"], "n": f"{r['n_a']} / {r['n_b']}",
                     "failed": bool(r["a_failed"] or r["b_failed"]),
                     "css": r["verdict"].replace(" ", "-")})
    return rows


def _table_rows(run: Run) -> list[dict]:
    rows = []
    for _, row in latency_table(run).iterrows():
        lab = failure_label(run, row["algorithm"])
        ratio = row.get("ratio_to_resource_aware")
        rows.append({
            "algorithm": row["algorithm"], "failed": bool(row["failed"]),
            "mean_ms": _fmt(row["mean_token_latency_s"], 1e3), "p95_ms": _fmt(row["p95_token_latency_s"], 1e3),
            "mean_mig_ms": _fmt(row["mean_excl_migration_s"], 1e3),
            "ratio": (_fmt(ratio, 1, 2) + "×") if ratio is not None and ratio == ratio else "—",
            "tokens": int(_num(row["tokens_generated"])), "migrations": int(_num(row["migrations"])),
            "migrated_mib": _fmt(row["migrated_bytes"], 2.0 ** -20, 2),
            "peak_mib": _fmt(row["max_peak_mem_bytes"], 2.0 ** -20, 2),
            "ci_ms": _pm(row.get("latency_ci95_half_s"), 1e3, 3), "peak_ci_mib": _pm(row.get("peak_ci95_half_bytes"),
                                                                                   2.0 ** -20, 2),
            "p50_ms": _fmt(row.get("p50_token_latency_s"), 1e3), "reps": int(_num(row.get("repetitions"))),
            "context": _context(row.get("context_reached")),
            "status": lab if lab else "ok",
        })
    return rows


def _figure_entries(figs: list[Figure], out_dir: Path) -> list[dict]:
    return [{"title": f.title, "how_to_read": f.how_to_read, "src": os.path.relpath(f.png, out_dir),
             "pdf": os.path.relpath(f.pdf, out_dir)} for f in figs]


def _run_context(run: Run, figs: list[Figure], out_dir: Path) -> dict:
    cfg = run.config
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    work = cfg.get("workload") if isinstance(cfg.get("workload"), dict) else {}
    failures = [{"algorithm": a, "reason": run.summary[a].get("failure") or "",
                 "short": short_failure(run.summary[a].get("failure"), run.summary[a].get("failed_at_token"))}
                for a in run.algorithms if run.summary.get(a, {}).get("failed")]
    return {
        "label": run.label, "path": str(run.path), "config": cfg, "facts": manifest_facts(run),
        "topo": topology_summary(cfg), "sweep_point": run.sweep_point,
        "model": model.get("name") or model.get("path") or "unknown",
        "workload": ", ".join(f"{k}={v}" for k, v in work.items()) or "unknown",
        "timeline": run.manifest.get("scenario_timeline") or [],
        "table": _table_rows(run), "significance": _significance_rows(run), "failures": failures,
        "varied": (run.manifest.get("repetition_variation") or {}), "problems": run.problems,
        "figures": _figure_entries([f for f in figs if f.run == str(run.path)], out_dir),
    }


def render_report(runs: list[Run], figs: list[Figure], out_dir: Path) -> Path:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    html = env.from_string(REPORT_TEMPLATE).render(
        experiment=runs[0].experiment if runs else "no runs",
        runs=[_run_context(r, figs, out_dir) for r in runs],
        sweep_figures=_figure_entries([f for f in figs if f.run is None], out_dir),
    )
    path = Path(out_dir) / "report.html"
    path.write_text(html)
    return path


def analyze(run_dirs: list[Path], out_dir: Path | None = None) -> dict:
    """Figures and report.html for the given run directories (a sweep's top directory expands to its
    points). Returns {"report": Path, "figures": {name: {"png": Path, "pdf": Path}}, "problems": [...]}."""
    runs = load_runs(list(run_dirs))
    if not runs:
        raise ValueError("analyze: no run directories given")
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir([r.path for r in runs])
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = make_figures(runs, out_dir)
    report = render_report(runs, figs, out_dir)
    return {
        "report": report,
        "figures": {f.png.stem: {"png": f.png, "pdf": f.pdf} for f in figs},
        "problems": {r.label: list(r.problems) for r in runs if r.problems},
    }
