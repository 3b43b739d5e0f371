#!/usr/bin/env bash
# The test command: set up (idempotent), then the default suite (unit + root integration, not slow).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "slow"` or `-k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit $rc
