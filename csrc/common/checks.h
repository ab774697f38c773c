// The one check macro of steplaw's ops. Rule: every argument check of a kernel raises
// c10::ValueError, which Python sees as ValueError, with one sentence that names the bad
// value and what was expected, prefixed "steplaw: ". The pure-PyTorch references raise
// the same class with the same text (steplaw/ops/_loader.py op_error), so a caller sees
// one error whichever implementation runs. Shapes print as [a, b], dtypes as Python
// names (torch.float32), devices as torch does (cpu, cuda:0), in both languages.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

#define STEPLAW_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "steplaw: ", __VA_ARGS__)

namespace steplaw {

// A dtype as Python prints it: "torch.float32".
inline std::string dtype_name(c10::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

}  // namespace steplaw
