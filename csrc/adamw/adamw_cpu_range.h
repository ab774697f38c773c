// The CPU kernel's unit of work, a range of one parameter, as a plain struct so that it
// crosses between translation units compiled for different instruction sets (the
// AVX2 and AVX-512 ones must not include torch headers: their inline functions would be emitted
// with AVX2 instructions and could be picked by the linker for every caller).
#pragma once

#include <cstdint>

namespace steplaw {
namespace adamw {

enum class ParamKind : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

struct RangeRequest {
  ParamKind kind;
  void* param;          // ParamKind storage
  const void* grad;     // same storage as param
  void* exp_avg;        // float (double for kDouble), as the next three
  void* exp_avg_sq;
  void* max_exp_avg_sq; // nullptr without amsgrad
  void* master;         // nullptr without master weights (float)
  int64_t begin, end;   // elements [begin, end)
  const double* hparams_row;
  double step;          // the step number of this update
  bool has_scale;
  float scale;          // GradScaler's scale, divided out of the gradient
};

// Whether this CPU runs the AVX2+FMA kernel (checked once at run time).
bool avx2_fma_available();
// The AVX2+FMA kernel; call only when avx2_fma_available().
void update_range_avx2(const RangeRequest& request);
// Whether this CPU runs the AVX-512 kernel, and that kernel (same results, 16 lanes).
bool avx512_available();
void update_range_avx512(const RangeRequest& request);

}  // namespace adamw
}  // namespace steplaw
