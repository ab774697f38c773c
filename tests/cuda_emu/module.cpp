// The emulated-CUDA extension (test-only, built by tests/cuda_emu/build.py into
// build/cuda_emu): the op schemas of steplaw in the namespace steplaw_cuda_emu, whose CPU
// kernels are the unchanged CUDA host code and kernels of csrc/**/*_cuda.cu run through the
// emulation (adamw_cuda_emu.cpp, moe_cuda_emu.cpp), and two controls for the tests.
#include "emu/cuda_emu.h"

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

}  // namespace

TORCH_LIBRARY(steplaw_cuda_emu, m) {
  steplaw::define_op_schemas(m);
  // Block and thread order of the following launches: forward, reverse or shuffle (seeded).
  m.def("_set_order(str order, int seed) -> ()", &set_order);
  // "kernel=launches" lines, one per kernel launched since the module loaded.
  m.def("_launch_counts() -> str", &launch_counts);
}
