// CPU emulation of the CUDA features the kernels of cifops use (csrc/*/*_cuda.cu and
// csrc/common/cuda_common.cuh), so that the real .cu sources compile as C++ and run on
// the CPU. Used by every emulation test (tests/native/*_cuda_emulation; emulate_cu.sh
// builds them):
//   - every CUDA thread is a fiber (its own stack, switched by a few instructions of
//     assembly on x86-64, by ucontext elsewhere), all on one OS thread; one block runs
//     at a time, its static __shared__ variables shared by its fibers;
//   - a fiber runs until it reaches a barrier (__syncthreads, or the exchange of a warp
//     shuffle or ballot); the scheduler then runs the other ready fibers, in a random
//     order that changes every round (seeded by CIFOPS_EMU_SEED, fixed by default: runs
//     are reproducible), so the result may not depend on which thread gets ahead;
//   - optionally one warp is held back (g_emu_slow_warp): its threads run only when
//     every other thread of the block waits at a __syncthreads or has exited, so that a
//     race between warps on shared memory (a missing barrier) shows up as a wrong or
//     run-to-run different result instead of passing by luck;
//   - every barrier checks that all threads of its group (the block, or the 32 lanes of
//     a warp) arrive at the same call site (source line), that none has exited the
//     kernel meanwhile, and that warp collectives use the full mask of a complete warp;
//     a block whose fibers all wait without a barrier opening is a deadlock. Each stops
//     the program with a message instead of hanging or mixing values;
//   - __shfl_sync / __shfl_xor_sync / __shfl_up_sync on any trivially copyable type up
//     to 8 bytes, __ballot_sync, __ffs;
//   - __half / __nv_bfloat16 as storage types with round-to-nearest-even conversions;
//   - __dadd_rn / __dmul_rn / __ddiv_rn (and the float ones) round each operation on its
//     own: never fused with a neighbouring multiply or add, even when the .cu is built
//     with contraction on (emulate_cu.sh builds it so, like nvcc's default --fmad=true);
//   - the grid cap of grid-stride kernels adjustable at run time (g_emu_grid_cap).
// The header may be included by several translation units of one program (the kernels'
// and the test driver's): the runtime is one set of inline variables, the context
// switch routine a weak symbol.
#pragma once
#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <source_location>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__) || defined(EMU_CUDA_UCONTEXT)
#define EMU_CUDA_USE_UCONTEXT 1
#include <ucontext.h>
#else
#define EMU_CUDA_USE_UCONTEXT 0
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// One OS thread runs every fiber: the scheduler sets threadIdx before it resumes one.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

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

