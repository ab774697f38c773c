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
