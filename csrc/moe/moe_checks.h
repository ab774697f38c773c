// Argument checks of the MoE dispatch ops, shared by the CPU and CUDA kernels so both
// reject the same inputs with the same one-sentence messages (as steplaw/ops/moe.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "moe/moe_index.h"

namespace steplaw {
namespace moe {

inline bool parse_score_func(std::string_view score_func) {
  TORCH_CHECK(score_func == "softmax" || score_func == "sigmoid", "score_func='", std::string(score_func),
              "': expected one of ('softmax', 'sigmoid')");
  return score_func == "sigmoid";
}

inline void check_route_args(const at::Tensor& logits, int64_t k, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(logits.dim() == 2 && at::isFloatingType(logits.scalar_type()), "router logits of shape ",
              logits.sizes(), " and dtype ", logits.scalar_type(), ": expected a float tensor [tokens, experts]");
  const int64_t experts = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= experts, "top_k=", k, ": expected 1 <= top_k <= number of experts (", experts, ")");
  TORCH_CHECK(experts <= INT32_MAX, "number of experts ", experts, ": expected at most 2^31-1");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == experts, "expert bias of shape ", bias->sizes(),
                ": expected [", experts, "]");
    TORCH_CHECK(bias->device() == logits.device(), "expert bias on ", bias->device(), ": expected it on ",
                logits.device(), " like the logits");
  }
}

inline void check_permute_args(const at::Tensor& x, const at::Tensor& expert_ids, int64_t num_experts,
                               int64_t pad_multiple, int64_t capacity) {
  TORCH_CHECK(x.dim() == 2, "tokens of shape ", x.sizes(), ": expected [tokens, hidden]");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0), "expert ids of shape ", expert_ids.sizes(),
              ": expected [", x.size(0), ", top_k] to match the tokens");
  TORCH_CHECK(expert_ids.scalar_type() == at::kInt, "expert ids of dtype ", expert_ids.scalar_type(),
              ": expected torch.int32");
  TORCH_CHECK(num_experts >= 1 && expert_ids.size(1) >= 1 && expert_ids.size(1) <= num_experts, "top_k=",
              expert_ids.size(1), " with num_experts=", num_experts, ": expected 1 <= top_k <= num_experts");
  TORCH_CHECK(pad_multiple >= 1 && capacity >= 0, "pad_multiple=", pad_multiple, ", capacity=", capacity,
              ": expected pad_multiple >= 1 and capacity >= 0");
  TORCH_CHECK(expert_ids.device() == x.device(), "expert ids on ", expert_ids.device(), ": expected them on ",
              x.device(), " like the tokens");
}

inline void check_unpermute_args(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& src_index,
                                 const at::Tensor& weights) {
  TORCH_CHECK(y.dim() == 2 && row_map.dim() == 2 && src_index.dim() == 1 && src_index.size(0) == y.size(0),
              "expert outputs ", y.sizes(), ", row map ", row_map.sizes(), ", src index ", src_index.sizes(),
              ": expected [rows, hidden], [tokens, top_k] and [rows] from moe_permute");
  TORCH_CHECK(weights.sizes() == row_map.sizes(), "combine weights of shape ", weights.sizes(), ": expected ",
              row_map.sizes(), " like the row map");
  TORCH_CHECK(row_map.scalar_type() == at::kLong && src_index.scalar_type() == at::kLong,
              "row map and src index of dtypes ", row_map.scalar_type(), ", ", src_index.scalar_type(),
              ": expected torch.int64 as moe_permute returns them");
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "combine weights of dtype ", weights.scalar_type(),
              ": expected a float dtype");
  TORCH_CHECK(row_map.device() == y.device() && src_index.device() == y.device() && weights.device() == y.device(),
              "expert outputs, row map, src index and weights: expected all on ", y.device());
}

inline void check_grad_rows(const at::Tensor& grad, const at::Tensor& like, const char* what) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) == like.size(1) && grad.scalar_type() == like.scalar_type() &&
                  grad.device() == like.device(),
              what, " of shape ", grad.sizes(), " and dtype ", grad.scalar_type(), ": expected [*, ", like.size(1),
              "] of dtype ", like.scalar_type(), " on ", like.device());
}

}  // namespace moe
}  // namespace steplaw
