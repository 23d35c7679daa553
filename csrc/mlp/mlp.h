// srn_fast.ops.mlp: extension entry points (Python side: srn_fast/ops/mlp.py).
//
// A stack of L layers on points x [B, N, C_0]:
//   z_l = a_{l-1} W_l^T + b_l;   a_l = ReLU(LayerNorm(z_l) * gamma_l + beta_l)  (norm_l), else a_l = z_l
// with a_{-1} = x. Per layer:
//   W_l     [B, C_l, C_{l-1}] per scene, or [C_l, C_{l-1}] shared
//   b_l     [B, C_l] or [C_l]
//   gamma_l, beta_l  [C_l] LayerNorm affine, or None (no affine; phi's layers)
//   norm_l  false: plain linear (the pixel generator's last layer)
// LayerNorm: biased variance, eps 1e-5. mm_dtype 1 = bf16 matmuls with float32 accumulation and LayerNorm
// (layers narrower than 16 stay float32).
//
// The CPU path is srn::tile (common/mlp_tile.h); the CUDA path is the tensor-level mlp_tile_forward/backward
// (batched cuBLAS GEMMs through ATen + the torch-free LayerNorm/ReLU kernels of common/elementwise_kernels.cu).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace srn {

// Returns [out [B, N, C_L], saved...]. save=true keeps what backward needs:
//   CPU: act_0..act_{L-1} [B, N, C_l] (xhat for norm layers, the output for plain layers), rstd_0.. [B, N];
//   CUDA: z_0..z_{L-1} [B, N, C_l] (pre-norm activations).
// save=false keeps nothing (backward then recomputes the activations tile by tile).
std::vector<at::Tensor> mlp_forward(const at::Tensor& x, const std::vector<at::Tensor>& W,
                                    const std::vector<at::Tensor>& b,
                                    const std::vector<c10::optional<at::Tensor>>& gamma,
                                    const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                                    bool save, int64_t tile_rows, int64_t mm_dtype);

// Backward. v_out [B, N, C_L]; saved: what mlp_forward returned after `out` (or empty: recompute).
// needs: [x, weights, biases, ln weights, ln biases]. Returns
// [v_x [B, N, C_0], v_W_0..v_W_{L-1}, v_b_0.., v_gamma_0.., v_beta_0..] shaped like their parameters
// (per scene stays per scene); undefined where not needed.
std::vector<at::Tensor> mlp_backward(const at::Tensor& v_out, const at::Tensor& x, const std::vector<at::Tensor>& saved,
                                     const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                                     const std::vector<c10::optional<at::Tensor>>& gamma,
                                     const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                                     const std::vector<bool>& needs, int64_t tile_rows, int64_t mm_dtype);

}  // namespace srn
