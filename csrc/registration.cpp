// The op schemas (one TORCH_LIBRARY for every backend) and the CPU implementations behind them.
// The CUDA implementations register themselves in cuda_kernels.cu when the extension is built with CUDA.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(megatrain, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor gate_up) -> Tensor");
  m.def("bias_gelu_fwd(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias) -> (Tensor, Tensor)");
  m.def("ce_stats(Tensor logits, Tensor labels, int vocab_start, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ce_grad(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor grad_rows, int vocab_start, int ignore_index, "
        "float smoothing, int vocab_total, bool inplace) -> Tensor");
  m.def("decode_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(megatrain, CPU, m) {
  m.impl("rms_norm_fwd", &megatrain::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &megatrain::rms_norm_bwd_cpu);
  m.impl("layer_norm_fwd", &megatrain::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &megatrain::layer_norm_bwd_cpu);
  m.impl("rope", &megatrain::rope_cpu);
  m.impl("swiglu_fwd", &megatrain::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &megatrain::swiglu_bwd_cpu);
  m.impl("bias_gelu_fwd", &megatrain::bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &megatrain::bias_gelu_bwd_cpu);
  m.impl("ce_stats", &megatrain::ce_stats_cpu);
  m.impl("ce_grad", &megatrain::ce_grad_cpu);
  m.impl("decode_linear", &megatrain::decode_linear_cpu);
}

// An empty Python module named megatrain._C: importing it loads this library and runs the registrations
// above (plain C API: no pybind11/torch/extension.h, which would double the build time).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "megatrain fused ops (see torch.ops.megatrain)", -1, nullptr};
  return PyModule_Create(&def);
}
