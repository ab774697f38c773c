// Argument checks of the MoE dispatch ops, shared by the CPU and CUDA kernels. The
// pure-PyTorch references (steplaw/ops/moe.py) make the same checks in the same order
// with the same sentences and the same error class (csrc/common/checks.h), so a caller
// cannot tell which implementation rejected an input. Limits of one implementation only
// (the CUDA kernels' expert and top-k bounds) stay next to it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "common/checks.h"

namespace steplaw {
namespace moe {

// moe_permute's outputs (permuted, row_map, src_index, offsets, dropped), as both kernels
// return them.
using PermuteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline bool parse_score_func(std::string_view score_func) {
  STEPLAW_CHECK(score_func == "softmax" || score_func == "sigmoid", "score_func='", std::string(score_func),
                "': expected one of ('softmax', 'sigmoid')");
  return score_func == "sigmoid";
}

inline void check_route_args(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& bias) {
  STEPLAW_CHECK(logits.dim() == 2 && at::isFloatingType(logits.scalar_type()), "router logits of shape ",
                logits.sizes(), " and dtype ", dtype_name(logits.scalar_type()),
                ": expected a float tensor [tokens, experts]");
  const int64_t experts = logits.size(1);
  STEPLAW_CHECK(k >= 1 && k <= experts, "top_k=", k, ": expected 1 <= top_k <= number of experts (", experts, ")");
  STEPLAW_CHECK(experts <= INT32_MAX, "number of experts ", experts, ": expected at most 2^31-1");
  if (bias.has_value()) {
    STEPLAW_CHECK(bias->dim() == 1 && bias->size(0) == experts, "expert bias of shape ", bias->sizes(),
                  ": expected [", experts, "]");
    STEPLAW_CHECK(bias->device() == logits.device(), "expert bias on ", bias->device(), ": expected it on ",
                  logits.device(), " like the logits");
  }
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts,
                               int64_t pad_multiple, int64_t capacity) {
  STEPLAW_CHECK(x.dim() == 2, "tokens of shape ", x.sizes(), ": expected [tokens, hidden]");
  STEPLAW_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0), "expert ids of shape ",
                expert_ids.sizes(), ": expected [", x.size(0), ", top_k] to match the tokens");
  STEPLAW_CHECK(expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong,
                "expert ids of dtype ", dtype_name(expert_ids.scalar_type()),
                ": expected torch.int32 or torch.int64");
  STEPLAW_CHECK(num_experts >= 1 && num_experts <= INT32_MAX && expert_ids.size(1) >= 1 &&
                    expert_ids.size(1) <= num_experts,
                "top_k=", expert_ids.size(1), " with num_experts=", num_experts,
                ": expected 1 <= top_k <= num_experts <= 2^31-1");
  STEPLAW_CHECK(pad_multiple >= 1 && capacity >= 0, "pad_multiple=", pad_multiple, ", capacity=", capacity,
                ": expected pad_multiple >= 1 and capacity >= 0");
  STEPLAW_CHECK(expert_ids.device() == x.device(), "expert ids on ", expert_ids.device(), ": expected them on ",
                x.device(), " like the tokens");
}

// The message for an expert id outside [0, E) (checked on the host by the CPU kernel and
// the reference, by a device assert on CUDA, where a check would wait for the GPU).
inline void check_expert_id(bool ok, int64_t expert_id, int64_t num_experts) {
  STEPLAW_CHECK(ok, "expert id ", expert_id, " is out of range: expected ids in [0, ", num_experts, ")");
}

inline void check_unpermute_args(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& src_index,
                                 const at::Tensor& weights) {
  STEPLAW_CHECK(y.dim() == 2 && row_map.dim() == 2 && src_index.dim() == 1 && src_index.size(0) == y.size(0),
                "expert outputs ", y.sizes(), ", row map ", row_map.sizes(), ", src index ", src_index.sizes(),
                ": expected [rows, hidden], [tokens, top_k] and [rows] from moe_permute");
  STEPLAW_CHECK(weights.sizes() == row_map.sizes(), "combine weights of shape ", weights.sizes(), ": expected ",
                row_map.sizes(), " like the row map");
  STEPLAW_CHECK(row_map.scalar_type() == at::kLong && src_index.scalar_type() == at::kLong,
                "row map and src index of dtypes ", dtype_name(row_map.scalar_type()), ", ",
                dtype_name(src_index.scalar_type()), ": expected torch.int64 as moe_permute returns them");
  STEPLAW_CHECK(at::isFloatingType(weights.scalar_type()), "combine weights of dtype ",
                dtype_name(weights.scalar_type()), ": expected a float dtype");
  STEPLAW_CHECK(row_map.device() == y.device() && src_index.device() == y.device() && weights.device() == y.device(),
                "expert outputs, row map, src index and weights: expected all on ", y.device());
}

// The message for a row map entry past the rows of y (raised by the CPU kernel and the
// reference; a device assert on CUDA).
inline void check_row(bool ok, int64_t rows) {
  STEPLAW_CHECK(ok, "row map holds a row >= ", rows, ": expected rows of the permuted tensor");
}

inline void check_permute_backward_args(const at::Tensor& grad_permuted, const at::Tensor& row_map) {
  STEPLAW_CHECK(grad_permuted.dim() == 2 && row_map.dim() == 2 && row_map.scalar_type() == at::kLong,
                "grad of shape ", grad_permuted.sizes(), " and row map ", row_map.sizes(),
                ": expected [rows, hidden] and an int64 [tokens, top_k]");
  STEPLAW_CHECK(row_map.device() == grad_permuted.device(), "row map on ", row_map.device(), ": expected it on ",
                grad_permuted.device(), " like the grad");
}

inline void check_unpermute_backward_args(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& row_map,
                                          const at::Tensor& src_index, const at::Tensor& weights) {
  check_unpermute_args(y, row_map, src_index, weights);
  STEPLAW_CHECK(grad_out.dim() == 2 && grad_out.size(0) == row_map.size(0) && grad_out.size(1) == y.size(1) &&
                    grad_out.scalar_type() == y.scalar_type() && grad_out.device() == y.device(),
                "grad of shape ", grad_out.sizes(), " and dtype ", dtype_name(grad_out.scalar_type()),
                ": expected [", row_map.size(0), ", ", y.size(1), "] of dtype ", dtype_name(y.scalar_type()),
                " on ", y.device());
}

}  // namespace moe
}  // namespace steplaw
