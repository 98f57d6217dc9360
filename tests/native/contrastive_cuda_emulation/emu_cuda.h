// Minimal CPU emulation of the CUDA features contrastive_cuda.cu uses: one block at a
// time, one std::thread per CUDA thread, __syncthreads and warp shuffles via barriers.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

struct dim3 { unsigned x, y, z; dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {} };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
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
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16(float f) { uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return __nv_bfloat16{uint16_t(u >> 16)}; }

inline std::unique_ptr<std::barrier<>> g_block_barrier;
inline std::unique_ptr<std::barrier<>> g_warp_barrier[64];
inline uint64_t g_warp_slots[64][32];
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  std::memcpy(&g_warp_slots[w][l], &v, sizeof(T));
  g_warp_barrier[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &g_warp_slots[w][l ^ offset], sizeof(T));
  g_warp_barrier[w]->arrive_and_wait();
  return r;
}
inline bool __shfl_xor_sync(unsigned m, bool v, int o) { return __shfl_xor_sync<int>(m, v, o) != 0; }

#define EMU_CFG(g, b, ...) dim3(g), dim3(b)
template <typename K, typename... Args>
void emu_launch(dim3 grid, dim3 block, K kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_block_barrier = std::make_unique<std::barrier<>>(block.x);
      for (unsigned w = 0; w < (block.x + 31) / 32; ++w) g_warp_barrier[w] = std::make_unique<std::barrier<>>(32);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([=] { threadIdx = dim3(t); blockIdx = dim3(bx, by); kernel(args...); });
      for (auto& th : threads) th.join();
    }
}
