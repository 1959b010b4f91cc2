#!/usr/bin/env bash
# GPU check: the throughput benchmark (bench/throughput.py) with --device gpu, where a GPU is.
#
#   bench/gpu_check.sh [--cpu] [throughput.py options, e.g. --count 3 --paths b,c --no-tta]
#
# Without options it runs the issue's batch: the three T1 series once each on the warm
# runner (b) and on TotalSegmentator's API in one process (e), and prints the same tables
# as bench/throughput.py (per series: read, preprocess, nnU-Net preprocess, forward,
# export, hand-over, encode, total; the batch totals and their ratio).
#
# --cpu runs the same benchmark on the CPU and skips the GPU checks (to try the script,
# or to compare, on a machine without a GPU).
#
# Run from a checkout whose .venv was made by `make venv`. It prints nvidia-smi and what
# the venv's torch sees of CUDA, then runs the benchmark on the GPU; without a GPU, or
# with a torch that cannot use it, it stops with a message and a non-zero exit status:
#   2  no venv, or the benchmark's own refusal (no series, no weights)
#   3  no NVIDIA GPU here (no nvidia-smi, or it lists no GPU)
#   4  the venv's torch cannot use the GPU (`make venv` installs the CPU wheel)
#
# Environment:
#   PYTHON              the interpreter (default .venv/bin/python)
#   INSTALL_CUDA_TORCH  a CUDA tag such as cu126: first replace the venv's torch by the same
#                       version built for that CUDA, from download.pytorch.org (needs the
#                       internet; never done unless asked)
#   DICOM_NODE_TEST_DATA  the shared MRI series (default ../shared/data/mri); or pass --series DIR
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found: run 'make venv' first (or set PYTHON)" >&2
  exit 2
fi

DEVICE=gpu
if [ "${1:-}" = "--cpu" ]; then
  DEVICE=cpu
  shift
fi
if [ "$#" -eq 0 ]; then  # the issue's batch
  set -- --count 1 --paths b,e \
    --series t1_siemens_3t_fl2d_sag_hfs,t1_philips_3t_mprage_sag,hard_j2k_lossless_t1_fl2d_sag_hfdl_derived
fi
if [ "$DEVICE" = cpu ]; then
  echo "== --cpu: no GPU checks; bench/throughput.py --device cpu $*"
  exec "$PY" bench/throughput.py --device cpu "$@"
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi is not installed: no NVIDIA GPU or driver on this machine; nothing to check" \
       "(bench/gpu_check.sh --cpu prints the same tables from the CPU)" >&2
  exit 3
fi
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: nvidia-smi finds no GPU on this machine; nothing to check" >&2
  nvidia-smi -L >&2 || true
  exit 3
fi
echo "== nvidia-smi"
nvidia-smi

if [ -n "${INSTALL_CUDA_TORCH:-}" ]; then
  version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  echo "== INSTALL_CUDA_TORCH=${INSTALL_CUDA_TORCH}: installing torch ${version}+${INSTALL_CUDA_TORCH} for $PY"
  "$PY" -m pip install "torch==${version}+${INSTALL_CUDA_TORCH}" \
    --index-url "https://download.pytorch.org/whl/${INSTALL_CUDA_TORCH}"
fi

echo "== torch"
status=0
"$PY" - <<'EOF' || status=$?
import sys

import torch

print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}; devices: {torch.cuda.device_count()}")
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"  cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB,"
          f" compute capability {props.major}.{props.minor}")
sys.exit(0 if torch.cuda.is_available() else 4)
EOF
if [ "$status" -ne 0 ]; then
  version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo VERSION)
  cat >&2 <<EOF
gpu_check: the venv's torch cannot use the GPU ('make venv' installs the CPU wheel).
Install a CUDA build of the same torch version into the venv, then run this again:
  INSTALL_CUDA_TORCH=cu126 bench/gpu_check.sh $*
or by hand:
  $PY -m pip install 'torch==${version}+cu126' --index-url https://download.pytorch.org/whl/cu126
(pick a CUDA tag that the driver above supports; a later 'make venv' keeps that build)
EOF
  exit 4
fi

echo "== bench/throughput.py --device gpu $*"
exec "$PY" bench/throughput.py --device gpu "$@"
