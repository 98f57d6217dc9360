// Minimal CPU emulation of the CUDA features csrc/cif/cif_cuda.cu uses, so that the
// real .cu source compiles as C++ and runs on the CPU (extended from
// tests/native/contrastive_cuda_emulation/emu_cuda.h):
//   - one std::thread per CUDA thread, one block at a time (the block's threads are
//     created once per launch and walk the grid block by block, joined between blocks);
//   - __syncthreads through a block barrier; __shfl_xor_sync / __shfl_up_sync /
//     __ballot_sync through a per-warp barrier and per-lane slots (any type up to 8 bytes);
//   - optionally one warp is held back at the start and after every __syncthreads
//     until all others wait at the next one (g_emu_slow_warp), so that races between
//     warps on shared memory show up;
//   - every barrier checks that all threads of the group arrive at the same call site
//     (source line), that none has exited the kernel meanwhile (a barrier after an early
//     return), and that warp collectives use the full mask of a complete warp: such
//     errors stop the program with a message instead of hanging or mixing values;
//   - __dadd_rn / __dmul_rn / __ddiv_rn (and the float ones) round each operation on
//     its own: never fused with a neighbouring multiply or add, even when the file is
//     built with contraction on (run.sh builds it so, like nvcc's default --fmad=true).
#pragma once
#include <atomic>
#include <barrier>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <source_location>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
#define CUDART_INF_F std::numeric_limits<float>::infinity()
#define CUDART_NAN_F std::numeric_limits<float>::quiet_NaN()
#define CUDART_INF std::numeric_limits<double>::infinity()
#define CUDART_NAN std::numeric_limits<double>::quiet_NaN()

struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

// Correctly rounded arithmetic intrinsics: the asm barrier keeps the compiler from
// fusing a result into an FMA with its neighbour (as the _rn intrinsics promise on the
// GPU, where nvcc contracts plain a * b + c by default).
#define EMU_ROUNDED(name, type, op)             \
  inline type name(type a, type b) {            \
    type r = a op b;                            \
    asm volatile("" : "+x"(r));                 \
    return r;                                   \
  }
EMU_ROUNDED(__dadd_rn, double, +)
EMU_ROUNDED(__dsub_rn, double, -)
EMU_ROUNDED(__dmul_rn, double, *)
EMU_ROUNDED(__ddiv_rn, double, /)
EMU_ROUNDED(__fadd_rn, float, +)
EMU_ROUNDED(__fsub_rn, float, -)
EMU_ROUNDED(__fmul_rn, float, *)
EMU_ROUNDED(__fdiv_rn, float, /)
#undef EMU_ROUNDED
inline int __ffs(int x) { return __builtin_ffs(x); }

[[noreturn]] inline void emu_fail(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "CUDA EMULATION ERROR (block %u, thread %u): ", blockIdx.x, threadIdx.x);
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::_Exit(3);
}

// A barrier over a group of threads (a block or a warp) that checks that every member
// arrives from the same call site, and that none has left the kernel (which would
// deadlock the group on a GPU, or read stale values).
class EmuBarrier {
 public:
  void reset(int n) {
    n_ = n;
    arrived_.store(0);
    exited_.store(0);
  }
  int size() const { return n_; }
  // Arrive as member `idx` and wait for the whole group. `deposit(parity)` runs before
  // arriving (to write this member's slot of the phase); returns the phase number.
  template <typename F>
  uint32_t arrive(int idx, const std::source_location& loc, const char* what, F&& deposit) {
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    deposit(phase & 1);
    site_line_[idx] = loc.line();
    site_what_[idx] = what;
    const int arrived = arrived_.fetch_add(1) + 1;
    events_.fetch_add(1);
    events_.notify_all();
    if (arrived == n_) {  // the last one: check the sites, release all
      for (int i = 0; i < n_; ++i)
        if (site_line_[i] != site_line_[idx] || site_what_[i] != site_what_[idx])
          emu_fail("divergent barrier: member %d is at %s (line %u), member %d at %s (line %u)",
                   i, site_what_[i], site_line_[i], idx, what, loc.line());
      arrived_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
      phase_.notify_all();
      return phase;
    }
    // (a member that has exited can never arrive: unless the phase is already complete,
    // the group is stuck)
    if (exited_.load() > 0 && phase_.load() == phase)
      emu_fail("%s at line %u while %d member(s) of the group have exited the kernel", what,
               loc.line(), exited_.load());
    phase_.wait(phase, std::memory_order_acquire);
    while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase);
    return phase;
  }
  // Whether every member outside a group of `skip` has arrived at the next phase or
  // exited: all the others have run as far as they can without the skipped ones.
  bool others_parked(int skip) const { return arrived_.load() + exited_.load() >= n_ - skip; }
  // Block until others_parked(skip) (woken by every arrival and exit, no polling).
  void wait_others_parked(int skip) {
    for (;;) {
      const uint32_t seen = events_.load();
      if (others_parked(skip)) return;
      events_.wait(seen);
    }
  }
  void exit() {
    exited_.fetch_add(1);
    events_.fetch_add(1);
    events_.notify_all();
    if (const int waiting = arrived_.load(); waiting > 0)
      emu_fail("a thread exits the kernel while %d member(s) of its group wait at a barrier",
               waiting);
  }

 private:
  int n_ = 0;
  std::atomic<int> arrived_{0}, exited_{0};
  std::atomic<uint32_t> phase_{0}, events_{0};
  unsigned site_line_[1024];
  const char* site_what_[1024];
};

