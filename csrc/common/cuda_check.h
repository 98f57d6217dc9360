// Error check of the CUDA bindings (csrc/<op>/<op>_cuda_op.cpp) around the launchers of
// the torch-free kernel files, which return a cudaError_t as an int: a failure raises
// c10::Error with CUDA's message, where the launch was.
#pragma once

#include <c10/cuda/CUDAException.h>

#define CIFOPS_CUDA_CHECK(expr) C10_CUDA_CHECK(static_cast<cudaError_t>(expr))
