# Sourced by the CUDA emulation tests (tests/native/*_cuda_emulation/run.sh): how a .cu
# file becomes C++ that runs on the CPU under emu_cuda.h. Defines
#   emu_rewrite_cu SRC OUT
#       write SRC (a .cu) to OUT as C++ that includes emu_cuda.h first: its launches,
#       CIFOPS_LAUNCH(grid, block, shmem, stream, kernel<T>)(args) (csrc/common/types.h),
#       then run on the CPU (emu_cuda.h defines the macro; a launch written as <<<...>>>
#       is refused); its grid cap `constexpr int64_t kMaxBlocks = X;` becomes an
#       EmuGridCap (g_emu_grid_cap), and a #line directive keeps messages and warnings
#       pointing into SRC. The CUDA headers it and csrc/common/cuda_common.cuh include
#       resolve to the stand-ins in include/.
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
  "${PYTHON:-python3}" - "$1" "$2" <<'PY'
import re, sys
path, out = sys.argv[1], sys.argv[2]
src = open(path).read()
assert "<<<" not in src, f"{path}: launch kernels with CIFOPS_LAUNCH, not <<<...>>>"
assert "CIFOPS_LAUNCH(" in src, f"{path}: no CIFOPS_LAUNCH kernel launch found"
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
