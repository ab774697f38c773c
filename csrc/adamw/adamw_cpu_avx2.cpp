// AVX2+FMA build of the CPU AdamW range kernel, selected at run time. Only standard
// headers come before the target pragma, and the shared math is wrapped in a private
// namespace, so no function compiled here can stand in for a baseline-x86 one.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "adamw/adamw_cpu_range.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STEPLAW_AVX2_TU 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace steplaw_avx2 {
#include "adamw/adamw_math.h"
}  // namespace steplaw_avx2

namespace steplaw {
namespace adamw {
namespace {

namespace math = steplaw_avx2::steplaw::adamw;  // this TU's copy of adamw_math.h

// 8 float lanes; each operation one instruction, rounding as its scalar counterpart.
struct Lane8 {
  __m256 x;
  Lane8() = default;
  Lane8(__m256 value) : x(value) {}
  explicit Lane8(float value) : x(_mm256_set1_ps(value)) {}
};

struct Avx2Ops {
  static inline Lane8 load(const float* x) { return _mm256_loadu_ps(x); }
  static inline void store(float* x, Lane8 a) { _mm256_storeu_ps(x, a.x); }
  static inline Lane8 add(Lane8 a, Lane8 b) { return _mm256_add_ps(a.x, b.x); }
  static inline Lane8 sub(Lane8 a, Lane8 b) { return _mm256_sub_ps(a.x, b.x); }
  static inline Lane8 mul(Lane8 a, Lane8 b) { return _mm256_mul_ps(a.x, b.x); }
  static inline Lane8 div(Lane8 a, Lane8 b) { return _mm256_div_ps(a.x, b.x); }
  static inline Lane8 neg(Lane8 a) { return _mm256_xor_ps(a.x, _mm256_set1_ps(-0.0f)); }
  static inline Lane8 fma(Lane8 a, Lane8 b, Lane8 c) { return _mm256_fmadd_ps(a.x, b.x, c.x); }
  static inline Lane8 sqrt(Lane8 a) { return _mm256_sqrt_ps(a.x); }
  // NaN-propagating max, as at::vec::maximum in torch's kernel.
  static inline Lane8 max(Lane8 a, Lane8 b) {
    __m256 m = _mm256_max_ps(a.x, b.x);
    __m256 is_nan = _mm256_cmp_ps(a.x, b.x, _CMP_UNORD_Q);
    return _mm256_or_ps(m, is_nan);
  }
};

using Lane = Lane8;
using SimdOps = Avx2Ops;
constexpr int64_t kLanes = 8;

#include "adamw/adamw_cpu_simd.inc"

}  // namespace

bool avx2_fma_available() {
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  return available;
}

void update_range_avx2(const RangeRequest& r) { update_range_simd(r); }

}  // namespace adamw
}  // namespace steplaw

#pragma GCC pop_options
#else
namespace steplaw {
namespace adamw {
bool avx2_fma_available() { return false; }
void update_range_avx2(const RangeRequest&) {}
}  // namespace adamw
}  // namespace steplaw
#endif
