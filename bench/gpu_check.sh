#!/usr/bin/env bash
# bench/gpu_check.sh [OUTDIR]: on a machine with an NVIDIA GPU, build pyhwp in place for that GPU's
# arch only, run the test suite (cuda-marked tests included) and the GPU benchmark, and write
# gpu_check.log, build.log, tests.xml, gpu_bench.json and sass_summary.txt into OUTDIR (default
# $OUT, else ./out). Finishes within PYHWP_CHECK_BUDGET_S (default 450 s, under 8 minutes): each
# step gets the time left; a failed step does not stop the later ones.
# Exit status: 0 only when the build and the tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-$PWD/out}}"
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
PY="${PYTHON:-python3}"
t0=$(date +%s)
BUDGET="${PYHWP_CHECK_BUDGET_S:-450}"  # the whole script, seconds; steps get what is left
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
left() { local l=$(( t0 + BUDGET - $(date +%s) - ${1:-0} )); [ "$l" -gt 0 ] && echo "$l" || echo 1; }
cap() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }  # min of two integers

stamp "start in $PWD, output to $OUTDIR"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
# PYHWP_CUDA_ARCH (e.g. 90) skips the detection; PYHWP_BUILD_JOBS caps the build's parallelism.
ARCH="${PYHWP_CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')}"
if [ -z "$ARCH" ]; then
  ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')
fi
stamp "GPU arch sm_$ARCH; nvcc: $(nvcc --version | tail -n1); torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
stamp "python $("$PY" -V 2>&1) at $(command -v "$PY"); Python.h $([ -f "$PYINC/Python.h" ] && echo found || echo MISSING) in $PYINC"
COMMIT="${PYHWP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export PYHWP_COMMIT="$COMMIT"
stamp "commit $COMMIT"

# 1. Build the extension next to the sources (README, Development), for this GPU only.
BUILD_OK=0
stamp "build"
if timeout 60 cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYHWP_DEV_INPLACE=ON \
      -DPYHWP_CUDA=ON -DPYHWP_CUDA_ARCHS="$ARCH" -DPython_EXECUTABLE="$(command -v "$PY")" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$OUTDIR/build.log" 2>&1 &&
   timeout "$(cap "$(left 200)" 240)" cmake --build build/gpu -j "${PYHWP_BUILD_JOBS:-$(nproc)}" -- -v >>"$OUTDIR/build.log" 2>&1; then
  BUILD_OK=1
  stamp "build ok; warnings: $(grep -ci 'warning' "$OUTDIR/build.log")"
else
  stamp "BUILD FAILED (tail of build.log follows)"
  tail -n 40 "$OUTDIR/build.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. Tensor-core and vector instructions actually in the binary (cheap; no GPU time).
if [ "$BUILD_OK" = 1 ] && command -v cuobjdump >/dev/null; then
  SO="pyhwp/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  cuobjdump -sass "$SO" >"$OUTDIR/sass.txt" 2>/dev/null || true
  {
    echo "SASS of $SO for sm_$ARCH: instruction counts per kernel (HMMA tensor core, LDSM ldmatrix,"
    echo "LDGSTS cp.async, LDG.E.128 16-byte loads, LDL/STL local memory)"
    awk '/Function :/ { name = $3 }
         { for (i = 1; i <= NF; i++) if ($i ~ /^(HMMA|LDSM|LDGSTS|LDG|LDL|STL)(\.|$)/) c[name " " $i]++ }
         END { for (k in c) print k, c[k] }' "$OUTDIR/sass.txt" | sort
  } >"$OUTDIR/sass_summary.txt"
  rm -f "$OUTDIR/sass.txt"
  stamp "sass summary: $(grep -c ' HMMA' "$OUTDIR/sass_summary.txt") (kernel, HMMA form) pairs; local memory: $(grep -cE ' (LDL|STL)' "$OUTDIR/sass_summary.txt") (kernel, op) pairs"
fi

# 3. Tests: the whole suite, so the CPU kernels are checked in the CUDA build too.
TESTS_OK=0
if [ "$BUILD_OK" = 1 ]; then
  stamp "tests"
  "$PY" -c 'import pyhwp; from pyhwp._ext import _C; print(_C.build_info())'
  if timeout "$(cap "$(left 100)" 200)" "$PY" -m pytest -q -p no:cacheprovider -rfE --junitxml="$OUTDIR/tests.xml" tests; then
    TESTS_OK=1
  fi
  stamp "tests ok=$TESTS_OK"
fi

# 4. Benchmark (runs even after test failures: its JSON records errors vs dense per case).
if [ "$BUILD_OK" = 1 ]; then
  stamp "benchmark"
  BENCH_S=$(cap "$(left 10)" 200)
  QUICK=""
  [ "$BENCH_S" -lt 120 ] && QUICK="--quick"  # two shapes when time is short
  stamp "benchmark budget ${BENCH_S}s $QUICK"
  timeout "$BENCH_S" "$PY" bench/gpu_bench.py --out "$OUTDIR/gpu_bench.json" $QUICK || stamp "benchmark exited with $?"
fi

stamp "done: build_ok=$BUILD_OK tests_ok=$TESTS_OK"
[ "$BUILD_OK" = 1 ] && [ "$TESTS_OK" = 1 ]
