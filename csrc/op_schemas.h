// The op schemas of the steplaw extension, all in one place: csrc/steplaw.cpp defines them
// in the namespace steplaw, and the test-only CUDA emulation (tests/cuda_emu) defines the
// same schemas in its own namespace, steplaw_cuda_emu.
#pragma once

#include <torch/library.h>

namespace steplaw {

inline void define_op_schemas(torch::Library& m) {
  // ---- fused AdamW (csrc/adamw) ----
  // One in-place AdamW step over many parameters of any number of param groups: every
  // list holds one entry per parameter; group_index[i] picks parameter i's first row of
  // `hparams` (float64 [rows, 7]: lr, beta1, beta2, weight_decay, eps, maximize,
  // is_member), so all groups go in one call and one launch per dtype, and a tensor lr
  // is copied into the table on the device (no host sync). `members[i]` (default all 1)
  // is the number K of stacked members of parameter i: its leading dimension has size K
  // and member k = param[k] is updated with row group_index[i] + k; a member row
  // (is_member = 1) whose lr is exactly 0 is left untouched (csrc/adamw/adamw_math.h).
  // `steps` (0-d float32 per param) are incremented by the op and read on the device.
  // max_exp_avg_sqs is empty unless amsgrad and master_params empty unless fp32 master
  // weights are kept; both are whole-call flags because a list entry cannot be "absent"
  // in a schema with alias annotations. Grads are read only (GradScaler's scale is
  // divided out in registers, never written back). grad_scale/found_inf are
  // GradScaler's tensors; found_inf != 0 makes the call a no-op.
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor(f!)[] steps, Tensor hparams, int[] group_index, bool amsgrad, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, int[]? members=None) -> ()");

  // ---- MoE token dispatch (csrc/moe) ----
  // Semantics and shapes: steplaw/ops/moe.py. R (rows of `permuted`) follows from the
  // shapes alone: T*k, or T*k + E*(pad_multiple-1) when padded, or E*round_up(capacity,
  // pad_multiple) with a capacity (capacity 0 = dropless). expert_ids may be int32 or
  // int64 (range-checked before any narrowing). Bad arguments raise ValueError, with the
  // sentences of csrc/moe/moe_checks.h, from every implementation.
  // moe_route returns (expert_ids, weights, counts), the order of the wrapper moe_route.
  m.def("moe_route(Tensor logits, int k, str score_func, bool renormalize, Tensor? bias) -> (Tensor expert_ids, Tensor weights, Tensor counts)");
  m.def("moe_permute(Tensor x, Tensor expert_ids, int num_experts, int pad_multiple, int capacity) -> (Tensor permuted, Tensor row_map, Tensor src_index, Tensor offsets, Tensor dropped)");
  m.def("moe_permute_backward(Tensor grad_permuted, Tensor row_map) -> Tensor");
  m.def("moe_unpermute(Tensor y, Tensor row_map, Tensor src_index, Tensor weights) -> Tensor");
  m.def("moe_unpermute_backward(Tensor grad_out, Tensor y, Tensor row_map, Tensor src_index, Tensor weights) -> (Tensor grad_y, Tensor grad_weights)");
}

}  // namespace steplaw
