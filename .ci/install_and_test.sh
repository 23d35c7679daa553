#!/usr/bin/env bash
# Install srn_fast as a user does and test what was installed. Shared by .ci/cuda_build_check.sh (a CUDA torch on a
# machine without a GPU) and benchmarks/gpu_check.sh (a lent GPU machine), so both exercise the same path.
#
#   .ci/install_and_test.sh PYTHON OUT [--expect-cuda]
#
# PYTHON: an interpreter whose environment already holds torch. OUT: a folder for the logs.
#   1. copies the source (tracked + untracked-not-ignored files: no in-place build, no build/ folder) to a fresh
#      folder, as a clean clone would be;
#   2. `pip install --no-build-isolation ".[test]"` there: a plain, non-editable install, CUDA_HOME not set;
#      the build log's toolkit/cudart lines are printed;
#   3. checks from outside the source that srn_fast._C imports (and, with --expect-cuda, that with_cuda is True);
#   4. runs the whole suite from outside the source tree, then again from the copy's root (where the unbuilt
#      source copy shadows nothing: tests/conftest.py picks the installed one); any skip other than for hardware
#      the machine lacks ("needs a CUDA GPU", "needs a CPU with <instructions>": srn_fast's AVX512-BF16 / AMX
#      kernels on a CPU without them) fails the check;
#   5. runs benchmarks/march_bench.py (render, fused vs torch, 64x64) from the copy's root: the fused backend of
#      the installed package must run.
set -euo pipefail
PY=$1
OUT=$2
EXPECT_CUDA=${3:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
t0=$(date +%s)
copy=$(mktemp -d)/srn_fast_src
mkdir -p "$copy"
if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$SRC" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$copy" -xf -
else  # a copy of the tree without .git (e.g. a lent device machine): leave build outputs behind
  tar -C "$SRC" --exclude=./build --exclude='*.so' --exclude='*.egg-info' --exclude=__pycache__ --exclude=.git \
    -cf - . | tar -C "$copy" -xf -
fi
echo "install_and_test: source copied to $copy"

unset CUDA_HOME CUDA_PATH SRN_FAST_FORCE_CUDA
export MAX_JOBS=${MAX_JOBS:-2}
if ! (cd "$copy" && "$PY" -m pip install -v --no-build-isolation ".[test]") >"$OUT/install.log" 2>&1; then
  tail -n 60 "$OUT/install.log"
  echo "install_and_test: pip install failed (log: $OUT/install.log)"
  exit 1
fi
grep -E "^ *srn_fast: (CUDA|building|skipped|no GPU)|Successfully installed" "$OUT/install.log" | sed -E 's/^(.{300}).*/\1 .../' || true
echo "install_and_test: installed in $(( $(date +%s) - t0 )) s"

outside=$(mktemp -d)
(cd "$outside" && "$PY" - "$EXPECT_CUDA" <<'PYEOF'
import sys
import srn_fast, srn_fast._C as C
from srn_fast import _ext
print("install_and_test:", _ext.describe())
assert "site-packages" in srn_fast.__file__, f"expected the installed copy, got {srn_fast.__file__}"
if sys.argv[1] == "--expect-cuda":
    assert C.with_cuda, "srn_fast._C was built without its CUDA kernels"
PYEOF
)

check_skips() {  # every skip must be for want of hardware: a GPU, or CPU instructions srn_fast's own kernels use
  if grep -E "^SKIPPED" "$1" | grep -vE "needs a CUDA GPU|needs a CPU with "; then
    echo "install_and_test: tests were skipped for a reason other than missing hardware (above)"; exit 1
  fi
}
echo "install_and_test: the suite, from outside the source tree"
(cd "$outside" && "$PY" -m pytest "$copy/tests" -q -rs -p no:cacheprovider) 2>&1 | tee "$OUT/tests_outside.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "install_and_test: tests failed"; exit 1; }
check_skips "$OUT/tests_outside.log"
echo "install_and_test: the suite, from the source copy's root (non-editable install)"
(cd "$copy" && "$PY" -m pytest tests -q -rs -p no:cacheprovider) 2>&1 | tee "$OUT/tests_source_root.log" | tail -n 6
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "install_and_test: tests failed"; exit 1; }
check_skips "$OUT/tests_source_root.log"
grep -q "srn_fast._C loaded" "$OUT/tests_source_root.log" || { echo "install_and_test: header lacks _C loaded"; exit 1; }

echo "install_and_test: benchmarks/march_bench.py from the source copy's root"
(cd "$copy" && "$PY" benchmarks/march_bench.py --quick --no-memory --cases render --backends fused,torch --no-progress) \
  2>&1 | tee "$OUT/bench.log" | tail -n 6
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "install_and_test: benchmark failed"; exit 1; }
grep -E "^render_64x64 +fused " "$OUT/bench.log" | grep -vq "Error" || { echo "install_and_test: fused render did not run"; exit 1; }
echo "install_and_test: passed in $(( $(date +%s) - t0 )) s"
