// Host-side pieces shared by the CPU and CUDA AdamW kernels: argument checks and the
// staging of tensors that the kernels cannot update in place (non-dense layouts, and
// stacked params whose members are not contiguous blocks of memory).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "adamw/adamw_math.h"
#include "common/checks.h"

namespace steplaw {
namespace adamw {

// The tensors of one parameter, as the kernels see them: dense memory of `numel`
// elements that all share one layout. `write_back` holds (original, staged) pairs of
// tensors that were copied because their layout was not usable in place.
struct ParamSlot {
  at::Tensor param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master;
  int64_t group = 0;    // first hparams row
  int64_t members = 1;  // K: member k owns elements [k * numel / K, (k + 1) * numel / K)
};

struct StagedLists {
  std::vector<ParamSlot> slots;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;

  // Copies staged tensors back into the caller's tensors.
  void finish() {
    for (auto& pair : write_back) pair.first.copy_(pair.second);
  }
};

inline bool same_dense_layout(const at::Tensor& ref, const at::Tensor& other) {
  return other.sizes().equals(ref.sizes()) && other.strides().equals(ref.strides()) &&
      other.is_non_overlapping_and_dense();
}

// Whether the dense tensor `t` of K members keeps each member t[k] in one contiguous
// block of numel / K elements (dim 0 outermost in memory), as the kernels assume.
inline bool member_major(const at::Tensor& t, int64_t members) {
  if (members == 1 || t.numel() == 0) return true;
  return t.is_non_overlapping_and_dense() && t.stride(0) == t.numel() / members &&
      t.select(0, 0).is_non_overlapping_and_dense();
}

// Validates the op's arguments and returns one slot per parameter whose tensors can be
// walked as flat arrays of numel elements in the same order.
inline StagedLists stage_lists(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList master_params,
    at::TensorList steps, const at::Tensor& hparams, at::IntArrayRef group_index, bool amsgrad,
    at::OptionalIntArrayRef members) {
  const size_t n = params.size();
  STEPLAW_CHECK(!members.has_value() || members->size() == n,
                "fused_adamw_ expects one members entry per param, got ", members.has_value() ? members->size() : 0,
                " for ", n, " params");
  STEPLAW_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                    steps.size() == n && group_index.size() == n,
                "fused_adamw_ expects params, grads, exp_avgs, exp_avg_sqs, steps and "
                "group_index of one length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(),
                ", ", exp_avg_sqs.size(), ", ", steps.size(), ", ", group_index.size());
  STEPLAW_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
                "fused_adamw_ with amsgrad expects one max_exp_avg_sq per param, got ",
                max_exp_avg_sqs.size(), " for ", n, " params");
  STEPLAW_CHECK(master_params.empty() || master_params.size() == n,
                "fused_adamw_ expects master_params to be empty or one per param, got ",
                master_params.size(), " for ", n, " params");
  STEPLAW_CHECK(hparams.scalar_type() == at::kDouble && hparams.dim() == 2 &&
                    hparams.size(1) == kNumHparams && hparams.is_contiguous(),
                "fused_adamw_ expects hparams as a contiguous float64 [groups, ", int(kNumHparams),
                "] table, got ", hparams.scalar_type(), " ", hparams.sizes());
  StagedLists out;
  out.slots.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int64_t k = members.has_value() ? (*members)[i] : 1;
    STEPLAW_CHECK(k >= 1, "members[", i, "] = ", k, ": expected at least 1");
    STEPLAW_CHECK(group_index[i] >= 0 && group_index[i] + k <= hparams.size(0),
                  "group_index[", i, "] = ", group_index[i], " with ", k, " member(s) is outside the ",
                  hparams.size(0), " rows of hparams");
    STEPLAW_CHECK(k == 1 || (p.dim() >= 1 && p.size(0) == k),
                  "param ", i, " of shape ", p.sizes(), " has ", k,
                  " stacked members: expected a leading member dimension of size ", k);
    STEPLAW_CHECK(!p.is_complex() && at::isFloatingType(p.scalar_type()),
                  "fused_adamw_ supports real floating-point params, got ", p.scalar_type());
    STEPLAW_CHECK(grads[i].layout() == at::kStrided,
                  "fused_adamw_ does not support sparse gradients");
    STEPLAW_CHECK(grads[i].scalar_type() == p.scalar_type() && grads[i].sizes().equals(p.sizes()) &&
                      grads[i].device() == p.device(),
                  "grad ", i, " must match its param in dtype, shape and device");
    const bool has_master = !master_params.empty();
    // Master weights make the state float32, which the float64 kernels (math type double)
    // would read as double: only float32/bf16/fp16 params take them.
    STEPLAW_CHECK(!has_master || p.scalar_type() != at::kDouble,
                  "param ", i, " is float64: master_params are for float32, bfloat16 and float16 params");
    const auto state_type = has_master ? at::kFloat : (p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    const at::Tensor* state[3] = {&exp_avgs[i], &exp_avg_sqs[i],
                                  amsgrad ? &max_exp_avg_sqs[i] : nullptr};
    for (const at::Tensor* s : state) {
      if (s == nullptr) continue;
      STEPLAW_CHECK(s->scalar_type() == state_type && s->sizes().equals(p.sizes()) &&
                        s->device() == p.device(),
                    "optimizer state of param ", i, " must be ", state_type,
                    " with the param's shape and device, got ", s->scalar_type(), " ", s->sizes());
    }
    if (has_master) {
      STEPLAW_CHECK(master_params[i].scalar_type() == at::kFloat &&
                        master_params[i].sizes().equals(p.sizes()) && master_params[i].device() == p.device(),
                    "master param ", i, " must be float32 with the param's shape and device");
    }
    STEPLAW_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                      steps[i].device() == p.device(),
                  "step ", i, " must be a one-element float32 tensor on the param's device");

    ParamSlot slot;
    slot.group = group_index[i];
    slot.members = k;
    // The param's layout is the reference (made member-major for a stacked param);
    // every other tensor must match it or be staged.
    auto use = [&](const at::Tensor& t, const at::Tensor& ref, bool writes) -> at::Tensor {
      if (same_dense_layout(ref, t)) return t;
      at::Tensor staged = at::empty_like(ref, t.options());
      staged.copy_(t);
      if (writes) out.write_back.emplace_back(t, staged);
      return staged;
    };
    at::Tensor ref = p.is_non_overlapping_and_dense() && member_major(p, k) ? p : p.contiguous();
    slot.param = use(p, ref, true);
    slot.grad = use(grads[i], ref, false);
    slot.exp_avg = use(exp_avgs[i], ref, true);
    slot.exp_avg_sq = use(exp_avg_sqs[i], ref, true);
    if (amsgrad) slot.max_exp_avg_sq = use(max_exp_avg_sqs[i], ref, true);
    if (has_master) slot.master = use(master_params[i], ref, true);
    out.slots.push_back(std::move(slot));
  }
  return out;
}

}  // namespace adamw
}  // namespace steplaw
