// The Python module srn_fast._C: each op folder contributes a register_* function.
#include <torch/extension.h>

namespace srn {
void register_rays(pybind11::module& m);
void register_mlp(pybind11::module& m);
void register_march(pybind11::module& m);
void register_wide_linear(pybind11::module& m);
}  // namespace srn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "srn_fast fused kernels (CPU, and CUDA when built with it)";
#ifdef SRN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  srn::register_rays(m);
  srn::register_mlp(m);
  srn::register_march(m);
  srn::register_wide_linear(m);
}
