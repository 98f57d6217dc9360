// Stand-in for the CUDA header <cuda_fp16.h> when a .cu file is compiled as C++ for the CPU
// emulation of its kernels: the emulation provides what the kernels use.
#pragma once
#include "../emu_cuda.h"
