// Per-element AdamW math, shared by the C++ CPU kernel and the CUDA kernel so that the
// CPU tests check the arithmetic the GPU runs.
//
// The order of operations follows torch's fused AdamW (ATen/native/cpu/FusedAdamKernel.cpp,
// ADAMW mode): coefficients in double, cast once to the math type, then per element
//   g  = grad / grad_scale;  g = maximize ? -g : g
//   p  = p * (1 - lr * wd)                               (decoupled weight decay)
//   m  = fma(w, g - m, m) if w = 1 - beta1 < 0.5 else fma(w - 1, g - m, g)   (torch.lerp)
//   v  = fma((1 - beta2) * g, g, v * beta2)
//   vm = max(vm, v)                                       (amsgrad)
//   p  = p + ((-lr / bc1) * m) / (sqrt(v or vm) / sqrt(bc2) + eps)
// The two FMAs are where torch's vectorised CPU kernel (AVX2/AVX512 build, measured on
// torch 2.14) rounds once; with them fp32 results equal torch's bit for bit.
// Every operation goes through an `Ops` policy (add/sub/mul/div/fma/sqrt/max) so that the
// CPU can run it on SIMD lanes and CUDA can use the round-to-nearest intrinsics, which
// never contract into other FMAs nor follow fast-math approximations, should anyone
// build with --use_fast_math: every device then rounds at the same points.
//
// Stacked parameters (K runs of a sweep trained as one model, issue 10). A param of K
// members has a leading member dimension of size K; member k is param[k]. The kernels
// walk every param as flat memory in the param's own dense layout, which the host
// staging (adamw_common.h) makes member-major for a stacked param: member k owns the
// elements [k * member_numel, (k + 1) * member_numel), member_numel = numel / K. Member
// k of a param whose first hparams row is `group` is updated with row group + k, and no
// unit of kernel work (a CPU range, a CUDA block) crosses a member boundary, so each
// unit computes its coefficients once from one row. A row flagged kIsMember with lr
// exactly 0 is frozen: nothing of that member is read or written (a diverged member's
// NaN gradients touch nothing). Unstacked params have K = 1 and rows without the flag,
// so lr = 0 there behaves as torch's AdamW (moments still move).
#pragma once

#include <cmath>

#include "common/macros.h"

namespace steplaw {
namespace adamw {

// Columns of the per-group hyperparameter table (float64 [n_groups, kNumHparams]).
enum HparamColumn : int {
  kLr = 0,
  kBeta1 = 1,
  kBeta2 = 2,
  kWeightDecay = 3,
  kEps = 4,
  kMaximize = 5,  // 0.0 or 1.0
  kIsMember = 6,  // 1.0 for the rows of a stacked param group's members: lr 0 freezes them
  kNumHparams = 7,
};

// Whether a row's elements are left untouched this step (a frozen stacked member).
STEPLAW_HOST_DEVICE inline bool row_frozen(const double* hp) {
  return hp[kIsMember] != 0.0 && hp[kLr] == 0.0;
}

// Per-tensor coefficients, already rounded to the math type T (float or double).
template <typename T>
struct Coeffs {
  T lerp_weight;      // 1 - beta1
  T lerp_weight_m1;   // T(1 - beta1) - 1, used when the weight is >= 0.5
  bool lerp_small;    // |1 - beta1| < 0.5 picks lerp's first form
  T beta2;
  T one_minus_beta2;
  bool decay;         // weight_decay != 0
  T decay_factor;     // 1 - lr * weight_decay
  T neg_step_size;    // -lr / (1 - beta1^step)
  T bc2_sqrt;         // sqrt(1 - beta2^step)
  T eps;
  bool maximize;
};

// `hp` points at one row of the hyperparameter table; `step` is the step number of this
// update (the stored count plus one).
template <typename T>
STEPLAW_HOST_DEVICE inline Coeffs<T> make_coeffs(const double* hp, double step) {
  const double lr = hp[kLr], beta1 = hp[kBeta1], beta2 = hp[kBeta2];
  const double weight_decay = hp[kWeightDecay];
  Coeffs<T> c;
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  c.lerp_weight = T(1.0 - beta1);
  c.lerp_weight_m1 = c.lerp_weight - T(1);
  c.lerp_small = ::fabs(double(c.lerp_weight)) < 0.5;
  c.beta2 = T(beta2);
  c.one_minus_beta2 = T(1.0 - beta2);
  c.decay = weight_decay != 0.0;
  c.decay_factor = T(1.0 - lr * weight_decay);
  c.neg_step_size = T(-(lr / bias_correction1));
  c.bc2_sqrt = T(::sqrt(bias_correction2));
  c.eps = T(hp[kEps]);
  c.maximize = hp[kMaximize] != 0.0;
  return c;
}

// One AdamW update of a lane (a scalar or a SIMD vector V of the math type).
// `p` is the parameter (or its fp32 master copy) in the math type; `g` the raw gradient.
// `scale` divides the gradient when `has_scale` (GradScaler's scale).
template <typename Ops, typename V, typename T>
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE void update(
    V& p, V g, V& m, V& v, V* vmax, const Coeffs<T>& c, bool has_scale, V scale) {
  if (has_scale) g = Ops::div(g, scale);
  if (c.maximize) g = Ops::neg(g);
  if (c.decay) p = Ops::mul(p, V(c.decay_factor));
  if (c.lerp_small) {
    m = Ops::fma(V(c.lerp_weight), Ops::sub(g, m), m);
  } else {
    m = Ops::fma(V(c.lerp_weight_m1), Ops::sub(g, m), g);
  }
  v = Ops::fma(Ops::mul(V(c.one_minus_beta2), g), g, Ops::mul(v, V(c.beta2)));
  V second = v;
  if (vmax != nullptr) {
    *vmax = Ops::max(*vmax, v);
    second = *vmax;
  }
  const V denom = Ops::add(Ops::div(Ops::sqrt(second), V(c.bc2_sqrt)), V(c.eps));
  p = Ops::add(p, Ops::div(Ops::mul(V(c.neg_step_size), m), denom));
}

// Plain C++ arithmetic on scalars (the CPU tail loop and the reference for the tests).
struct ScalarOps {
  template <typename T> static inline T add(T a, T b) { return a + b; }
  template <typename T> static inline T sub(T a, T b) { return a - b; }
  template <typename T> static inline T mul(T a, T b) { return a * b; }
  template <typename T> static inline T div(T a, T b) { return a / b; }
  template <typename T> static inline T neg(T a) { return -a; }
  // Exact fused multiply-add (an instruction where the target has FMA, libm otherwise).
  template <typename T> static inline T fma(T a, T b, T c) { return std::fma(a, b, c); }
  template <typename T> static inline T sqrt(T a) { return std::sqrt(a); }
  // As std::max(current, candidate) in torch's scalar path.
  template <typename T> static inline T max(T a, T b) { return (a < b) ? b : a; }
};

}  // namespace adamw
}  // namespace steplaw