// ---- half types (storage only: the kernels do their arithmetic in float) ---------------
struct __half {
  _Float16 v;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half(float f) { return __half{static_cast<_Float16>(f)}; }  // RNE
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, NaN kept
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

// ---- correctly rounded arithmetic intrinsics ----------------------------------------------
// The empty asm makes the result opaque, which keeps the compiler from fusing it into
// an FMA with its neighbour (as the _rn intrinsics promise on the GPU, where nvcc
// contracts plain a * b + c by default).
#if defined(__x86_64__) || defined(__i386__)
#define EMU_OPAQUE(r) asm volatile("" : "+x"(r))
#elif defined(__aarch64__)
#define EMU_OPAQUE(r) asm volatile("" : "+w"(r))
#else
#define EMU_OPAQUE(r)        \
  do {                       \
    volatile auto emu_v = r; \
    r = emu_v;               \
  } while (0)
#endif
#define EMU_ROUNDED(name, type, op)  \
  inline type name(type a, type b) { \
    type r = a op b;                 \
    EMU_OPAQUE(r);                   \
    return r;                        \
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

// ---- test knobs --------------------------------------------------------------------------
// When >= 0, the threads of this warp run only while no other thread of the block is
// ready: they start the kernel, and leave every __syncthreads, once all the others wait
// at the next __syncthreads or have exited.
inline int g_emu_slow_warp = -1;

// The grid cap of a .cu (`constexpr int64_t kMaxBlocks = ...;`), rewritten by
// emulate_cu.sh into an EmuGridCap that reads g_emu_grid_cap when it is > 0: a small cap
// makes the kernels' grid-stride loops run, and a case cheaper.
inline int64_t g_emu_grid_cap = 0;
struct EmuGridCap {
  int64_t on_gpu;
  operator int64_t() const { return g_emu_grid_cap > 0 ? g_emu_grid_cap : on_gpu; }
};

// ---- fibers --------------------------------------------------------------------------
namespace emu {

struct Fiber;
struct Barrier;

#if !EMU_CUDA_USE_UCONTEXT
// emu_switch(&save, load): push the callee-saved registers, store the stack pointer in
// *save, load `load` as the stack pointer, pop and return into the other context. A new
// fiber's stack is laid out as if it had switched out just before emu_trampoline, which
// calls emu_fiber_main(fiber) with the fiber in r12. Weak symbols: every translation
// unit that includes this header defines them, the linker keeps one.
extern "C" void emu_switch(void** save_sp, void* load_sp);
extern "C" void emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .weak emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .p2align 4
  .weak emu_trampoline
  .type emu_trampoline, @function
emu_trampoline:
  movq %r12, %rdi
  call emu_fiber_main
  ud2
  .size emu_trampoline, .-emu_trampoline
)");
#endif

constexpr size_t kStackBytes = 64 * 1024;
constexpr uint64_t kStackCanary = 0x5ca1ab1e0ddba11ull;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;

struct Fiber {
  unsigned tid = 0;
  enum State { kReady, kBlocked, kDone } state = kReady;
  Barrier* waiting = nullptr;
  char* stack = nullptr;  // kStackBytes, the lowest 8 bytes a canary
#if EMU_CUDA_USE_UCONTEXT
  ucontext_t ctx;
#else
  void* sp = nullptr;
#endif
};

// A barrier over a group of fibers (a block or a warp) that knows the call site of its
// current phase, how many phases have completed, and how many of its fibers have exited.
struct Barrier {
  unsigned expected = 0, arrived = 0, exited = 0;
  uint64_t phase = 0;
  unsigned site_line = 0;
  const char* site_what = "";
  std::vector<unsigned> waiters;
};

// The scheduling order's seed: CIFOPS_EMU_SEED, default fixed (runs are reproducible).
inline uint64_t seed() {
  const char* env = std::getenv("CIFOPS_EMU_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 0x5eed;
}

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<unsigned> ready, next_ready;
  Barrier block;
  Barrier warps[kMaxWarps];
  uint64_t slots[2][kMaxWarps][32];  // a warp exchange's values, by the phase's parity
  unsigned current = 0;
  std::function<void()> body;
  std::mt19937_64 rng{seed()};
  uint64_t launches = 0, blocks = 0, switches = 0;
#if EMU_CUDA_USE_UCONTEXT
  ucontext_t sched;
#else
  void* sched_sp = nullptr;
#endif
};
inline Runtime rt;

inline void suspend() {  // back to the scheduler; it sets threadIdx when it resumes us
  Fiber& f = rt.fibers[rt.current];
  ++rt.switches;
  asm volatile("" ::: "memory");
#if EMU_CUDA_USE_UCONTEXT
  swapcontext(&f.ctx, &rt.sched);
#else
  emu_switch(&f.sp, rt.sched_sp);
#endif
  asm volatile("" ::: "memory");
}

// Arrive at `b` from call site `line` and wait for the whole group. Returns the number
// of the phase that this arrival completed.
inline uint64_t arrive_and_wait(Barrier& b, unsigned line, const char* what) {
  if (b.exited > 0)
    emu_fail("%s at line %u while %u thread(s) of the group have exited the kernel", what, line,
             b.exited);
  if (b.arrived == 0) {
    b.site_line = line;
    b.site_what = what;
  } else if (b.site_line != line || std::strcmp(b.site_what, what) != 0) {
    emu_fail("divergent barrier: %s at line %u meets %s at line %u", what, line, b.site_what,
             b.site_line);
  }
  const uint64_t phase = b.phase;
  Fiber& f = rt.fibers[rt.current];
  b.waiters.push_back(rt.current);
  f.waiting = &b;
  if (++b.arrived == b.expected) {  // the barrier opens: everyone is ready next round
    for (unsigned w : b.waiters) {
      rt.fibers[w].state = Fiber::kReady;
      rt.fibers[w].waiting = nullptr;
      rt.next_ready.push_back(w);
    }
    b.waiters.clear();
    b.arrived = 0;
    ++b.phase;
  } else {
    f.state = Fiber::kBlocked;
  }
  suspend();
  return phase;
}

inline void fiber_exit(Fiber& f) {
  f.state = Fiber::kDone;
  Barrier* groups[2] = {&rt.block, &rt.warps[f.tid / 32]};
  for (Barrier* b : groups) {
    if (b->arrived > 0)
      emu_fail("a thread exits the kernel while %u thread(s) wait at %s (line %u)", b->arrived,
               b->site_what, b->site_line);
    ++b->exited;
  }
}

}  // namespace emu

extern "C" [[noreturn]] __attribute__((used)) inline void emu_fiber_main(emu::Fiber* f) {
  emu::rt.body();
  emu::fiber_exit(*f);
  emu::suspend();
  emu_fail("a finished fiber was resumed");
}

namespace emu {

#if EMU_CUDA_USE_UCONTEXT
inline void ucontext_entry() { emu_fiber_main(&rt.fibers[rt.current]); }
#endif

inline void start_fiber(Fiber& f) {
  char* base = f.stack;
#if EMU_CUDA_USE_UCONTEXT
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = base;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, ucontext_entry, 0);
#else
  // [r15 r14 r13 r12 rbx rbp ret] below a 16-byte aligned top: after the pops and the
  // return, rsp is 16-byte aligned again, as emu_trampoline's call needs.
  const uintptr_t top = (reinterpret_cast<uintptr_t>(base) + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 72);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[3] = &f;
  sp[6] = reinterpret_cast<void*>(&emu_trampoline);
  f.sp = sp;
#endif
}

inline void resume(unsigned id) {
  rt.current = id;
  threadIdx = dim3(rt.fibers[id].tid);
  asm volatile("" ::: "memory");
#if EMU_CUDA_USE_UCONTEXT
  swapcontext(&rt.sched, &rt.fibers[id].ctx);
#else
  emu_switch(&rt.sched_sp, rt.fibers[id].sp);
#endif
  asm volatile("" ::: "memory");
}

// Run the current block (blockIdx set) with n threads to completion.
inline void run_block(unsigned n) {
  if (rt.stacks.size() < n) {
    rt.fibers.resize(n);
    while (rt.stacks.size() < n) {
      rt.stacks.emplace_back(new char[kStackBytes]);
      std::memcpy(rt.stacks.back().get(), &kStackCanary, sizeof(kStackCanary));
    }
  }
  rt.block = Barrier{};
  rt.block.expected = n;
  for (unsigned w = 0; w < (n + 31) / 32; ++w) {
    rt.warps[w] = Barrier{};
    rt.warps[w].expected = std::min(32u, n - 32 * w);
  }
  rt.ready.clear();
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = rt.fibers[t];
    f.tid = t;
    f.state = Fiber::kReady;
    f.waiting = nullptr;
    f.stack = rt.stacks[t].get();
    start_fiber(f);
    rt.ready.push_back(t);
  }
  const int slow = g_emu_slow_warp;
  auto is_slow = [&](unsigned id) { return static_cast<int>(rt.fibers[id].tid / 32) == slow; };
  while (!rt.ready.empty()) {
    std::shuffle(rt.ready.begin(), rt.ready.end(), rt.rng);
    rt.next_ready.clear();
    // the slow warp waits while any other thread can run
    const bool hold = slow >= 0 && !std::all_of(rt.ready.begin(), rt.ready.end(), is_slow);
    for (unsigned id : rt.ready) {
      if (hold && is_slow(id))
        rt.next_ready.push_back(id);
      else
        resume(id);
    }
    std::swap(rt.ready, rt.next_ready);
  }
  for (unsigned t = 0; t < n; ++t) {
    const Fiber& f = rt.fibers[t];
    if (f.state != Fiber::kDone) {
      threadIdx = dim3(t);
      emu_fail("deadlock: the thread waits at %s (line %u) for %u more thread(s)",
               f.waiting ? f.waiting->site_what : "?", f.waiting ? f.waiting->site_line : 0,
               f.waiting ? f.waiting->expected - f.waiting->arrived : 0);
    }
    if (std::memcmp(f.stack, &kStackCanary, sizeof(kStackCanary)) != 0)
      emu_fail("fiber stack overflow (%zu bytes)", kStackBytes);
  }
}

