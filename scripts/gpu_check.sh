#!/usr/bin/env bash
# The GPU acceptance check as ONE command (docs/gpu.md), from the repository root of the GPU machine:
#
#   bash scripts/gpu_check.sh [--dry-run] [--out FILE] [tools/gpu_check.py options...]
#
# 1. installs gpu_wheels/ (made here by scripts/gpu_wheels.sh, carried to the machine) with
#    `pip install --no-index --no-deps --target` into a scratch folder: the "required" wheels always, the
#    "fallback" ones only when their module does not import (skipped in --dry-run);
# 2. puts the repository on PYTHONPATH (the project is not pip-installed: setup.py pins torch==2.13.0,
#    the machine has its own torch, and nothing on the import path checks torch's version);
# 3. runs tools/gpu_check.py, which writes one JSON results file: --out, else $OUT/gpu_check.json when $OUT
#    is set, else runs/gpu_check.json. Exit status 0 only if every check passed.
#
# --dry-run: the same checks on the CPU (gloo; CUDA hidden), tiny sizes, no install: the logic, in CI.
# The whole run is bounded: tools/gpu_check.py keeps a 450 s budget (600 s in --dry-run; --budget S to
# change), and a hard stop follows 60 s after it.
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_SITE (install
# folder, default ${TMPDIR:-/tmp}/scidfm_gpu_site), GPU_WHEELS (default gpu_wheels).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUTFILE=""
BUDGET=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUTFILE=$2; shift ;;
    --out=*) OUTFILE=${1#--out=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) PASS+=("$1") ;;
  esac
  shift
done
if [ -z "$OUTFILE" ]; then
  if [ -n "${OUT:-}" ]; then OUTFILE=$OUT/gpu_check.json; else OUTFILE=runs/gpu_check.json; fi
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "$BUDGET" ]; then
  if [ $DRY = 1 ]; then BUDGET=600; else BUDGET=450; fi
fi
WHEELS=${GPU_WHEELS:-gpu_wheels}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/scidfm_gpu_site}
INSTALLED=""

if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  echo "[gpu_check.sh] dry run: CPU only, no wheels installed"
elif [ -f "$WHEELS/manifest.txt" ]; then
  TODO=()
  while read -r whl module kind; do
    case "$whl" in ''|'#'*) continue ;; esac
    if [ "$kind" = required ] || ! "$PYTHON" -c "import $module" 2>/dev/null; then
      TODO+=("$WHEELS/$whl")
      INSTALLED="$INSTALLED $whl"
    fi
  done < "$WHEELS/manifest.txt"
  echo "[gpu_check.sh] installing ${#TODO[@]} wheels into $SITE:$INSTALLED"
  rm -rf "$SITE"
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${TODO[@]}"; then
    echo "[gpu_check.sh] error: pip could not install $WHEELS/" >&2
    exit 2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif "$PYTHON" -c "import megatron.core, zstandard" 2>/dev/null; then
  echo "[gpu_check.sh] no $WHEELS/: using the installed megatron-core"
else
  echo "[gpu_check.sh] error: megatron-core is not installed and there is no $WHEELS/ to install it from:" \
       "run 'bash scripts/gpu_wheels.sh' on a machine with PyPI and carry $WHEELS/ here (docs/gpu.md)" >&2
  exit 2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_INSTALLED="$INSTALLED" OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
ARGS=(--out "$OUTFILE" --budget "$BUDGET" --python "$PYTHON")
[ $DRY = 1 ] && ARGS+=(--dry-run)
# tools/gpu_check.py stops itself at the budget; this is the backstop (SIGTERM: it records and exits).
timeout -k 20 $(( ${BUDGET%.*} + 60 )) "$PYTHON" tools/gpu_check.py "${ARGS[@]}" ${PASS[@]+"${PASS[@]}"}
rc=$?
echo "[gpu_check.sh] exit $rc; results: $OUTFILE"
exit $rc
