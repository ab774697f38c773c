// Stand-in of c10/cuda/CUDAException.h for the CUDA emulation: a launch raises its own
// errors; the check marks it checked (the emulation refuses a launch after an unchecked one).
#pragma once

#include "emu/cuda_emu.h"

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::launch_check()
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA error (emulated) in ", #expr)