// Every lane of the calling thread's warp deposits 8 bytes and waits for the others;
// returns the 32 deposits. They stay valid until the warp's next exchange but one,
// which no lane can reach before every lane has read these.
inline const uint64_t* warp_exchange(unsigned mask, uint64_t bits, const char* what,
                                     const std::source_location& loc) {
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  Barrier& bar = rt.warps[w];
  if (mask != 0xffffffffu)
    emu_fail("%s at line %u with mask %08x: only full warps are emulated", what, loc.line(), mask);
  if (bar.expected != 32)
    emu_fail("%s at line %u with a full mask in a partial warp", what, loc.line());
  rt.slots[bar.phase & 1][w][l] = bits;
  const uint64_t phase = arrive_and_wait(bar, loc.line(), what);
  return rt.slots[phase & 1][w];
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move <= 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace emu

// ---- CUDA intrinsics ---------------------------------------------------------------------
inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  emu::arrive_and_wait(emu::rt.block, loc.line(), "__syncthreads");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask,
                  const std::source_location loc = std::source_location::current()) {
  const unsigned l = threadIdx.x % 32;
  if (lane_mask < 0 || lane_mask > 31) emu_fail("__shfl_xor_sync lane mask %d", lane_mask);
  const uint64_t* s = emu::warp_exchange(mask, emu::to_bits(v), "__shfl_xor_sync", loc);
  return emu::from_bits<T>(s[l ^ static_cast<unsigned>(lane_mask)]);
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane,
              const std::source_location loc = std::source_location::current()) {
  if (src_lane < 0 || src_lane > 31) emu_fail("__shfl_sync source lane %d", src_lane);
  const uint64_t* s = emu::warp_exchange(mask, emu::to_bits(v), "__shfl_sync", loc);
  return emu::from_bits<T>(s[src_lane]);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta,
                 const std::source_location loc = std::source_location::current()) {
  const unsigned l = threadIdx.x % 32;
  if (delta > 31) emu_fail("__shfl_up_sync delta %u", delta);
  const uint64_t* s = emu::warp_exchange(mask, emu::to_bits(v), "__shfl_up_sync", loc);
  return l >= delta ? emu::from_bits<T>(s[l - delta]) : v;  // the low lanes keep v
}

