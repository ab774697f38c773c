// Op schemas of the steplaw extension, all in one place, and the (empty) Python
// module init. Kernels register their implementations next to their code with
// TORCH_LIBRARY_IMPL(steplaw, CPU|CUDA, m); the Python side (steplaw/ops) adds
// fake (meta) kernels, autograd and the pure-PyTorch reference.
//
// The module is built against Python's limited API and holds no Python bindings:
// importing steplaw._C only loads this shared library, which runs the static
// registrations below (the pattern of pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "steplaw kernels; use them through torch.ops.steplaw", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef STEPLAW_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // Whether this build compiled the CUDA kernels (independent of a GPU being visible).
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(steplaw, m) {
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
  // pad_multiple) with a capacity (capacity 0 = dropless).
  m.def("moe_route(Tensor logits, int k, str score_func, bool renormalize, Tensor? bias) -> (Tensor weights, Tensor expert_ids, Tensor counts)");
  m.def("moe_permute(Tensor x, Tensor expert_ids, int num_experts, int pad_multiple, int capacity) -> (Tensor permuted, Tensor row_map, Tensor src_index, Tensor offsets, Tensor dropped)");
  m.def("moe_permute_backward(Tensor grad_permuted, Tensor row_map) -> Tensor");
  m.def("moe_unpermute(Tensor y, Tensor row_map, Tensor src_index, Tensor weights) -> Tensor");
  m.def("moe_unpermute_backward(Tensor grad_out, Tensor y, Tensor row_map, Tensor src_index, Tensor weights) -> (Tensor grad_y, Tensor grad_weights)");
}
