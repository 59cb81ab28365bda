#!/usr/bin/env bash
# The test suite, from a fresh machine: creates .venv if needed, then runs pytest on CPU.
# Extra arguments go to pytest (e.g. -k parity, -m "not slow", -m unit: the groups in pyproject.toml).
# SKIP_SETUP=1 skips the install (.ci/run installs once, then runs the groups one by one).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || EXTRAS=${EXTRAS:-test,hf,eval,fast,parquet} bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1
exec .venv/bin/python -m pytest tests -q -rs --durations=15 "$@"