inline unsigned __ballot_sync(unsigned mask, int pred,
                              const std::source_location loc = std::source_location::current()) {
  const uint64_t* s = emu::warp_exchange(mask, pred != 0 ? 1 : 0, "__ballot_sync", loc);
  unsigned r = 0;
  for (unsigned i = 0; i < 32; ++i) r |= static_cast<unsigned>(s[i] & 1) << i;
  return r;
}

// ---- launches ------------------------------------------------------------------------------
// The kernels launch with CIFOPS_LAUNCH(grid, block, shmem, stream, kernel<T>)(args)
// (csrc/common/types.h), defined here as emu_launcher(grid, block, kernel<T>)(args), which
// calls emu_launch(grid, block, kernel<T>, args...).
template <typename K, typename... Args>
void emu_launch(dim3 grid, dim3 block, K kernel, Args... args) {
  const unsigned n = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || n == 0 || n > emu::kMaxThreads)
    emu_fail("unsupported block shape %u x %u x %u", block.x, block.y, block.z);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) emu_fail("empty grid");
  gridDim = grid;
  blockDim = block;
  ++emu::rt.launches;
  emu::rt.body = [&] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        emu::run_block(n);
        ++emu::rt.blocks;
      }
  emu::rt.body = nullptr;
}

template <typename K>
struct EmuLauncher {
  dim3 grid, block;
  K kernel;
  template <typename... Args>
  void operator()(Args... args) const {
    emu_launch(grid, block, kernel, args...);
  }
};
template <typename K>
EmuLauncher<K> emu_launcher(dim3 grid, dim3 block, K kernel) {
  return {grid, block, kernel};
}
#undef CIFOPS_LAUNCH
#define CIFOPS_LAUNCH(grid, block, shmem, stream, ...) \
  emu_launcher(dim3(grid), dim3(block), __VA_ARGS__)
