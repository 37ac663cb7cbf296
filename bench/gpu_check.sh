#!/usr/bin/env bash
# One prepared GPU check, in one go and under 8 minutes, on a bare machine that has this repo
# copied and a python (docs/throughput.md, "GPU procedure"):
#
#   1. nvidia-smi                      -> DEST/nvidia-smi.txt (also printed)
#   2. a venv with fct installed        (see "Install" below)
#   3. fct bench transformation --device cuda --json, float32 + bfloat16,
#      reference and quickstart sizes   -> DEST/bench_reference.json, DEST/bench_quickstart.json
#   4. fct run tiny --device cuda       -> DEST/tiny_gpu/ (packed as DEST/tiny_gpu.tgz)
#
# Usage:   bash bench/gpu_check.sh [DEST]          (DEST defaults to $OUT, else ./gpu_check_out)
# Env:     PYTHON      interpreter to build the venv from (default python3)
#          FCT_VENV    where the venv lives (default /tmp/fct-gpu-venv, outside the repo)
#          FCT_PACK=0  keep DEST/tiny_gpu/ as a folder instead of packing it into a .tgz
#
# Install: if PYTHON already has a CUDA torch (a GPU image), the venv sees its packages
# (--system-site-packages, plus a .pth file when PYTHON is itself a venv) and fct is installed
# with --no-deps --no-build-isolation, which needs no network. Otherwise `pip install -e .`
# pulls everything from PyPI; torch's default Linux x86_64 wheel on PyPI is the CUDA build.
# If the install still fails (offline and a dependency missing), the script falls back to
# PYTHONPATH=REPO with PYTHON and says so.
#
# Every step runs under `timeout`; a failed or timed-out step is reported and the next one
# still runs; the exit status is non-zero when any step failed. Logs go to DEST/*.log.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${OUT:-$PWD/gpu_check_out}}"
PYTHON="${PYTHON:-python3}"
VENV="${FCT_VENV:-/tmp/fct-gpu-venv}"
SCRATCH="$(mktemp -d /tmp/fct-gpu-check.XXXXXX)"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

# The commands under test, kept in one place so they are easy to change (e.g. the tiny run
# becomes `run tiny --smoke` or another suite once the lead switches to it).
BENCH_ARGS=(bench transformation --device cuda --dtype float32,bfloat16 --budget 4 --json)
RUN_ARGS=(run tiny --device cuda --out "$DEST/tiny_gpu" --cache "$SCRATCH/fct-cache")

# Seconds per step: 15 + 90 + 2 x 140 + 75 = 460 s, under 8 minutes with the rest.
T_SMI=15 T_INSTALL=90 T_BENCH=140 T_RUN=75

FAILED=()
step() { # step NAME SECONDS COMMAND...: run with a timeout, log to DEST/NAME.log, never abort
  local name="$1" secs="$2"
  shift 2
  echo "=== $name (timeout ${secs}s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$secs" "$@" 2> >(tee "$DEST/$name.log" >&2) || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "=== $name ok ($((SECONDS - t0)) s)"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "=== $name TIMED OUT after ${secs}s"
    FAILED+=("$name")
  else
    echo "=== $name FAILED (exit $rc)"
    FAILED+=("$name")
  fi
  return 0
}

install() { # run in a child bash (exported below), so `timeout` can bound it
  set -euo pipefail
  local system_cuda=0 site
  if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1; then
    system_cuda=1
  fi
  if [[ $system_cuda -eq 1 ]]; then
    # --without-pip: a venv's bundled pip/setuptools (old setuptools on Python 3.11) would
    # shadow the image's; its pip, setuptools and wheel are used instead, through the .pth.
    "$PYTHON" -m venv --without-pip --system-site-packages "$VENV"
    # --system-site-packages exposes the *base* interpreter's packages only; when PYTHON is
    # itself a venv (GPU images often ship torch in one) a .pth file adds its site-packages.
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
      >"$site/_fct_parent.pth"
    # Offline-safe: reuse the image's torch, timm, numpy...; only fct itself is installed.
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
  else
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$REPO"
  fi
  cd / # import fct from the install, not from a source tree in the working directory
  "$VENV/bin/python" -c '
import torch, timm, fct
assert torch.cuda.is_available(), "torch in the venv does not see a GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on "
      f"{torch.cuda.get_device_name(0)}; timm {timm.__version__}; fct from {fct.__file__}")'
}
export REPO PYTHON VENV
export -f install

echo "repo $REPO -> results in $DEST"
step nvidia-smi "$T_SMI" bash -c 'set -o pipefail; nvidia-smi | tee "$1/nvidia-smi.txt"' _ "$DEST"

step install "$T_INSTALL" bash -c install
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]] || ! (cd / && "$PY" -c 'import fct') >/dev/null 2>&1; then
  # The venv could not be made or fct not installed into it: run from the source tree.
  echo "=== install fell back to PYTHONPATH=$REPO with $PYTHON"
  PY="$PYTHON"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

cd "$REPO"
for sizes in reference quickstart; do
  # One call per sizes, so a timeout loses one file, not both; JSON on stdout, logs on stderr.
  step "bench_$sizes" "$T_BENCH" bash -c '"$@" >"$0"' "$DEST/bench_$sizes.json" \
    "$PY" -m fct "${BENCH_ARGS[@]}" --sizes "$sizes"
done

step tiny_gpu "$T_RUN" "$PY" -m fct "${RUN_ARGS[@]}"
if [[ "${FCT_PACK:-1}" != 0 && -d "$DEST/tiny_gpu" ]]; then
  # Few files come back from a device machine: one archive instead of a tree of records.
  tar czf "$DEST/tiny_gpu.tgz" -C "$DEST" tiny_gpu && rm -rf "$DEST/tiny_gpu"
fi
rm -rf "$SCRATCH"

ls -la "$DEST"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
