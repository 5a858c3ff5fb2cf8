// `import flare_kernels._C` loads this library; its static initializers (ops.cpp) register the
// operators under torch.ops.flare_kernels_cpu. Import torch first: the library links libtorch.
#include <Python.h>

static struct PyModuleDef flare_module = {
    PyModuleDef_HEAD_INIT, "_C", "flare-kernels native CPU kernels (operators in torch.ops.flare_kernels_cpu)", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&flare_module); }
