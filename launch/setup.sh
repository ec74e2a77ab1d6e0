#!/usr/bin/env bash
# Creates ./.venv (if missing) with the pinned requirements and the package installed in editable mode.
# EXTRAS=crf or EXTRAS=test (comma-separated) adds pyproject.toml's optional dependencies (tests/run.sh: test).
# Idempotent: re-running only reinstalls when requirements.txt, pyproject.toml or EXTRAS changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.dilaff_stamp
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
EXTRAS=${EXTRAS:-}
extras_stamp="$stamp.extras_${EXTRAS//,/_}"
if [ -n "$EXTRAS" ] && [ "$(cat "$extras_stamp" 2>/dev/null)" != "$want" ]; then
  # the package lists no dependencies of its own: this adds only the extras' pins
  echo "[setup] installing the extras: $EXTRAS"
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$extras_stamp"
fi
