#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash launch/setup.sh
exec .venv/bin/python -m pytest -q --durations=20 "$@"   # the 20 slowest tests are listed at the end
