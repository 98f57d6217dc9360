#!/usr/bin/env bash
# Run the CUDA path of the contrastive loss on the CPU (the kernels of
# csrc/contrastive/contrastive_cuda.cu under emu_cuda.h, the host loop of
# contrastive_cuda_op.cpp restated) and compare it with the CPU kernels; see
# emulate_contrastive_cuda.cpp. Needs g++ >= 12 (C++20) and python3; under a minute.
#   bash tests/native/contrastive_cuda_emulation/run.sh [--strict]
# --strict: the bug probes at the end count as failures. Environment:
#   CIFOPS_EMU_BUILD_DIR  the build directory (default build-native/contrastive_cuda_emulation)
#   CIFOPS_EMU_CU         the .cu to emulate (default csrc/contrastive/contrastive_cuda.cu;
#                         point it at a copy with a planted bug to see the checks fail)
#   CIFOPS_EMU_SEED       the seed of the emulated threads' scheduling order
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build="${CIFOPS_EMU_BUILD_DIR:-$root/build-native/contrastive_cuda_emulation}"
cu="${CIFOPS_EMU_CU:-$root/csrc/contrastive/contrastive_cuda.cu}"
mkdir -p "$build"
# The .cu as C++ (its CUDA headers, and those of common/cuda_common.cuh, are the
# emulation's stand-ins in tests/native/cuda_emulation/include): launches by
# emu_launch(), the grid cap a variable (the driver lowers it to test the grid-stride loop).
python3 - "$cu" "$build/contrastive_cuda_emulated.inc" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
src, n = re.subn(r"(\w+<[\w\s,]+>)<<<(.*?)>>>\(",
                 lambda m: "emu_launch(EMU_CFG(" + m.group(2) + "), " + m.group(1) + ", ",
                 src, flags=re.S)
assert n == 4, f"expected 4 kernel launches, found {n}"
src, n = re.subn(r"constexpr int64_t kMaxBlocks = ", "int64_t kMaxBlocks = ", src)
assert n == 1, "expected the grid cap 'constexpr int64_t kMaxBlocks'"
open(sys.argv[2], "w").write('#include "emu_cuda.h"\n#line 1 "' + sys.argv[1] + '"\n' + src)
PY
flags=(-std=c++20 -O2 -pthread -I"$root/tests/native/cuda_emulation/include" -I"$root/csrc"
       -I"$root/csrc/contrastive" -I"$here" -I"$build")
# the two translation units in parallel
g++ "${flags[@]}" -c "$root/csrc/contrastive/contrastive_cpu.cpp" -o "$build/contrastive_cpu.o" &
cpu_pid=$!
g++ "${flags[@]}" -c "$here/emulate_contrastive_cuda.cpp" -o "$build/emulate.o"
wait "$cpu_pid"
g++ -pthread "$build/emulate.o" "$build/contrastive_cpu.o" -o "$build/emulate_contrastive_cuda"
"$build/emulate_contrastive_cuda" "$@"
