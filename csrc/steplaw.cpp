// The op schemas of the steplaw extension (csrc/op_schemas.h) and the (empty) Python
// module init. Kernels register their implementations next to their code with
// TORCH_LIBRARY_IMPL(steplaw, CPU|CUDA, m); the Python side (steplaw/ops) adds
// fake (meta) kernels, autograd and the pure-PyTorch reference.
//
// The module is built against Python's limited API and holds no Python bindings:
// importing steplaw._C only loads this shared library, which runs the static
// registrations below (the pattern of pytorch/extension-cpp).
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

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

TORCH_LIBRARY(steplaw, m) { steplaw::define_op_schemas(m); }
