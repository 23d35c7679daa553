// Fused element-wise stages of the MLP and the march, on CPU (loops over srn_math.h) or CUDA (kernels in
// elementwise_kernels.cu over the same srn_math.h functions). Matmuls stay in ATen; these are what sits between
// them. All tensors contiguous; M = rows (rays), C = channels, H = LSTM width.
#pragma once

#include <torch/extension.h>

#include "common/elementwise_cuda.h"

namespace srn {

// y = ReLU(LayerNorm(z) * gamma + beta) row-wise.     z [M, C]; gamma, beta [C] or undefined. Returns y [M, C].
at::Tensor ln_relu_forward(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta);

// VJP of ln_relu_forward. Returns v_z [M, C]; adds into v_gamma / v_beta [C] when they are defined.
at::Tensor ln_relu_backward(const at::Tensor& z, const at::Tensor& v_y, const at::Tensor& gamma,
                            const at::Tensor& beta, at::Tensor v_gamma, at::Tensor v_beta);

// One LSTM cell + step update per row (srn_math.h's lstm_step_row). pre [M, 4H] gate pre-activations without the
// bias is overwritten with the activated gates; bias [4H] (b_ih + b_hh); c_prev [M, H]; x, dirs [M, 3]; w_out [H];
// b_out [1]. Writes c, h [M, H] and x_new = x + dirs * (h . w_out + b_out) [M, 3].
void lstm_step_forward(at::Tensor& pre, const at::Tensor& bias, const at::Tensor& c_prev, const at::Tensor& x,
                       const at::Tensor& dirs, const at::Tensor& w_out, const at::Tensor& b_out, at::Tensor& c,
                       at::Tensor& h, at::Tensor& x_new);

// VJP of lstm_step_forward for one step, walking backwards.
//   gates [M, 4H] activated gates; c_prev, c, h [M, H] (state before / after the step); dirs, v_x [M, 3]
//   (v_x = gradient of x_new); v_h [M, H] gradient reaching h from the next step (in), v_c [M, H] likewise
//   for c (in; overwritten with the gradient of c_prev).
// Writes v_pre [M, 4H], v_s [M] (gradient of the step length, for the step head's weight gradient), and adds
// v_x * s into v_dirs [M, 3]. The total gradient of h is clamped to [-clamp, clamp] when clamp >= 0.
void lstm_step_backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& h,
                        const at::Tensor& dirs, const at::Tensor& v_x, const at::Tensor& v_h, at::Tensor& v_c,
                        const at::Tensor& w_out, const at::Tensor& b_out, double clamp, at::Tensor& v_pre,
                        at::Tensor& v_s, at::Tensor& v_dirs);


}  // namespace srn
