#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA torch and nvcc (e.g. a lent device machine):
#   1. build srn_fast in place against that torch (CUDA kernels for TORCH_CUDA_ARCH_LIST, default 9.0 = H100/H200),
#   2. run the whole test suite there (the CUDA tests, CPU vs CUDA and oracle comparisons, run instead of skipping),
#   3. run benchmarks/march_bench.py on the GPU and write its JSON.
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
PY=${PYTHON:-python3}
status=0

echo "== build ($(date -u +%H:%M:%S))"
if ! $PY setup.py build_ext --inplace >"$OUT/gpu_build.log" 2>&1; then
  tail -n 60 "$OUT/gpu_build.log"
  echo "gpu_check: build failed"
  exit 1
fi
$PY - <<'EOF' || exit 1
import torch, srn_fast._C as C
assert torch.cuda.is_available(), "gpu_check: torch sees no GPU"
assert C.with_cuda, "gpu_check: srn_fast._C was built without CUDA kernels"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF

echo "== tests ($(date -u +%H:%M:%S))"
$PY -m pytest tests -q -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark ($(date -u +%H:%M:%S))"
name=$($PY -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '_'))")
$PY benchmarks/march_bench.py --device cuda --repeats "${REPEATS:-5}" \
  --backends "${BACKENDS:-fused,fused-store,torch,fused-bf16}" \
  --json "$OUT/cuda_${name}.json" --note "benchmarks/gpu_check.sh" 2>&1 | tee "$OUT/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done ($(date -u +%H:%M:%S)), status $status"
exit $status
