// The emulated-CUDA extension (test-only, built by tests/cuda_emu/build.py into
// build/cuda_emu): the op schemas of steplaw in the namespace steplaw_cuda_emu, whose CPU
// kernels are the unchanged CUDA host code and kernels of csrc/**/*_cuda.cu run through the
// emulation (adamw_cuda_emu.cpp, moe_cuda_emu.cpp), and two controls for the tests.
#include "emu/cuda_emu.h"

#include <c10/cuda/CUDAException.h>

#include <vector>

#include "common/cuda_kernel.h"
#include "op_schemas.h"

namespace emu {
std::string launch_counts();
}

namespace {

void set_order(c10::string_view order, int64_t seed) {
  const std::string name(order.data(), order.size());
  TORCH_CHECK_VALUE(name == "forward" || name == "reverse" || name == "shuffle", "order '", name,
                    "': expected forward, reverse or shuffle");
  emu::set_order(name == "forward" ? emu::Order::kForward : name == "reverse" ? emu::Order::kReverse
                                                                             : emu::Order::kShuffle,
                 static_cast<uint64_t>(seed));
}

std::string launch_counts() { return emu::launch_counts(); }

// ---- kernels with known faults: the harness's own tests (test_harness.py) -----------------

__global__ void block_sum_kernel(const float* in, float* out, bool skip_barrier) {
  __shared__ float partial[64];
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  if (!skip_barrier) __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) total += partial[i];
    out[blockIdx.x] = total;
  }
}

__global__ void shared_race_kernel(int* out) {
  STEPLAW_DYNAMIC_SHARED(int, slot);
  slot[0] = static_cast<int>(threadIdx.x);  // every thread writes one address, no barrier
  __syncthreads();
  if (threadIdx.x == 0) *out = slot[0];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  *out = 1;
}

// Even and odd lanes exchange at two different shuffles: undefined on the GPU (every lane
// of the mask must execute the same intrinsic), an error here.
__global__ void divergent_warp_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  if (threadIdx.x == 0) *out = v;
}

__global__ void early_exit_barrier_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  *out = 1;
}

__global__ void warp_sum_kernel(const float* in, float* out, int steps) {
  float v = in[threadIdx.x];
  for (int offset = 16, s = 0; s < steps; offset /= 2, ++s) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x == 0) *out = v;
}

__global__ void partial_warp_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  *out = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void assert_kernel(const int* in) { CUDA_KERNEL_ASSERT(in[threadIdx.x] >= 0 && "negative input"); }

// Runs one of the faulty kernels: returns its output (the tests check the value) or raises.
double selftest(c10::string_view which_view) {
  const std::string which(which_view.data(), which_view.size());
  std::vector<float> in(128);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i + 1);
  std::vector<float> out(2, 0.0f);
  int result = 0;
  auto launch = [&](auto&& run) {
    run();
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (which == "block_sum" || which == "block_sum_no_barrier") {
    launch([&] { STEPLAW_LAUNCH((2, 64, 0, nullptr), block_sum_kernel)(in.data(), out.data(), which != "block_sum"); });
    return out[0] + out[1];
  }
  if (which == "shared_race") {
    launch([&] { STEPLAW_LAUNCH((1, 8, sizeof(int), nullptr), shared_race_kernel)(&result); });
    return result;
  }
  if (which == "divergent_barrier") {
    launch([&] { STEPLAW_LAUNCH((1, 8, 0, nullptr), divergent_barrier_kernel)(&result); });
    return result;
  }
  if (which == "divergent_warp") {
    launch([&] { STEPLAW_LAUNCH((1, 32, 0, nullptr), divergent_warp_kernel)(out.data()); });
    return out[0];
  }
  if (which == "early_exit_barrier") {
    launch([&] { STEPLAW_LAUNCH((1, 8, 0, nullptr), early_exit_barrier_kernel)(&result); });
    return result;
  }
  if (which == "warp_sum" || which == "warp_sum_short") {
    launch([&] { STEPLAW_LAUNCH((1, 32, 0, nullptr), warp_sum_kernel)(in.data(), out.data(), which == "warp_sum" ? 5 : 4); });
    return out[0];
  }
  if (which == "partial_warp") {
    launch([&] { STEPLAW_LAUNCH((1, 32, 0, nullptr), partial_warp_kernel)(out.data()); });
    return out[0];
  }
  if (which == "assert") {
    std::vector<int> ints(4, 1);
    ints[2] = -1;
    launch([&] { STEPLAW_LAUNCH((1, 4, 0, nullptr), assert_kernel)(ints.data()); });
    return 0;
  }
  if (which == "empty_grid") {
    launch([&] { STEPLAW_LAUNCH((0, 32, 0, nullptr), partial_warp_kernel)(out.data()); });
    return 0;
  }
  if (which == "big_smem") {
    launch([&] { STEPLAW_LAUNCH((1, 32, 64 * 1024, nullptr), shared_race_kernel)(&result); });
    return 0;
  }
  TORCH_CHECK_VALUE(false, "no self-test named ", which);
}

}  // namespace

TORCH_LIBRARY(steplaw_cuda_emu, m) {
  steplaw::define_op_schemas(m);
  // Block and thread order of the following launches: forward, reverse or shuffle (seeded).
  m.def("_set_order(str order, int seed) -> ()", &set_order);
  // "kernel=launches" lines, one per kernel launched since the module loaded.
  m.def("_launch_counts() -> str", &launch_counts);
  // Runs one of the harness's faulty test kernels (tests/cuda_emu/test_harness.py).
  m.def("_selftest(str which) -> float", &selftest);
}
