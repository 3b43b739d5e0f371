#!/usr/bin/env bash
# The main job: set up (idempotent), run the quickstart (SmolLM2-135M on an emulated 5-host star at
# a compute-bound and a link-bound point of the regime map), draw its figures and report, and
# print one verdict line per point. Extra arguments go to `headroom run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-results}
run_dir=$(.venv/bin/headroom run experiments/quickstart.yaml -o "$OUT" --print-run-dir "$@" | tail -n 1)
root=$(dirname "$run_dir")  # the sweep's directory: point-0 (compute-bound LAN), point-1 (slow links)
.venv/bin/headroom analyze "$root"
echo
echo "verdict:"
.venv/bin/python -m analysis.regime_points --verdict "$root"
echo "report: $(ls -d "$root"/figures/report.html "$root"/*/figures/report.html 2>/dev/null | head -n 1)"
