#!/usr/bin/env bash
# Emulate the CIF CUDA kernels (csrc/cif/cif_cuda.cu) on the CPU and compare them with
# the CPU kernels (see emulate_cif_cuda.cpp). Needs g++ >= 12 and python3.
#   bash tests/native/cif_cuda_emulation/run.sh [build-dir] [-- case-id ...]
# Environment:
#   CIF_CUDA_SOURCE  the .cu to emulate (default csrc/cif/cif_cuda.cu); point it at a
#                    modified copy to check that a planted bug makes the test fail
#   EMU_FMAD=0       compile the .cu without FMA contraction (nvcc --fmad=false); by
#                    default it is compiled with contraction on, as nvcc does by default
#                    (--fmad=true), where the host CPU has FMA
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
build="$root/build-native/cif_cuda_emulation"
if [[ $# -gt 0 && "$1" != "--" ]]; then build="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
src="${CIF_CUDA_SOURCE:-$root/csrc/cif/cif_cuda.cu}"
mkdir -p "$build"
# The .cu as C++ (its CUDA headers, and those of common/cuda_common.cuh, are the
# emulation's stand-ins in tests/native/cuda_emulation/include): launches by
# emu_launch(), and the row kernels' grid cap made adjustable per case.
"${PYTHON:-python3}" - "$src" "$build/cif_cuda_emu.cpp" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
src, n = re.subn(r"([\w:]+<[\w, ]+>)<<<(.*?)>>>\(",
                 lambda m: "emu_launch(EMU_CFG(" + m.group(2) + "), " + m.group(1) + ", ", src,
                 flags=re.S)
assert n == 6, f"expected 6 kernel launches, found {n}"
src, n = re.subn(r"constexpr int64_t kMaxBlocks = ([^;]+);",
                 r"constexpr EmuGridCap kMaxBlocks{\1};", src)
assert n == 1, "kMaxBlocks not found"
# (line numbers kept: messages and warnings point into the .cu)
open(sys.argv[2], "w").write('#include "emu_cuda.h"\n#line 1 "' + sys.argv[1] + '"\n' + src)
PY
fmad="-ffp-contract=off"
if [[ "${EMU_FMAD:-1}" != 0 ]]; then
  if grep -qw fma /proc/cpuinfo 2>/dev/null; then
    fmad="-mfma -ffp-contract=fast"
  else
    echo "note: this CPU has no FMA; the .cu is compiled without contraction (unlike nvcc)"
  fi
fi
flags=(-std=c++20 -pthread -I"$root/tests/native/cuda_emulation/include" -I"$root/csrc"
       -I"$root/csrc/cif" -I"$here")
# The three translation units in parallel. The .cu: -O1 (its speed hardly matters: the
# emulation's cost is thread switches) plus -fexpensive-optimizations, which holds the
# pass that contracts a * b + c into an FMA, and UBSan's checks of misaligned 16-byte
# packs and of indices past a __shared__ array. The CPU reference without contraction,
# as in the extension (x86-64 without -march has no FMA; setup.py passes
# -ffp-contract=off).
ubsan=(-fsanitize=alignment,bounds,null -fno-sanitize-recover=all)
g++ "${flags[@]}" -O1 -fexpensive-optimizations $fmad "${ubsan[@]}" \
    -c "$build/cif_cuda_emu.cpp" -o "$build/cif_cuda_emu.o" & p1=$!
g++ "${flags[@]}" -Wall -O2 -ffp-contract=off -c "$root/csrc/cif/cif_cpu.cpp" -o "$build/cif_cpu.o" & p2=$!
g++ "${flags[@]}" -Wall -O0 -c "$here/emulate_cif_cuda.cpp" -o "$build/emulate.o" & p3=$!
ok=1
for p in $p1 $p2 $p3; do wait "$p" || ok=0; done
[[ $ok == 1 ]] || { echo "compilation failed" >&2; exit 2; }
g++ -pthread "${ubsan[@]}" "$build/emulate.o" "$build/cif_cuda_emu.o" "$build/cif_cpu.o" -o "$build/emulate_cif_cuda"
echo "== CIF CUDA kernels emulated on the CPU ($(basename "$src"), ${fmad}) vs the CPU kernels"
"$build/emulate_cif_cuda" "$@"
