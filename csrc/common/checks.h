// Input checks shared by the torch-facing .cpp files. Messages name the argument and what was
// expected, so a user sees e.g. "srn_fast.ops.lift_rays: uv must have shape [B, N, 2], got [4, 3]".
#pragma once

#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

namespace srn {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

#define SRN_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

// Checks the rank and the fixed sizes of a tensor; -1 in `sizes` accepts any size.
inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        const std::vector<int64_t>& sizes, const char* expected) {
  bool ok = t.dim() == static_cast<int64_t>(sizes.size());
  for (size_t i = 0; ok && i < sizes.size(); ++i) {
    if (sizes[i] >= 0 && t.size(static_cast<int64_t>(i)) != sizes[i]) ok = false;
  }
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", expected, ", got ", shape_str(t));
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; they must be on the same device");
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() || t.scalar_type() == at::kFloat, op, ": ", name,
              " must be float32 on CUDA, got ", t.scalar_type());
}

// Output slots filled by the ops (allocated by the Python side): a tensor of shape [0] is a placeholder for an
// output that is not kept / not needed.
inline bool is_placeholder(const at::Tensor& t) { return !t.defined() || (t.dim() == 1 && t.size(0) == 0); }

// Checks an output slot: the expected shape, the dtype/device of `like`, contiguous.
// dtype: the expected scalar type when it is not like's.
inline void check_out(const char* op, const std::string& name, const at::Tensor& out, at::IntArrayRef sizes,
                      const at::Tensor& like, c10::optional<at::ScalarType> dtype = c10::nullopt) {
  const at::ScalarType want = dtype.value_or(like.scalar_type());
  TORCH_CHECK(out.defined() && out.sizes() == sizes, op, ": output ", name, " must have shape ", sizes, ", got ",
              out.defined() ? shape_str(out) : std::string("undefined"));
  TORCH_CHECK(out.scalar_type() == want && out.device() == like.device(), op, ": output ", name, " must be ", want,
              " on ", like.device());
  TORCH_CHECK(out.is_contiguous(), op, ": output ", name, " must be contiguous");
}

// The dtype of a saved activation: bf16 for a LayerNorm layer's xhat on the CPU tiles with bf16 matmuls (mm_dtype 1),
// else x's (srn_fast/ops/shapes.py, xhat_dtype).
inline at::ScalarType xhat_dtype(bool batched, int64_t mm_dtype, bool norm, const at::Tensor& x) {
  return !batched && mm_dtype == 1 && norm ? at::kBFloat16 : x.scalar_type();
}

// Sums per-thread accumulators [threads, ...] into `out` (a placeholder or undefined acc: nothing to do). On the CPU
// the slots are added in their order (the same bits every run) by every thread over its share of the elements; ATen's
// sum over dim 0 ran on one thread while the others waited.
inline void reduce_into(at::Tensor& out, const at::Tensor& acc) {
  if (is_placeholder(out) || !acc.defined()) return;
  if (acc.size(0) == 1) {
    out.copy_(acc[0]);
  } else if (acc.device().is_cpu() && acc.is_contiguous() && out.is_contiguous() &&
             acc.scalar_type() == out.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "reduce_into", [&] {
      const int64_t slots = acc.size(0), n = out.numel();
      const scalar_t* a = acc.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) o[i] = a[i];
        for (int64_t k = 1; k < slots; ++k) {
          const scalar_t* ak = a + k * n;
          for (int64_t i = i0; i < i1; ++i) o[i] += ak[i];
        }
      });
    });
  } else {
    at::sum_out(out, acc, {0});
  }
}

// The current CUDA stream as an opaque handle, without CUDA headers (design.md).
void* current_cuda_stream(const at::Device& device);

}  // namespace srn
