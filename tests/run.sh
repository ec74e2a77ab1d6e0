#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash launch/setup.sh
# TEST_WORKERS processes (pytest-xdist, default 2: one per core of the 2-core CI machine), each test file in one
# worker (its module fixtures built once); the 20 slowest tests are listed at the end, then the total time.
start=$SECONDS
rc=0
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --durations=20 "$@" || rc=$?
echo "[tests] total $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s with ${TEST_WORKERS:-2} workers"
exit $rc
