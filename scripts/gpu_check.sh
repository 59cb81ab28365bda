#!/usr/bin/env bash
# The GPU acceptance check as ONE command (docs/gpu.md), from the repository root of the GPU machine:
#
#   bash scripts/gpu_check.sh [--dry-run [--install]] [--out FILE] [tools/gpu_check.py options...]
#
# 1. installs this project the way a GPU user does, with pip, from gpu_wheels/ (made here by
#    scripts/gpu_wheels.sh, carried to the machine: megatron-core, zstandard, fallbacks, and the project's
#    own wheel): a venv over the machine's site-packages (--system-site-packages), then
#    `pip install --no-index --find-links gpu_wheels scidfm_megatron-*.whl[test]`: pip resolves setup.py's
#    ranges against what the machine has (its torch build stays: checked, the run stops if torch changed)
#    and installs only what is missing. pip's report goes beside the results (*_pip_report.json). Should
#    that install fail, the error is recorded (the environment check fails on it) and the wheels go
#    in as before (--no-deps --target a scratch folder on PYTHONPATH), so the other checks still run;
# 2. the checks import the repository's copy (on PYTHONPATH: the same commit); the environment check
#    imports the pip-installed one, from outside the repository (skipped in --dry-run);
# 3. runs tools/gpu_check.py, which writes one JSON results file: --out, else $OUT/gpu_check.json when $OUT
#    is set, else runs/gpu_check.json. Exit status 0 only if every check passed.
#
# --dry-run: the same checks on the CPU (gloo; CUDA hidden), tiny sizes, no install: the logic, in CI.
# --dry-run --install: the dry run after step 1's install from gpu_wheels/ (a CPU stand-in of the GPU
# machine: its Python as PYTHON; docs/gpu.md); refused without gpu_wheels/manifest.txt.
# The whole run is bounded: tools/gpu_check.py keeps a 450 s budget (600 s in --dry-run; --budget S to
# change), and a hard stop follows 60 s after it.
# Environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_VENV (default
# ${TMPDIR:-/tmp}/scidfm_gpu_venv), GPU_CHECK_SITE (the fallback's folder, default
# ${TMPDIR:-/tmp}/scidfm_gpu_site), GPU_WHEELS (default gpu_wheels).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
INSTALL=0
OUTFILE=""
BUDGET=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --install) INSTALL=1 ;;
    --out) OUTFILE=$2; shift ;;
    --out=*) OUTFILE=${1#--out=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
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

if [ $INSTALL = 1 ] && { [ $DRY = 0 ] || [ ! -f "$WHEELS/manifest.txt" ]; }; then
  if [ $DRY = 0 ]; then
    echo "[gpu_check.sh] error: --install goes with --dry-run (without it the check always installs)" >&2
  else
    echo "[gpu_check.sh] error: --install: no $WHEELS/manifest.txt: run 'bash scripts/gpu_wheels.sh' first" >&2
  fi
  exit 2
fi
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  if [ $INSTALL = 1 ]; then
    echo "[gpu_check.sh] dry run: CPU only, the project pip-installed from $WHEELS/ (--install)"
  else
    echo "[gpu_check.sh] dry run: CPU only, no wheels installed"
  fi
fi
if [ $DRY = 1 ] && [ $INSTALL = 0 ]; then
  :
elif [ -f "$WHEELS/manifest.txt" ]; then
  VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/scidfm_gpu_venv}
  PROJECT=$(awk '$3 == "project" {print $1}' "$WHEELS/manifest.txt")
  REPORT="${OUTFILE%.json}_pip_report.json"
  mkdir -p "$(dirname "$OUTFILE")"
  TORCH_BEFORE=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>&1 | tail -1)
  INSTALL_ERROR=""
  rm -rf "$VENV"
  if [ -z "$PROJECT" ]; then
    INSTALL_ERROR="$WHEELS/manifest.txt lists no wheel of this project: rerun scripts/gpu_wheels.sh"
  elif "$PYTHON" -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
    VPIP=("$VENV/bin/python" -m pip)
  elif rm -rf "$VENV" && "$PYTHON" -m venv --system-site-packages --without-pip "$VENV"; then
    VPIP=("$PYTHON" -m pip --python "$VENV/bin/python")  # no ensurepip here: the machine's pip (>= 22.3)
  else
    INSTALL_ERROR="$PYTHON -m venv --system-site-packages $VENV failed"
  fi
  if [ -z "$INSTALL_ERROR" ]; then
    echo "[gpu_check.sh] pip install --no-index --find-links $WHEELS $PROJECT[test] into $VENV (torch $TORCH_BEFORE)"
    if PIPOUT=$("${VPIP[@]}" install -q --no-index --no-cache-dir --find-links "$WHEELS" --report "$REPORT" \
                  "$WHEELS/$PROJECT[test]" 2>&1); then
      TORCH_AFTER=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>&1 | tail -1)
      if [ "$TORCH_AFTER" != "$TORCH_BEFORE" ]; then
        echo "[gpu_check.sh] error: installing the project changed torch from $TORCH_BEFORE to $TORCH_AFTER" >&2
        exit 2
      fi
      PYTHON=$VENV/bin/python
      INSTALLED=$("$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(' '.join(
        i['metadata']['name'] + '==' + i['metadata']['version'] for i in r['install']))" "$REPORT")
      export GPU_CHECK_PROJECT_WHEEL="$PROJECT" GPU_CHECK_TORCH_BEFORE="$TORCH_BEFORE" GPU_CHECK_PIP_REPORT="$REPORT"
    else
      INSTALL_ERROR="pip could not install $PROJECT from $WHEELS/: $(echo "$PIPOUT" | grep -v '^WARNING' | tail -5)"
    fi
  fi
  if [ -n "$INSTALL_ERROR" ]; then
    # Recorded (the environment check fails on it); the other checks run on the wheels as before.
    echo "[gpu_check.sh] error: $INSTALL_ERROR; falling back to --no-deps --target" >&2
    export GPU_CHECK_INSTALL_ERROR="$INSTALL_ERROR"
    TODO=()
    while read -r whl module kind; do
      case "$whl" in ''|'#'*) continue ;; esac
      # The project's wheel too: its console scripts (scidfm-*) land in $SITE/bin; the repository's copy of
      # the package stays first on PYTHONPATH.
      if [ "$kind" = required ] || [ "$kind" = project ] || ! "$PYTHON" -c "import $module" 2>/dev/null; then
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
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  fi
elif "$PYTHON" -c "import megatron.core, zstandard" 2>/dev/null; then
  echo "[gpu_check.sh] no $WHEELS/: using the installed megatron-core"
else
  echo "[gpu_check.sh] error: megatron-core is not installed and there is no $WHEELS/ to install it from:" \
       "run 'bash scripts/gpu_wheels.sh' on a machine with PyPI and carry $WHEELS/ here (docs/gpu.md)" >&2
  exit 2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_INSTALLED="$INSTALLED" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# TorchDynamo off on the CPU only: on the GPU megatron's jit_fuser (torch.compile) runs as in a user's run.
[ $DRY = 1 ] && export TORCHDYNAMO_DISABLE=1
ARGS=(--out "$OUTFILE" --budget "$BUDGET" --python "$PYTHON")
[ $DRY = 1 ] && ARGS+=(--dry-run)
# tools/gpu_check.py stops itself at the budget; this is the backstop (SIGTERM: it records and exits).
timeout -k 20 $(( ${BUDGET%.*} + 60 )) "$PYTHON" tools/gpu_check.py "${ARGS[@]}" ${PASS[@]+"${PASS[@]}"}
rc=$?
echo "[gpu_check.sh] exit $rc; results: $OUTFILE"
exit $rc
