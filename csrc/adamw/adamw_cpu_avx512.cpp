// AVX-512 build of the CPU AdamW range kernel, selected at run time on CPUs that have
// it (torch's own fused AdamW runs 16 lanes there; the update is bound by division and
// square root throughput, so 8 lanes would lose). Same structure and the same rounding
// as adamw_cpu_avx2.cpp: only standard headers before the target pragma, and the shared
// math in a private namespace.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "adamw/adamw_cpu_range.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")

namespace steplaw_avx512 {
#include "adamw/adamw_math.h"
}  // namespace steplaw_avx512

namespace steplaw {
namespace adamw {
namespace {

namespace math = steplaw_avx512::steplaw::adamw;  // this TU's copy of adamw_math.h

// 16 float lanes; each operation one instruction, rounding as its scalar counterpart.
struct Lane16 {
  __m512 x;
  Lane16() = default;
  Lane16(__m512 value) : x(value) {}
  explicit Lane16(float value) : x(_mm512_set1_ps(value)) {}
};

struct Avx512Ops {
  static inline Lane16 load(const float* x) { return _mm512_loadu_ps(x); }
  static inline void store(float* x, Lane16 a) { _mm512_storeu_ps(x, a.x); }
  static inline Lane16 add(Lane16 a, Lane16 b) { return _mm512_add_ps(a.x, b.x); }
  static inline Lane16 sub(Lane16 a, Lane16 b) { return _mm512_sub_ps(a.x, b.x); }
  static inline Lane16 mul(Lane16 a, Lane16 b) { return _mm512_mul_ps(a.x, b.x); }
  static inline Lane16 div(Lane16 a, Lane16 b) { return _mm512_div_ps(a.x, b.x); }
  static inline Lane16 neg(Lane16 a) { return _mm512_xor_ps(a.x, _mm512_set1_ps(-0.0f)); }
  static inline Lane16 fma(Lane16 a, Lane16 b, Lane16 c) { return _mm512_fmadd_ps(a.x, b.x, c.x); }
  static inline Lane16 sqrt(Lane16 a) { return _mm512_sqrt_ps(a.x); }
  // NaN-propagating max (all bits set where either input is NaN, as the AVX2 path).
  static inline Lane16 max(Lane16 a, Lane16 b) {
    const __m512 m = _mm512_max_ps(a.x, b.x);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(a.x, b.x, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(is_nan, m, _mm512_castsi512_ps(_mm512_set1_epi32(-1)));
  }
};

using Lane = Lane16;
using SimdOps = Avx512Ops;
constexpr int64_t kLanes = 16;

#include "adamw/adamw_cpu_simd.inc"

}  // namespace

bool avx512_available() {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return available;
}

void update_range_avx512(const RangeRequest& r) { update_range_simd(r); }

}  // namespace adamw
}  // namespace steplaw

#pragma GCC pop_options
#else
namespace steplaw {
namespace adamw {
bool avx512_available() { return false; }
void update_range_avx512(const RangeRequest&) {}
}  // namespace adamw
}  // namespace steplaw
#endif
