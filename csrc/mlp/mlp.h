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

// The Python side (srn_fast/ops/mlp.py, a torch.library custom op) allocates every output from one shape
// function (srn_fast/ops/shapes.py) that its fake kernel shares; these entry points check and fill them.
// A tensor of shape [0] in an output slot means "not kept" / "not needed".
//
// Forward: writes out [B, N, C_L]. With save, also what backward needs, per layer l:
//   CPU tiles: acts[l] [B, N, C_l] = xhat_l for norm layers, the output for plain hidden layers ([0] for a plain
//              last layer: backward does not need it); rstd[l] [B, N] for norm layers ([0] otherwise);
//   batched path (CUDA, or tile_rows == 0): acts[l] = the pre-norm z_l [B, N, C_l]; rstd[l] [0].
// Without save every acts/rstd entry is [0] (backward then recomputes the activations tile by tile). dtype: x's,
// but bf16 for a norm layer's xhat on the CPU tiles with mm_dtype 1 (checks.h xhat_dtype, ops/shapes.py).
void mlp_forward(const at::Tensor& x, const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                 const std::vector<c10::optional<at::Tensor>>& gamma, const std::vector<c10::optional<at::Tensor>>& beta,
                 const std::vector<bool>& norm, bool save, int64_t tile_rows, int64_t mm_dtype, at::Tensor out,
                 std::vector<at::Tensor> acts, std::vector<at::Tensor> rstd);

// Backward. v_out [B, N, C_L]; acts/rstd: what mlp_forward saved (all [0]: recompute). Writes the gradients into
// v_x [B, N, C_0] and v_W[l], v_b[l], v_gamma[l], v_beta[l] (shaped like their parameters: per scene stays per
// scene); an output of shape [0] is not computed.
void mlp_backward(const at::Tensor& v_out, const at::Tensor& x, const std::vector<at::Tensor>& acts,
                  const std::vector<at::Tensor>& rstd, const std::vector<at::Tensor>& W,
                  const std::vector<at::Tensor>& b, const std::vector<c10::optional<at::Tensor>>& gamma,
                  const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm, int64_t tile_rows,
                  int64_t mm_dtype, at::Tensor v_x, std::vector<at::Tensor> v_W, std::vector<at::Tensor> v_b,
                  std::vector<at::Tensor> v_gamma, std::vector<at::Tensor> v_beta);

}  // namespace srn
