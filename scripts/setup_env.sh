#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything scidfm-megatron needs on this machine.
#   EXTRAS=test,hf   which setup.py extras to install (default: test)
#   TORCH_SPEC       torch requirement installed *first* (default torch==2.13.0; pass e.g.
#                    "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" off this machine)
#   CONSTRAINTS      pip constraints file (default constraints.txt: the exact tested versions; setup.py
#                    states ranges). CONSTRAINTS= (empty) installs within setup.py's ranges only.
# torch goes in before anything that depends on it, so pip does not pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
EXTRAS=${EXTRAS:-test}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
PIN=()
[ -n "$CONSTRAINTS" ] && PIN=(-c "$CONSTRAINTS")
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${PIN[@]+"${PIN[@]}"} $TORCH_SPEC
.venv/bin/python -m pip install -q ${PIN[@]+"${PIN[@]}"} -e ".[${EXTRAS}]"
.venv/bin/python -c "import torch, megatron.core; print('environment ready: torch', torch.__version__, \
'| megatron-core', megatron.core.__version__, '| CUDA', torch.cuda.is_available())"
