// CUDA emulation for the CPU, test-only (never in the wheel, never on the GPU path): it
// lets the host compiler build csrc/**/*_cuda.cu unchanged and run its kernels and host
// launch code on CPU tensors (tests/cuda_emu, `make test-cuda-emu`).
//
// Model. A launch runs its blocks one at a time, in an order chosen at run time (forward,
// reverse, or a seeded shuffle). Each thread of a block is a fiber (ucontext) with its own
// stack; a fiber runs until it reaches a barrier or returns, so code between two barriers
// runs thread after thread in the chosen order (reshuffled after each barrier): code that
// relies on an order the hardware does not promise gives other results in other orders.
//   - __syncthreads is a real barrier; it is an error when the threads of a block wait at
//     different __syncthreads, or when some wait while others have returned.
//   - warp operations (shuffles, votes, __match_any_sync, __syncwarp) are barriers over the
//     lanes of their mask (32-lane warps); a mask naming a lane that returned, that does not
//     exist, or that waits elsewhere is an error.
//   - shared memory: one buffer per block for `extern __shared__` (STEPLAW_DYNAMIC_SHARED)
//     and the static `__shared__` variables (gathered in one ELF section); both are filled
//     with an order-dependent poison byte before each block, and two threads changing the
//     same shared byte between barriers (atomics excepted) is reported as a race.
//   - a device assert (CUDA_KERNEL_ASSERT) aborts the launch, which raises RuntimeError.
//   - launch checks of the runtime: empty or oversized grids/blocks, more than 48 KiB of
//     dynamic shared memory, a launch not followed by C10_CUDA_KERNEL_LAUNCH_CHECK.
// All launches are synchronous and serialised; atomics are plain read-modify-writes
// (one OS thread runs every fiber).
#pragma once
#define STEPLAW_CUDA_EMU_HEADER 1

// The torch headers the kernel sources include, before the macros below (threadIdx, ...)
// could clash with their identifiers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>

#ifndef STEPLAW_CUDA_EMU
#define STEPLAW_CUDA_EMU 1
#endif

// ---- types of the CUDA runtime ------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice,
                      cudaMemcpyDefault };

namespace emu {

// Where a barrier or warp operation was called (its source line), for the error messages.
struct Site {
  const char* file;
  int line;
};

// Run-time choice of block and thread order (set from the tests).
enum class Order { kForward = 0, kReverse = 1, kShuffle = 2 };
void set_order(Order order, uint64_t seed);

// The indices of the running fiber (set by the scheduler before it resumes a fiber).
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Launch: runs body() once per thread of a grid<<<grid, block, smem>>>; throws
// c10::Error (RuntimeError) on a launch error or a device assert.
void launch(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
void launch_check();  // C10_CUDA_KERNEL_LAUNCH_CHECK

[[noreturn]] void device_fail(const char* what, const char* file, int line);
void* dynamic_smem();

// Block barrier and warp exchange (the value is passed as up to 8 bytes).
void syncthreads(Site site);
void syncwarp(unsigned mask, Site site);
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, Site site);  // value of lane src (own if < 0)
unsigned warp_match(unsigned mask, uint64_t key, Site site);                   // lanes of mask with this key
unsigned warp_ballot(unsigned mask, bool pred, Site site);
void note_atomic(const void* address, size_t bytes);  // exempts an atomic's bytes from the race check

template <typename T>
inline uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp operations take up to 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}
inline unsigned lane_id() {
  const unsigned linear = g_thread_idx.x + g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z);
  return linear % 32u;
}

// Launcher returned by STEPLAW_LAUNCH: kernel(args...) for every thread of the grid.
template <typename... Params>
struct Launcher {
  const char* name;
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    // Arguments converted once to the kernel's parameter types, as cudaLaunchKernel does.
    std::tuple<std::decay_t<Params>...> values(std::forward<Args>(args)...);
    auto fn = kernel;
    launch(name, grid, block, smem, [&values, fn] { std::apply(fn, values); });
  }
};
template <typename... Params>
Launcher<Params...> make_launcher(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t) {
  return {name, kernel, grid, block, smem};
}

}  // namespace emu

