#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA torch, nvcc and a GPU (e.g. a lent device machine):
#   1. the user's install path, exactly as CI proves it without a GPU (.ci/install_and_test.sh): a plain
#      `pip install --no-build-isolation .` into a virtual environment that sees the machine's torch, with_cuda
#      checked, the whole suite against the installed package (the CUDA tests, CPU vs CUDA and oracle
#      comparisons run instead of skipping), the fused benchmark from the source root;
#   2. benchmarks/march_bench.py on the GPU, JSON written.
# Logs and the JSON go to $OUT (default benchmarks/results). Usage:
#   bash benchmarks/gpu_check.sh                       # everything, torch.compile skipped (it takes minutes)
#   BACKENDS=fused,torch,torch+compile bash benchmarks/gpu_check.sh
# Exit status: non-zero when the build or a test fails (the benchmark still runs after a test failure, so that
# one call returns as much as it can).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
status=0
venv=$(mktemp -d)/venv
python3 -m venv --system-site-packages "$venv"   # the machine's CUDA torch, no downloads
PY=$venv/bin/python
# python3 may itself be a virtual environment (the lent machines' /opt/torch/.venv): --system-site-packages then
# reaches only the base interpreter's folders, so the new venv also reads python3's own site-packages (a .pth).
python3 -c "import site; print('\n'.join(site.getsitepackages()))" \
  >"$("$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/_gpu_check_parent.pth"

echo "== install + tests ($(date -u +%H:%M:%S))"
"$PY" - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
bash .ci/install_and_test.sh "$PY" "$OUT/gpu_install" --expect-cuda || status=1

echo "== benchmark ($(date -u +%H:%M:%S))"
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '_'))")
"$PY" benchmarks/march_bench.py --device cuda --repeats "${REPEATS:-5}" --no-progress \
  --backends "${BACKENDS:-fused,fused-store,torch,fused-bf16}" \
  --json "$OUT/cuda_${name}.json" --note "benchmarks/gpu_check.sh" 2>&1 | tee "$OUT/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done ($(date -u +%H:%M:%S)), status $status"
exit $status
