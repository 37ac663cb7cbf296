#!/usr/bin/env bash
# One prepared GPU check, in one go and under 8 minutes, on a bare machine that has this repo
# copied and a python (docs/throughput.md, "GPU procedure"):
#
#   1. nvidia-smi                      -> DEST/nvidia-smi.txt (also printed)
#   2. a venv with fct installed        (see "Install" below)
#   3. fct bench transformation --device cuda --json, float32 + bfloat16,
#      reference and quickstart sizes   -> DEST/bench_reference.json, DEST/bench_quickstart.json
#   4. fct run tiny --device cuda       -> DEST/tiny_gpu/ (packed as DEST/tiny_gpu.tgz)
#   5. torchrun --nproc-per-node 1 -m fct run cifar100 --smoke on a fabricated CIFAR-100 copy
#      (tests/helpers/fabricate.py; the real on-disk format), i.e. the DDP path on one GPU
#                                       -> DEST/smoke_ddp/ (packed as DEST/smoke_ddp.tgz)
#   6. bench/gpu_scale.py: ResNet50-128 training and embedding images/s at 224 px, and a
#      50,000-query leave-one-out evaluation on the GPU -> DEST/gpu_scale.json
#
# Usage:   bash bench/gpu_check.sh [DEST]          (DEST defaults to $OUT, else ./gpu_check_out)
# Env:     PYTHON      interpreter to build the venv from (default python3)
#          FCT_VENV    where the venv lives (default /tmp/fct-gpu-venv, outside the repo)
#          FCT_PACK=0  keep DEST/tiny_gpu/ as a folder instead of packing it into a .tgz
#          GPU_CHECK_SIZES  transformation benchmark sizes (default "reference quickstart")
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

SMOKE_ARGS=(run cifar100 --smoke --device cuda --data-root "$SCRATCH/data" --out "$DEST/smoke_ddp"
  --cache "$SCRATCH/fct-cache-ddp")

# Seconds per step: 15 + 90 + 2 x 140 + 75 + 120 + 90 = 670 s with both benchmark sizes;
# with GPU_CHECK_SIZES=reference, 530 s.
# Each can be overridden from the environment (e.g. T_BENCH=100) to fit a shorter lease.
T_SMI=${T_SMI:-15} T_INSTALL=${T_INSTALL:-90} T_BENCH=${T_BENCH:-140} T_RUN=${T_RUN:-75}
T_SMOKE=${T_SMOKE:-120} T_SCALE=${T_SCALE:-90}

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
# Most important first, so a short lease loses the least: the DDP smoke run and the GPU
# measurements, then the transformation benchmark, then the plain tiny run.
# The DDP path (process group, NCCL, sharded embedding, rank-0 writes) on one GPU, with the
# real architectures of a paper suite shrunk by --smoke, on fabricated CIFAR-100 files.
step smoke_ddp "$T_SMOKE" bash -c 'set -e
  PYTHONPATH="$REPO/tests/helpers${PYTHONPATH:+:$PYTHONPATH}" "$0" -c "import sys; from fabricate import fabricate_cifar100; fabricate_cifar100(sys.argv[1], per_class=6, classes=100, test_per_class=4)" "$1"
  "$0" -m torch.distributed.run --standalone --nproc-per-node=1 -m fct "${@:2}"' \
  "$PY" "$SCRATCH/data" "${SMOKE_ARGS[@]}"

step gpu_scale "$T_SCALE" bash -c '"$@" >"$0"' "$DEST/gpu_scale.json" "$PY" bench/gpu_scale.py

for sizes in ${GPU_CHECK_SIZES:-reference quickstart}; do
  # One call per sizes, so a timeout loses one file, not both; JSON on stdout, logs on stderr.
  step "bench_$sizes" "$T_BENCH" bash -c '"$@" >"$0"' "$DEST/bench_$sizes.json" \
    "$PY" -m fct "${BENCH_ARGS[@]}" --sizes "$sizes"
done

step tiny_gpu "$T_RUN" "$PY" -m fct "${RUN_ARGS[@]}"

if [[ "${FCT_PACK:-1}" != 0 ]]; then
  # Few files come back from a device machine: one archive per tree of records.
  for d in tiny_gpu smoke_ddp; do
    [[ -d "$DEST/$d" ]] && tar czf "$DEST/$d.tgz" -C "$DEST" "$d" && rm -rf "$DEST/$d"
  done
fi
rm -rf "$SCRATCH"

ls -la "$DEST"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
