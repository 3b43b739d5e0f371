#!/usr/bin/env bash
# The test command: set up (idempotent), then the default suite (unit + root integration, not slow).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "slow"` or `-k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Vagrant fleet's Vagrantfile, where vagrant is installed (HEADROOM_VAGRANT=1 bash scripts/setup.sh):
# validated from a scratch directory so that no .vagrant/ state lands in the checkout.
if command -v vagrant >/dev/null 2>&1; then
  scratch=$(mktemp -d)
  cp Vagrantfile "$scratch/"
  (cd "$scratch" && vagrant validate --ignore-provider >/dev/null) || { echo "vagrant validate failed" >&2; rm -rf "$scratch"; exit 1; }
  rm -rf "$scratch"
  echo "vagrant validate: ok"
fi
set +e
.venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit $rc
