#!/usr/bin/env bash
# Emulate the CIF CUDA kernels (csrc/cif/cif_cuda.cu) on the CPU and compare them with
# the CPU kernels (see emulate_cif_cuda.cpp; the emulation: tests/native/cuda_emulation).
# Needs g++ >= 12 and python3.
#   bash tests/native/cif_cuda_emulation/run.sh [build-dir] [-- case-id ...]
# Environment:
#   CIF_CUDA_SOURCE  the .cu to emulate (default csrc/cif/cif_cuda.cu); point it at a
#                    modified copy to check that a planted bug makes the test fail
#   EMU_FMAD=0       compile the .cu without FMA contraction (nvcc --fmad=false); by
#                    default it is compiled with contraction on, as nvcc does by default
#                    (--fmad=true), where the host CPU has FMA
#   CIFOPS_EMU_SEED  the seed of the emulated threads' scheduling order
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build="$root/build-native/cif_cuda_emulation"
if [[ $# -gt 0 && "$1" != "--" ]]; then build="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
src="${CIF_CUDA_SOURCE:-$root/csrc/cif/cif_cuda.cu}"
mkdir -p "$build"
source "$root/tests/native/cuda_emulation/emulate_cu.sh"
emu_rewrite_cu "$src" "$build/cif_cuda_emu.cpp"
flags=(-std=c++20 "${EMU_INCLUDES[@]}" -I"$root/csrc" -I"$root/csrc/cif")
# The three translation units in parallel. The CPU reference without contraction, as in
# the extension (x86-64 without -march has no FMA; setup.py passes -ffp-contract=off).
g++ "${flags[@]}" "${EMU_CU_FLAGS[@]}" -c "$build/cif_cuda_emu.cpp" -o "$build/cif_cuda_emu.o" & p1=$!
g++ "${flags[@]}" -Wall -O2 -ffp-contract=off -c "$root/csrc/cif/cif_cpu.cpp" -o "$build/cif_cpu.o" & p2=$!
g++ "${flags[@]}" -Wall -O0 -c "$here/emulate_cif_cuda.cpp" -o "$build/emulate.o" & p3=$!
ok=1
for p in $p1 $p2 $p3; do wait "$p" || ok=0; done
[[ $ok == 1 ]] || { echo "compilation failed" >&2; exit 2; }
g++ "${EMU_LINK_FLAGS[@]}" "$build/emulate.o" "$build/cif_cuda_emu.o" "$build/cif_cpu.o" -o "$build/emulate_cif_cuda"
echo "== CIF CUDA kernels emulated on the CPU ($(basename "$src"), ${EMU_FMAD_NOTE}) vs the CPU kernels"
"$build/emulate_cif_cuda" "$@"
