// Stand-in for the CUDA header <math_constants.h> when a .cu file is compiled as C++ for the CPU
// emulation of its kernels: the emulation provides what the kernels use.
#pragma once
#include "../emu_cuda.h"