// ---- kernel-language keywords -----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared variables: one instance (blocks run one at a time), in a section the
// scheduler poisons before each block and watches for races.
#define __shared__ __attribute__((section("steplaw_emu_shared"))) static
#define threadIdx (::emu::g_thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT(cond) \
  if (C10_UNLIKELY(!(cond))) ::emu::device_fail(#cond, __FILE__, __LINE__)
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  if (C10_UNLIKELY(!(cond))) ::emu::device_fail(msg, __FILE__, __LINE__)

// The caller's source line, as trailing default parameters of each barrier and warp
// operation: GCC expands __builtin_FILE/__builtin_LINE at the call only when each is a
// default argument itself (inside a braced Site{...} default it gives this header's line,
// and every barrier would look like the same one).
#define EMU_SITE_PARAMS const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()
#define EMU_SITE (::emu::Site{emu_file, emu_line})

// ---- device functions ---------------------------------------------------------------------
inline void __syncthreads(EMU_SITE_PARAMS) { emu::syncthreads(EMU_SITE); }
inline void __syncwarp(unsigned mask = 0xffffffffu, EMU_SITE_PARAMS) { emu::syncwarp(mask, EMU_SITE); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, EMU_SITE_PARAMS) {
  const int lane = int(emu::lane_id());
  const int base = lane / width * width;
  return emu::from_bits<T>(emu::warp_exchange(mask, emu::to_bits(var), base + ((src % width) + width) % width, EMU_SITE));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, EMU_SITE_PARAMS) {
  const int lane = int(emu::lane_id());
  const int src = lane % width + int(delta) < width ? lane + int(delta) : -1;
  return emu::from_bits<T>(emu::warp_exchange(mask, emu::to_bits(var), src, EMU_SITE));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, EMU_SITE_PARAMS) {
  const int lane = int(emu::lane_id());
  const int src = lane % width >= int(delta) ? lane - int(delta) : -1;
  return emu::from_bits<T>(emu::warp_exchange(mask, emu::to_bits(var), src, EMU_SITE));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, EMU_SITE_PARAMS) {
  const int lane = int(emu::lane_id());
  const int src = lane ^ lane_mask;
  return emu::from_bits<T>(emu::warp_exchange(mask, emu::to_bits(var), src / width == lane / width ? src : -1, EMU_SITE));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T key, EMU_SITE_PARAMS) {
  return emu::warp_match(mask, emu::to_bits(key), EMU_SITE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, EMU_SITE_PARAMS) {
  return emu::warp_ballot(mask, pred != 0, EMU_SITE);
}
inline int __any_sync(unsigned mask, int pred, EMU_SITE_PARAMS) {
  return emu::warp_ballot(mask, pred != 0, EMU_SITE) != 0;
}
inline int __all_sync(unsigned mask, int pred, EMU_SITE_PARAMS) {
  return emu::warp_ballot(mask, pred != 0, EMU_SITE) == mask;
}
inline unsigned __activemask() { return 0xffffffffu; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// Atomics (one OS thread runs all fibers, and a fiber is never interrupted between
// barriers: a plain read-modify-write is atomic here).
template <typename T>
inline T emu_atomic_add(T* address, T value) {
  emu::note_atomic(address, sizeof(T));
  const T old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* a, int v) { return emu_atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return emu_atomic_add(a, v); }
inline float atomicAdd(float* a, float v) { return emu_atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return emu_atomic_add(a, v); }
template <typename T>
inline T atomicMax(T* a, T v) {
  emu::note_atomic(a, sizeof(T));
  const T old = *a;
  *a = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* a, T v) {
  emu::note_atomic(a, sizeof(T));
  const T old = *a;
  *a = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* a, T v) {
  emu::note_atomic(a, sizeof(T));
  const T old = *a;
  *a = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* a, T compare, T v) {
  emu::note_atomic(a, sizeof(T));
  const T old = *a;
  if (old == compare) *a = v;
  return old;
}

// min/max of the device math library (integer and floating overloads).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a < b ? b : a; }

// IEEE round-to-nearest intrinsics: the emulated module is built with -ffp-contract=off,
// so each is one correctly rounded operation, as on the GPU.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }

// ---- runtime API the host code may call (all synchronous) --------------------------------
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, n, kind);
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t = nullptr) {
  if (n) std::memset(dst, value, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* dst, int value, size_t n) { return cudaMemsetAsync(dst, value, n); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
