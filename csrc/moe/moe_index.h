// Counting, index and per-element math of the MoE dispatch ops, shared by the C++ CPU
// kernels (moe_cpu.cpp) and the CUDA kernels (moe_cuda.cu): one definition, so the CPU
// tests also check the arithmetic the GPU runs.
//
// Layout produced by moe_permute (T tokens, k slots each, E experts):
//   slot i = t*k + j is token t's j-th choice; expert e owns permuted rows
//   [offsets[e], offsets[e+1]); within a group, slots keep slot order (token order);
//   rank = position of a slot among the slots of its expert (0-based, slot order).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

// The device branches below (the GPU's, also taken by the CUDA emulation of tests/cuda_emu,
// whose intrinsics compute the same correctly rounded operations on the CPU).
#if defined(__CUDA_ARCH__) || defined(STEPLAW_CUDA_EMU)
#define STEPLAW_DEVICE_MATH 1
#else
#define STEPLAW_DEVICE_MATH 0
#endif

namespace steplaw {
namespace moe {

// Slots per counting chunk. CPU and CUDA split the T*k slots into the same chunks:
// per-chunk histograms, a prefix sum over chunks gives each chunk's first rank per
// expert, and a second pass hands out ranks in slot order within each chunk.
constexpr int64_t kCountChunk = 1024;

STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Rows of expert e's group: its count (or the capacity) rounded up to pad_multiple.
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE int64_t group_rows(int64_t count, int64_t pad_multiple, int64_t capacity) {
  return round_up(capacity > 0 ? capacity : count, pad_multiple);
}

// Slots of an expert dropped by the capacity (capacity 0 = dropless).
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE int64_t dropped_slots(int64_t count, int64_t capacity) {
  return (capacity > 0 && count > capacity) ? count - capacity : 0;
}

// Permuted row of a slot from its expert's group start and its rank; -1 when dropped.
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE int64_t slot_row(int64_t group_start, int64_t rank, int64_t capacity) {
  return (capacity > 0 && rank >= capacity) ? int64_t(-1) : group_start + rank;
}

// Rows of moe_permute's output, from shapes alone (an upper bound when padded).
inline int64_t permuted_rows(int64_t tokens, int64_t k, int64_t experts, int64_t pad_multiple, int64_t capacity) {
  if (capacity > 0) return experts * round_up(capacity, pad_multiple);
  return tokens * k + experts * (pad_multiple - 1);
}

// ---- routing -------------------------------------------------------------------------

// Selection order: higher score first, ties to the lower expert index, and a NaN score
// above every number (NaNs among themselves by index) -- torch.topk's and torch.sort's
// order, which the reference uses. Why NaN first: a NaN logit means the run diverged;
// choosing the NaN expert puts NaN into the token's combine weights (all of them when
// renormalised; softmax makes the whole row NaN anyway), so the loss turns NaN at once
// and the divergence is seen. Never choosing it would route around the NaN silently.
// An error instead would need a device-to-host sync on every forward pass.
template <typename S>
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE bool ranks_before(S a, int32_t ia, S b, int32_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Keeps the best k of the (value, index) pairs seen so far, sorted best first (a total
// order, NaN included);
// `filled` counts the entries in use. Indices must arrive in increasing order.
template <typename S>
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE void topk_insert(S* vals, int32_t* idx, int32_t& filled, int32_t k, S v,
                                                       int32_t i) {
  if (filled == k && !ranks_before(v, i, vals[k - 1], idx[k - 1])) return;
  int32_t pos = filled < k ? filled : k - 1;
  while (pos > 0 && ranks_before(v, i, vals[pos - 1], idx[pos - 1])) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = i;
  if (filled < k) ++filled;
}

// Device float exp and division differ from the CPU's (and under --use_fast_math become
// __expf, with error growing with |x|, and an approximate division). Routing
// compares scores, so near-ties would pick other experts on the GPU than on the CPU:
// exp in double rounded once to float (the CPU's correctly rounded expf, but for
// double-rounding cases of probability ~1e-9) and IEEE division, on both devices.
template <typename S>
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE S exp_of(S x) {
#if STEPLAW_DEVICE_MATH
  return static_cast<S>(exp(static_cast<double>(x)));
#else
  return std::exp(x);
#endif
}

STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE float div_of(float a, float b) {
#if STEPLAW_DEVICE_MATH
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE double div_of(double a, double b) { return a / b; }

template <typename S>
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE S sigmoid_score(S x) { return div_of(S(1), S(1) + exp_of(-x)); }

// Routes one token: logits row [E] -> the k chosen expert ids (best first) and their
// combine weights. Scores: softmax over E, or sigmoid; bias (may be null) shifts the
// selection only. top_val/top_idx are k-element scratch buffers.
template <typename S, typename L>
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE void route_token(const L* logits, int32_t num_experts, int32_t k,
                                                       bool use_sigmoid, bool renormalize, const S* bias, S* top_val,
                                                       int32_t* top_idx, int32_t* ids_out, S* weights_out) {
  S max_logit = S(logits[0]);
  S denom = S(1);
  if (!use_sigmoid) {
    for (int32_t e = 1; e < num_experts; ++e) max_logit = S(logits[e]) > max_logit ? S(logits[e]) : max_logit;
    denom = S(0);
    for (int32_t e = 0; e < num_experts; ++e) denom += exp_of(S(logits[e]) - max_logit);
  }
  int32_t filled = 0;
  for (int32_t e = 0; e < num_experts; ++e) {
    S score = use_sigmoid ? sigmoid_score(S(logits[e])) : div_of(exp_of(S(logits[e]) - max_logit), denom);
    if (bias != nullptr) score += bias[e];
    topk_insert(top_val, top_idx, filled, k, score, e);
  }
  S total = S(0);
  for (int32_t j = 0; j < k; ++j) {
    const int32_t e = top_idx[j];
    const S score = use_sigmoid ? sigmoid_score(S(logits[e])) : div_of(exp_of(S(logits[e]) - max_logit), denom);
    ids_out[j] = e;
    weights_out[j] = score;
    total += score;
  }
  if (renormalize) {
    for (int32_t j = 0; j < k; ++j) weights_out[j] = div_of(weights_out[j], total);
  }
}

// ---- combine ---------------------------------------------------------------------------

// acc + w * v rounded twice (never fused into an FMA), as the PyTorch reference
// computes it, so that unpermute outputs are bitwise equal across CPU, CUDA, reference.
STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE float mul_add_unfused(float w, float v, float acc) {
#if STEPLAW_DEVICE_MATH
  return __fadd_rn(__fmul_rn(w, v), acc);
#else
  return w * v + acc;  // moe_cpu.cpp turns FMA contraction off
#endif
}

STEPLAW_HOST_DEVICE STEPLAW_FORCE_INLINE double mul_add_unfused(double w, double v, double acc) {
#if STEPLAW_DEVICE_MATH
  return __dadd_rn(__dmul_rn(w, v), acc);
#else
  return w * v + acc;
#endif
}

}  // namespace moe
}  // namespace steplaw
