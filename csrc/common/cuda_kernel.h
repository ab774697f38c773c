// The three constructs of steplaw's CUDA sources that the host compiler cannot read,
// each behind one macro, so that the same *_cuda.cu files build with nvcc for the GPU and
// with the host compiler against the test-only CUDA emulation (tests/cuda_emu/emu/cuda_emu.h,
// STEPLAW_CUDA_EMU): one source of truth for kernels and their launch code.
//   STEPLAW_LAUNCH((grid, block, smem, stream), kernel)(args...)
//       kernel<<<grid, block, smem, stream>>>(args...)
//   STEPLAW_DYNAMIC_SHARED(type, name);   extern __shared__ type name[] (16-byte aligned)
//   STEPLAW_CUDA_LIBRARY_IMPL(m) { ... }  TORCH_LIBRARY_IMPL(steplaw, CUDA, m); the emulation
//                                          registers the same functions as the CPU kernels of
//                                          the namespace steplaw_cuda_emu instead.
#pragma once

#define STEPLAW_UNPACK_CONFIG(grid, block, smem, stream) grid, block, smem, stream

#if defined(STEPLAW_CUDA_EMU)
#ifndef STEPLAW_CUDA_EMU_HEADER
#error "the CUDA emulation build includes tests/cuda_emu/emu/cuda_emu.h first (-include)"
#endif
#define STEPLAW_LAUNCH(config, ...) ::emu::make_launcher(#__VA_ARGS__, &__VA_ARGS__, STEPLAW_UNPACK_CONFIG config)
#define STEPLAW_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::emu::dynamic_smem())
#define STEPLAW_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(steplaw_cuda_emu, CPU, m)
#else
#define STEPLAW_LAUNCH(config, ...) __VA_ARGS__<<<STEPLAW_UNPACK_CONFIG config>>>
#define STEPLAW_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define STEPLAW_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(steplaw, CUDA, m)
#endif
