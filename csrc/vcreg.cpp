// The Python module vcreg_kernels._C. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations of csrc/*.cpp and csrc/cuda/*.cu for the op schemas defined once in
// vcreg_kernels/_ops.py; it exposes no Python functions of its own.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
