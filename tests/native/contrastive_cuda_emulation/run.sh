#!/usr/bin/env bash
# Emulate the contrastive CUDA kernels on the CPU and compare them with the CPU kernels
# (see emulate_contrastive_cuda.cpp). Needs g++ >= 12 and python3; about a minute.
#   bash tests/native/contrastive_cuda_emulation/run.sh [build-dir]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build="${1:-$root/build-native/contrastive_cuda_emulation}"
mkdir -p "$build"
# The .cu as C++: CUDA headers replaced by the emulation, launches by emu_launch().
python3 - "$root/csrc/contrastive/contrastive_cuda.cu" "$build" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
src = re.sub(r"#include <(cuda_bf16|cuda_fp16|cuda_runtime|math_constants|mma)\.h>\n", "", src)
src, n = re.subn(r"([\w:]+<\w+>)<<<(.*?)>>>\(",
                 lambda m: "emu_launch(EMU_CFG(" + m.group(2) + "), " + m.group(1) + ", ", src, flags=re.S)
assert n == 4, f"expected 4 kernel launches, found {n}"
head = '#include "emu_cuda.h"\n'
open(sys.argv[2] + "/fma.cpp", "w").write(head + src)
wmma = head + '#include <cstdio>\n#include <type_traits>\n#include "emu_wmma.h"\n#define __CUDA_ARCH__ 800\n'
open(sys.argv[2] + "/wmma.cpp", "w").write(wmma + src)
PY
for variant in fma wmma; do
  g++ -std=c++20 -O1 -pthread -I"$root/csrc" -I"$root/csrc/contrastive" -I"$here" \
      "$here/emulate_contrastive_cuda.cpp" "$build/$variant.cpp" \
      "$root/csrc/contrastive/contrastive_cpu.cpp" -o "$build/emulate_$variant"
  echo "== CUDA kernels emulated with the ${variant} tile engine for float16/bfloat16"
  "$build/emulate_$variant"
done
