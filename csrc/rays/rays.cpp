// lift_rays: torch-facing checks, allocation and the CPU loop; CUDA via rays_kernel.cu.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"
#include "common/srn_math.h"
#include "rays/rays.h"

namespace srn {

namespace {

template <typename T>
void lift_rays_cpu(int64_t B, int64_t N, const T* uv, const T* K, const T* c2w, const T* depth0, T* x0,
                   T* dir) {
  at::parallel_for(0, B * N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / N;
      const T* k = K + 4 * b;
      lift_ray<T>(uv[2 * i], uv[2 * i + 1], k[0], k[1], k[2], k[3], c2w + 12 * b, depth0[i], x0 + 3 * i,
                  dir + 3 * i);
    }
  });
}

}  // namespace

// uv [B, N, 2], K [B, 4] (fx, fy, cx, cy), c2w [B, 3, 4], depth0 [B, N]
// writes x0 [B, N, 3], dir [B, N, 3] (allocated by the Python side, srn_fast/ops/rays.py)
void lift_rays(const at::Tensor& uv_, const at::Tensor& K_, const at::Tensor& c2w_, const at::Tensor& depth0_,
               at::Tensor x0, at::Tensor dir) {
  const char* op = "srn_fast.ops.lift_rays";
  check_float(op, "uv", uv_);
  check_shape(op, "uv", uv_, {-1, -1, 2}, "[B, N, 2]");
  const int64_t B = uv_.size(0), N = uv_.size(1);
  check_shape(op, "K", K_, {B, 4}, "[B, 4] (fx, fy, cx, cy)");
  check_shape(op, "c2w", c2w_, {B, 3, 4}, "[B, 3, 4]");
  check_shape(op, "depth0", depth0_, {B, N}, "[B, N]");
  check_same(op, "K", K_, uv_, "uv");
  check_same(op, "c2w", c2w_, uv_, "uv");
  check_same(op, "depth0", depth0_, uv_, "uv");
  const auto uv = uv_.contiguous(), K = K_.contiguous(), c2w = c2w_.contiguous(), depth0 = depth0_.contiguous();
  check_out(op, "x0", x0, {B, N, 3}, uv);
  check_out(op, "dir", dir, {B, N, 3}, uv);
  if (uv.is_cuda()) {
#ifdef SRN_WITH_CUDA
    c10::DeviceGuard guard(uv.device());
    RaysParams p{B, N, uv.data_ptr<float>(), K.data_ptr<float>(), c2w.data_ptr<float>(),
                 depth0.data_ptr<float>(), x0.data_ptr<float>(), dir.data_ptr<float>()};
    lift_rays_cuda(p, current_cuda_stream(uv.device()));
#else
    TORCH_CHECK(false, op, ": srn_fast was built without CUDA; reinstall on a machine with nvcc and a CUDA torch");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(uv.scalar_type(), "lift_rays", [&] {
      lift_rays_cpu<scalar_t>(B, N, uv.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(), c2w.data_ptr<scalar_t>(),
                              depth0.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), dir.data_ptr<scalar_t>());
    });
  }
}

void register_rays(pybind11::module& m) {
  namespace py = pybind11;
  m.def("lift_rays", &lift_rays, "Lift pixels to world rays: (uv, K, c2w, depth0) -> x0, dir (written)", py::arg("uv"),
        py::arg("K"), py::arg("c2w"), py::arg("depth0"), py::arg("x0"), py::arg("dir"));
}

}  // namespace srn
