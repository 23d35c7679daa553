#!/usr/bin/env bash
# The ordinary CUDA build, proven on a machine without a GPU: a fresh virtual environment with the CUDA build of
# torch 2.13.0 (+cu130, with its nvidia-* wheels, about 3.5 GB, from the package registry rather than this machine's
# local CPU wheel), then .ci/install_and_test.sh: plain `pip install --no-build-isolation .` with nvcc on PATH and
# no CUDA_HOME, srn_fast._C.with_cuda must be True, the whole suite against the installed package (only tests for
# hardware the machine lacks may skip: a GPU, or the CPU instructions of srn_fast's own kernels). pip's cache (~/.cache/pip) is kept, so a second run downloads nothing.
#
#   bash .ci/cuda_build_check.sh [LOG_DIR]        (default: a temporary folder)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$(mktemp -d)}
t0=$(date +%s)
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_build_check: nvcc is not on PATH; nothing to check"; exit 1
fi
venv=$(mktemp -d)/venv_cuda_torch
python3 -m venv "$venv"
# PIP_FIND_LINKS / the pip config point at this machine's local CPU wheels: bypass them for the CUDA torch.
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$venv/bin/python" -m pip install -q torch==2.13.0 setuptools ninja numpy
"$venv/bin/python" -c "import torch; print('cuda_build_check: torch', torch.__version__, '| CUDA', torch.version.cuda, \
'| GPU visible:', torch.cuda.is_available())"
echo "cuda_build_check: CUDA torch installed in $(( $(date +%s) - t0 )) s"
PIP_CONFIG_FILE=/dev/null bash "$SRC/.ci/install_and_test.sh" "$venv/bin/python" "$OUT" --expect-cuda
rm -rf "$(dirname "$venv")"
echo "cuda_build_check: passed in $(( $(date +%s) - t0 )) s (logs: $OUT)"
