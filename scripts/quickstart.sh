#!/usr/bin/env bash
# The main job: set up (idempotent), run the quickstart experiment on an emulated 3-host star,
# then draw its figures. Extra arguments go to `headroom run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-results}
run_dir=$(.venv/bin/headroom run experiments/quickstart.yaml -o "$OUT" --print-run-dir "$@" | tail -n 1)
.venv/bin/headroom analyze "$run_dir"
echo "figures: $run_dir/figures  (report: $run_dir/figures/report.html)"