constexpr int kEmuMaxWarps = 32;  // 1024 threads
struct EmuWarp {
  EmuBarrier bar;
  uint64_t slot[2][32];  // double-buffered by phase parity
};
inline EmuBarrier g_emu_block;
inline EmuWarp g_emu_warps[kEmuMaxWarps];

// Timing skew: when >= 0, the threads of this warp start the kernel, and leave every
// __syncthreads, only once all the other threads of the block wait at the next
// __syncthreads or have exited. A shared-memory race between warps (a missing barrier)
// then turns into a wrong or run-to-run different result instead of passing by luck.
inline int g_emu_slow_warp = -1;

inline void emu_hold_slow_warp() {
  if (static_cast<int>(threadIdx.x / 32) != g_emu_slow_warp) return;
  g_emu_block.wait_others_parked(32);
}

inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  g_emu_block.arrive(threadIdx.x, loc, "__syncthreads", [](uint32_t) {});
  emu_hold_slow_warp();
}

// Every lane deposits 8 bytes; returns the phase's slots (valid until the group's next
// phase but one, which no lane can reach before every lane has read these).
inline const uint64_t* emu_warp_exchange(unsigned mask, uint64_t bits, const char* what,
                                         const std::source_location& loc) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  EmuWarp& warp = g_emu_warps[w];
  if (mask != 0xffffffffu) emu_fail("%s at line %u with mask %08x: only full warps are emulated", what, loc.line(), mask);
  if (warp.bar.size() != 32) emu_fail("%s at line %u with a full mask in a partial warp", what, loc.line());
  const uint32_t phase = warp.bar.arrive(l, loc, what, [&](uint32_t p) { warp.slot[p][l] = bits; });
  return warp.slot[phase & 1];
}

template <typename T>
inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T emu_from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask,
                  const std::source_location loc = std::source_location::current()) {
  const int l = threadIdx.x % 32;
  if (lane_mask < 0 || lane_mask > 31) emu_fail("__shfl_xor_sync lane mask %d", lane_mask);
  const uint64_t* s = emu_warp_exchange(mask, emu_bits(v), "__shfl_xor_sync", loc);
  return emu_from_bits<T>(s[l ^ lane_mask]);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta,
                 const std::source_location loc = std::source_location::current()) {
  const int l = threadIdx.x % 32;
  if (delta > 31) emu_fail("__shfl_up_sync delta %u", delta);
  const uint64_t* s = emu_warp_exchange(mask, emu_bits(v), "__shfl_up_sync", loc);
  return l >= static_cast<int>(delta) ? emu_from_bits<T>(s[l - delta]) : v;  // low lanes keep v
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              const std::source_location loc = std::source_location::current()) {
  const uint64_t* s = emu_warp_exchange(mask, pred != 0 ? 1 : 0, "__ballot_sync", loc);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= static_cast<unsigned>(s[i] & 1) << i;
  return r;
}

// The row kernels' grid cap (kMaxBlocks), rewritten by run.sh to read this when it
// is > 0: a small cap makes the kernels' grid-stride loops run, and the case cheaper.
inline int64_t g_emu_grid_cap = 0;
struct EmuGridCap {
  int64_t on_gpu;
  operator int64_t() const { return g_emu_grid_cap > 0 ? g_emu_grid_cap : on_gpu; }
};

// Kernel launches: `kernel<T><<<grid, block, shmem, stream>>>(args)` is rewritten by
// run.sh into emu_launch(EMU_CFG(grid, block, shmem, stream), kernel<T>, args).
#define EMU_CFG(g, b, ...) dim3(g), dim3(b)
template <typename K, typename... Args>
void emu_launch(dim3 grid, dim3 block, K kernel, Args... args) {
  const unsigned n = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n == 0 || n > 32 * kEmuMaxWarps)
    emu_fail("unsupported block shape %u x %u x %u", block.x, block.y, block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) emu_fail("empty grid");
  gridDim = grid;
  blockDim = block;
  const unsigned warps = (n + 31) / 32;
  auto reset = [=] {
    g_emu_block.reset(n);
    for (unsigned w = 0; w < warps; ++w) g_emu_warps[w].bar.reset(w + 1 < warps ? 32 : n - 32 * w);
  };
  reset();
  // Between two blocks every thread has left the kernel; the completion step resets
  // the barriers before any thread starts the next block.
  std::barrier join(static_cast<std::ptrdiff_t>(n), [&]() noexcept { reset(); });
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t)
    threads.emplace_back([&, t] {
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            threadIdx = dim3(t);
            blockIdx = dim3(bx, by, bz);
            emu_hold_slow_warp();
            kernel(args...);
            g_emu_block.exit();
            g_emu_warps[t / 32].bar.exit();
            join.arrive_and_wait();
          }
    });
  for (auto& th : threads) th.join();
}
