#!/bin/bash
# One command for a GPU machine, which yields every GPU number the open issues ask for:
# build cifops against that machine's torch, check that C++ errors raise
# (benchmarks/abort_probe.py), run the CUDA tests, compute-sanitizer memcheck and
# racecheck on a small workload, the GPU benchmarks (benchmarks/gpu_bench.py: CIF
# forward+backward wall and kernel time with and without max_tokens at every size, the
# forward's bandwidth, the contrastive loss against naive and Inf-CL with peak memory),
# the AISHELL-1 preset training step (benchmarks/gpu_step.py), the host time per CIF
# forward+backward (benchmarks/bench_host_time.py) and the streaming step. Logs go to
# $OUT (default /tmp/gpu-check); the summary lines are printed as they come. About 6
# minutes on an H100.
#
#   bash benchmarks/gpu_check.sh [--quick]     # --quick: small benchmark sizes only
#
# The machine has no package index: peers (torch-cif, funasr, inf-cl) and the recipe's
# data dependencies are installed from wheels in a git-ignored .whl/ when present (the
# download command: benchmarks/RESULTS.md, "GPU check"), else whatever is installed is used.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
SITE=/tmp/cifops-peers
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "peer wheels failed to install (see pip.log)"
fi
el build
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! ( time TORCH_CUDA_ARCH_LIST=$arch CIFOPS_CUDA=1 MAX_JOBS=16 timeout 300 \
       python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; exit 1
fi
export PYTHONPATH=$PWD:$PWD/recipe:$PWD/benchmarks:$SITE
python3 -c "import cifops, torch; print(cifops.build_info(), torch.__version__)" || exit 1
el "abort probe (C++ errors must raise, not kill the process)"
timeout 60 python3 benchmarks/abort_probe.py > "$OUT/abort_probe.log" 2>&1
echo "abort probe rc=$?"; tail -4 "$OUT/abort_probe.log"
el "pytest (CUDA tests)"
timeout 240 python3 -m pytest tests/test_cif.py tests/test_cif_ties.py tests/test_contrastive.py \
  tests/test_compat.py tests/test_build.py tests/test_cif_stream.py -k "(cuda or gpu or build) and not emulation" -q -p no:cacheprovider -rfE \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -6 "$OUT/pytest.log"
el sanitize
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/gpu_sanitize.py \
  > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -2 "$OUT/memcheck.log"
timeout 120 compute-sanitizer --tool racecheck --kernel-name kns=cifops --error-exitcode 9 \
  python3 benchmarks/gpu_sanitize.py > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; tail -2 "$OUT/racecheck.log"
el bench
timeout 420 python3 benchmarks/gpu_bench.py "$@" 2>&1 | grep -v torch_complex | tee "$OUT/bench.log" | tail -40
el "training step (AISHELL-1 preset)"
timeout 180 python3 benchmarks/gpu_step.py 2>&1 | tee "$OUT/step.log" | tail -3
el "host time per CIF forward+backward (CPU tensors, one thread)"
timeout 120 python3 benchmarks/bench_host_time.py 2>&1 | tee "$OUT/host_time.log"
el "bench: streaming step per chunk"
timeout 90 python3 -m pytest benchmarks/bench_stream.py -k cuda --benchmark-only -q -p no:cacheprovider \
  --benchmark-columns=median,min,rounds 2>&1 | grep -E "^test_|Name" | tee "$OUT/bench_stream.log"
el done
