// The CPU forward and backward of srn_fast.ops.wide_linear (y = x W^T + b for few rows and many outputs; see
// srn_fast/ops/wide_linear.py and wide_linear.cpp).
#pragma once

#include <torch/extension.h>

namespace srn {

// x [M, K], weight [O, K], bias [O] (or a [0] placeholder: none), float32 or float64, CPU. Writes out [M, O] =
// x weight^T + bias (allocated by the Python side).
void wide_linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor out);

// grad [M, O], x [M, K], weight [O, K] (float32 or float64, CPU). Writes grad_x [M, K] = grad weight and
// grad_weight [O, K] = grad^T x into the slots that are not [0] placeholders (allocated by the Python side).
void wide_linear_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::Tensor grad_x,
                          at::Tensor grad_weight);

}  // namespace srn
