#!/usr/bin/env bash
# Set-up and entry points for a fresh machine: creates/refreshes .venv (CPU torch for dev/CI), then
#   scripts/dev.sh demo [overrides]   trains the tiny model on the embedded corpus (configs/tiny.toml)
#   scripts/dev.sh test [pytest args] runs the whole test suite (what .ci/run calls)
#   scripts/dev.sh bench [args]       runs the benchmark suite
# Idempotent: the venv is reused while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
# The dev/CI pin: the CPU build of torch (users install the torch build that fits their machine).
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}

ensure_venv() {
  local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${TORCH_PIN}"
  if [ -f "$stamp" ]; then return; fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_PIN"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)  ensure_venv; exec "$VENV/bin/python" train.py --config configs/tiny.toml "$@" ;;
  test)  ensure_venv; exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@" ;;
  bench) ensure_venv; exec "$VENV/bin/python" bench/run.py "$@" ;;
  setup) ensure_venv ;;
  *) echo "usage: scripts/dev.sh demo|test|bench|setup [args]" >&2; exit 2 ;;
esac
