#!/usr/bin/env bash
# Run the CUDA path of the contrastive loss on the CPU (the kernels of
# csrc/contrastive/contrastive_cuda.cu under tests/native/cuda_emulation, the host loop
# of contrastive_cuda_op.cpp restated) and compare it with the CPU kernels; see
# emulate_contrastive_cuda.cpp. Needs g++ >= 12 (C++20) and python3; under a minute.
#   bash tests/native/contrastive_cuda_emulation/run.sh [--strict]
# --strict: the bug probes at the end count as failures. Environment:
#   CIFOPS_EMU_BUILD_DIR  the build directory (default build-native/contrastive_cuda_emulation)
#   CIFOPS_EMU_CU         the .cu to emulate (default csrc/contrastive/contrastive_cuda.cu;
#                         point it at a copy with a planted bug to see the checks fail)
#   CIFOPS_EMU_SEED       the seed of the emulated threads' scheduling order
#   EMU_FMAD=0            compile the .cu without FMA contraction (nvcc --fmad=false)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build="${CIFOPS_EMU_BUILD_DIR:-$root/build-native/contrastive_cuda_emulation}"
cu="${CIFOPS_EMU_CU:-$root/csrc/contrastive/contrastive_cuda.cu}"
mkdir -p "$build"
source "$root/tests/native/cuda_emulation/emulate_cu.sh"
emu_rewrite_cu "$cu" "$build/contrastive_cuda_emu.cpp"
flags=(-std=c++20 "${EMU_INCLUDES[@]}" -I"$root/csrc" -I"$root/csrc/contrastive")
# the translation units in parallel
g++ "${flags[@]}" "${EMU_CU_FLAGS[@]}" -c "$build/contrastive_cuda_emu.cpp" \
    -o "$build/contrastive_cuda_emu.o" & p1=$!
g++ "${flags[@]}" -O2 -c "$root/csrc/contrastive/contrastive_cpu.cpp" -o "$build/contrastive_cpu.o" & p2=$!
g++ "${flags[@]}" -O2 -c "$here/emulate_contrastive_cuda.cpp" -o "$build/emulate.o" & p3=$!
# the CPU tile kernels, portable and (x86) AVX2 + FMA, as setup.py builds them
kernels=("$build/contrastive_cpu_kernels.o")
g++ "${flags[@]}" -O2 -ffp-contract=off -c "$root/csrc/contrastive/contrastive_cpu_kernels.cpp" \
    -o "$build/contrastive_cpu_kernels.o" & p4=$!
pids=($p1 $p2 $p3 $p4)
case "$(uname -m)" in x86_64|i?86)
  kernels+=("$build/contrastive_cpu_kernels_avx2.o")
  g++ "${flags[@]}" -O2 -ffp-contract=off -mavx2 -mfma -DCIFOPS_CPU_AVX2 \
      -c "$root/csrc/contrastive/contrastive_cpu_kernels.cpp" \
      -o "$build/contrastive_cpu_kernels_avx2.o" & pids+=($!) ;;
esac
ok=1
for p in "${pids[@]}"; do wait "$p" || ok=0; done
[[ $ok == 1 ]] || { echo "compilation failed" >&2; exit 2; }
g++ "${EMU_LINK_FLAGS[@]}" "$build/emulate.o" "$build/contrastive_cuda_emu.o" \
    "$build/contrastive_cpu.o" "${kernels[@]}" -o "$build/emulate_contrastive_cuda"
echo "== contrastive CUDA path emulated on the CPU ($(basename "$cu"), ${EMU_FMAD_NOTE}) vs the CPU kernels"
"$build/emulate_contrastive_cuda" "$@"
