// Qualifiers shared by steplaw's kernels (the one host/device macro of the tree). Kept
// free of torch headers so that a translation unit compiled for a specific instruction
// set can include it.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STEPLAW_HOST_DEVICE __host__ __device__
#define STEPLAW_FORCE_INLINE __forceinline__
#else
#define STEPLAW_HOST_DEVICE
#define STEPLAW_FORCE_INLINE inline __attribute__((always_inline))
#endif
