#!/usr/bin/env bash
# Emulate the streaming CIF CUDA kernels (csrc/cif/cif_stream_cuda.cu) on the CPU and
# compare them with the CPU kernels (emulate_cif_stream_cuda.cpp; the emulation:
# tests/native/cuda_emulation). Needs g++ >= 12 and python3.
#   bash tests/native/cif_stream_cuda_emulation/run.sh [build-dir] [-- case-id ...]
# CIF_STREAM_CUDA_SOURCE: the .cu to emulate (default csrc/cif/cif_stream_cuda.cu).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build="$root/build-native/cif_stream_cuda_emulation"
if [[ $# -gt 0 && "$1" != "--" ]]; then build="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
src="${CIF_STREAM_CUDA_SOURCE:-$root/csrc/cif/cif_stream_cuda.cu}"
mkdir -p "$build"
source "$root/tests/native/cuda_emulation/emulate_cu.sh"
emu_rewrite_cu "$src" "$build/cif_stream_cuda_emu.cpp"
flags=(-std=c++20 "${EMU_INCLUDES[@]}" -I"$root/csrc" -I"$root/csrc/cif")
g++ "${flags[@]}" "${EMU_CU_FLAGS[@]}" -c "$build/cif_stream_cuda_emu.cpp" -o "$build/cuda_emu.o" & p1=$!
g++ "${flags[@]}" -Wall -O2 -ffp-contract=off -c "$root/csrc/cif/cif_stream_cpu.cpp" -o "$build/cpu.o" & p2=$!
g++ "${flags[@]}" -Wall -O0 -c "$here/emulate_cif_stream_cuda.cpp" -o "$build/emulate.o" & p3=$!
ok=1
for p in $p1 $p2 $p3; do wait "$p" || ok=0; done
[[ $ok == 1 ]] || { echo "compilation failed" >&2; exit 2; }
g++ "${EMU_LINK_FLAGS[@]}" "$build/emulate.o" "$build/cuda_emu.o" "$build/cpu.o" -o "$build/emulate_cif_stream_cuda"
echo "== streaming CIF CUDA kernels emulated on the CPU ($(basename "$src"), ${EMU_FMAD_NOTE}) vs the CPU kernels"
"$build/emulate_cif_stream_cuda" "$@"
