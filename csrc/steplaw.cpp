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
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(steplaw, m) {
  // ---- fused AdamW (csrc/adamw) ----
  // One in-place AdamW step over many parameters of any number of param groups: every
  // list holds one entry per parameter; group_index[i] picks parameter i's row of
  // `hparams` (float64 [groups, 6]: lr, beta1, beta2, weight_decay, eps, maximize), so all
  // groups go in one call and one launch per dtype, and a tensor lr is copied into the
  // table on the device (no host sync). `steps` (0-d float32 per param) are incremented
  // by the op and read on the device. max_exp_avg_sqs is empty unless amsgrad and
  // master_params empty unless fp32 master weights are kept; both are whole-call flags
  // because a list entry cannot be "absent" in a schema with alias annotations. Grads
  // are read only (GradScaler's scale is divided out in registers, never written back).
  // grad_scale/found_inf are GradScaler's tensors; found_inf != 0 makes the call a no-op.
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor(f!)[] steps, Tensor hparams, int[] group_index, bool amsgrad, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // ---- MoE token dispatch (csrc/moe) ----
}
