#!/usr/bin/env bash
# The test suite, from a fresh machine: creates .venv if needed, then runs pytest on CPU.
# Extra arguments go to pytest (e.g. -k parity, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test,hf,eval,fast,parquet} bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1
exec .venv/bin/python -m pytest tests -q -rs --durations=15 "$@"
