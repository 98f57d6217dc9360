# Sourced by the CUDA emulation tests (tests/native/*_cuda_emulation/run.sh): how a .cu
# file becomes C++ that runs on the CPU under emu_cuda.h. Defines
#   emu_rewrite_cu SRC OUT LAUNCHES
#       write SRC (a .cu) to OUT as C++: its `kernel<T><<<grid, block, shmem, stream>>>(`
#       launches (exactly LAUNCHES of them) become emu_launch(...), its grid cap
#       `constexpr int64_t kMaxBlocks = X;` an EmuGridCap (g_emu_grid_cap), and a #line
#       directive keeps messages and warnings pointing into SRC. The CUDA headers it and
#       csrc/common/cuda_common.cuh include resolve to the stand-ins in include/.
#   EMU_INCLUDES    the include flags of every translation unit that uses the emulation
#   EMU_CU_FLAGS    the compile flags of the .cu's translation unit: -O2 with FMA
#                   contraction on, as nvcc compiles (--fmad=true) where the host CPU
#                   has FMA (EMU_FMAD=0: off, like nvcc --fmad=false), plus UBSan's
#                   checks of misaligned accesses (16-byte packs) and of indices past an
#                   array (__shared__ ones included)
#   EMU_LINK_FLAGS  the link flags (UBSan's runtime)
#   EMU_FMAD_NOTE   a words-long description of the contraction setting
# Needs g++ >= 12 (C++20 <source_location>) and python3 ($PYTHON).
emu_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

emu_rewrite_cu() {
  "${PYTHON:-python3}" - "$1" "$2" "$3" <<'PY'
import re, sys
path, out, launches = sys.argv[1], sys.argv[2], int(sys.argv[3])
src = open(path).read()
src, n = re.subn(r"([\w:]+<[\w\s,]+>)<<<(.*?)>>>\(",
                 lambda m: "emu_launch(EMU_CFG(" + m.group(2) + "), " + m.group(1) + ", ",
                 src, flags=re.S)
assert n == launches, f"{path}: expected {launches} kernel launches, found {n}"
src, n = re.subn(r"constexpr int64_t kMaxBlocks = ([^;]+);",
                 r"constexpr EmuGridCap kMaxBlocks{\1};", src)
assert n == 1, f"{path}: expected the grid cap 'constexpr int64_t kMaxBlocks = ...;'"
open(out, "w").write('#include "emu_cuda.h"\n#line 1 "' + path + '"\n' + src)
PY
}

EMU_INCLUDES=(-I"$emu_dir/include" -I"$emu_dir")
EMU_FMAD_NOTE="-ffp-contract=off"
emu_fmad=(-ffp-contract=off)
if [[ "${EMU_FMAD:-1}" != 0 ]]; then
  if [[ "$(uname -m)" == aarch64 ]]; then
    emu_fmad=(-ffp-contract=fast)
  elif grep -qw fma /proc/cpuinfo 2>/dev/null; then
    emu_fmad=(-mfma -ffp-contract=fast)
  else
    echo "note: this CPU has no FMA; the .cu is compiled without contraction (unlike nvcc)" >&2
  fi
  EMU_FMAD_NOTE="${emu_fmad[*]}"
fi
EMU_LINK_FLAGS=(-fsanitize=alignment,bounds,null -fno-sanitize-recover=all)
EMU_CU_FLAGS=(-O2 "${emu_fmad[@]}" "${EMU_LINK_FLAGS[@]}")
