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

using steplaw_avx2::steplaw::adamw::Coeffs;
using steplaw_avx2::steplaw::adamw::ScalarOps;
using steplaw_avx2::steplaw::adamw::make_coeffs;
using steplaw_avx2::steplaw::adamw::update;

// 8 float lanes; each operation one instruction, rounding as its scalar counterpart.
struct Lane8 {
  __m256 x;
  Lane8() = default;
  Lane8(__m256 value) : x(value) {}
  explicit Lane8(float value) : x(_mm256_set1_ps(value)) {}
};

struct Avx2Ops {
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

// Parameter storage <-> float. bf16 rounds to nearest even, as c10::BFloat16.
struct FloatIo {
  using storage = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};
struct DoubleIo {
  using storage = double;
  static inline double load(double x) { return x; }
  static inline double store(double x) { return x; }
};
struct BFloat16Io {
  using storage = uint16_t;
  static inline float load(uint16_t x) {
    uint32_t bits = uint32_t(x) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static inline uint16_t store(float x) {
    if (std::isnan(x)) return 0x7FC0;
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    bits += 0x7FFF + ((bits >> 16) & 1);
    return uint16_t(bits >> 16);
  }
};
struct HalfIo {
  using storage = uint16_t;
  static inline float load(uint16_t x) { return _cvtsh_ss(x); }
  static inline uint16_t store(float x) { return _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT); }
};

template <typename Io, typename T>
void scalar_range(const RangeRequest& r, const Coeffs<T>& c, int64_t d) {
  auto* p = static_cast<typename Io::storage*>(r.param);
  const auto* g = static_cast<const typename Io::storage*>(r.grad);
  T* m = static_cast<T*>(r.exp_avg);
  T* v = static_cast<T*>(r.exp_avg_sq);
  T* vmax = static_cast<T*>(r.max_exp_avg_sq);
  float* master = static_cast<float*>(r.master);
  const T scale = T(r.scale);
  for (; d < r.end; ++d) {
    T pv = master ? T(master[d]) : T(Io::load(p[d]));
    T vmaxv = vmax ? vmax[d] : T(0);
    update<ScalarOps>(pv, T(Io::load(g[d])), m[d], v[d], vmax ? &vmaxv : nullptr, c, r.has_scale, scale);
    if (vmax) vmax[d] = vmaxv;
    if (master) master[d] = float(pv);
    p[d] = Io::store(pv);
  }
}

void float_range(const RangeRequest& r, const Coeffs<float>& c) {
  float* p = static_cast<float*>(r.param);
  const float* g = static_cast<const float*>(r.grad);
  float* m = static_cast<float*>(r.exp_avg);
  float* v = static_cast<float*>(r.exp_avg_sq);
  float* vmax = static_cast<float*>(r.max_exp_avg_sq);
  const Lane8 scale(r.scale);
  int64_t d = r.begin;
  for (; d + 8 <= r.end; d += 8) {
    Lane8 pv = _mm256_loadu_ps(p + d);
    Lane8 mv = _mm256_loadu_ps(m + d);
    Lane8 vv = _mm256_loadu_ps(v + d);
    Lane8 vmaxv;
    if (vmax) vmaxv = _mm256_loadu_ps(vmax + d);
    update<Avx2Ops>(pv, Lane8(_mm256_loadu_ps(g + d)), mv, vv, vmax ? &vmaxv : nullptr, c,
                    r.has_scale, scale);
    _mm256_storeu_ps(m + d, mv.x);
    _mm256_storeu_ps(v + d, vv.x);
    if (vmax) _mm256_storeu_ps(vmax + d, vmaxv.x);
    _mm256_storeu_ps(p + d, pv.x);
  }
  scalar_range<FloatIo, float>(r, c, d);
}

}  // namespace

bool avx2_fma_available() {
  static const bool available = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  return available;
}

void update_range_avx2(const RangeRequest& r) {
  switch (r.kind) {
    case ParamKind::kFloat:
      float_range(r, make_coeffs<float>(r.hparams_row, r.step));
      break;
    case ParamKind::kDouble:
      scalar_range<DoubleIo, double>(r, make_coeffs<double>(r.hparams_row, r.step), r.begin);
      break;
    case ParamKind::kBFloat16:
      scalar_range<BFloat16Io, float>(r, make_coeffs<float>(r.hparams_row, r.step), r.begin);
      break;
    case ParamKind::kHalf:
      scalar_range<HalfIo, float>(r, make_coeffs<float>(r.hparams_row, r.step), r.begin);
      break;
  }
}

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
