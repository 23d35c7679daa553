// Forward and backward of a small MLP (Linear -> LayerNorm (+affine) -> ReLU per layer, last layer optionally
// plain linear) on one tile of rays, shared by the fused MLP op (csrc/mlp) and the fused march (csrc/march),
// on the CPU and on CUDA.
//
// A tile is S scenes x R rows. On the CPU a tile is S = 1 scene and R ~ 128 rays that stay in cache for every
// layer (the op loops over tiles in parallel); on CUDA one "tile" is the whole batch (S = B, R = N) and every
// matmul is a strided-batched GEMM. Matmuls go through ATen (MKL/oneDNN on the CPU, cuBLAS on CUDA); the
// LayerNorm/ReLU stages are the fused element-wise kernels of elementwise.h.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace srn {

struct MLPWeights {
  std::vector<at::Tensor> W;      // per layer: [S, C_out, C_in] per scene, or [C_out, C_in] shared
  std::vector<at::Tensor> W_mm;   // the same weights in the matmul dtype (e.g. bf16); same as W when none
  std::vector<at::Tensor> b;      // [S, C_out] or [C_out]
  std::vector<at::Tensor> gamma;  // [C_out] LayerNorm weight, or undefined (no affine / no norm)
  std::vector<at::Tensor> beta;   // [C_out] LayerNorm bias, or undefined
  std::vector<bool> norm;         // false: plain linear layer

  size_t size() const { return W.size(); }
  bool per_scene(size_t l) const { return W[l].dim() == 3; }
  // The weights of scenes [s, s + n) (shared weights are returned unchanged).
  MLPWeights scenes(int64_t s, int64_t n) const;
};

// Gradient accumulators shaped like MLPWeights' tensors (per scene sliced like the tile); undefined = not needed.
struct MLPGrads {
  std::vector<at::Tensor> W, b, gamma, beta;
  MLPGrads scenes(int64_t s, int64_t n, const MLPWeights& w) const;
};

// x [S, R, C_0] -> output [S, R, C_L]. If zs is given it receives every layer's pre-norm activation z_l
// [S, R, C_l]; if ys is given it receives every layer's output (the next layer's input) [S, R, C_l].
at::Tensor mlp_tile_forward(const MLPWeights& w, const at::Tensor& x, std::vector<at::Tensor>* zs = nullptr,
                            std::vector<at::Tensor>* ys = nullptr);

// Backward of mlp_tile_forward given its zs (and ys, or an empty vector to recompute them from zs).
// v_out [S, R, C_L]. Adds the weight/bias/LayerNorm-affine gradients into the defined entries of g.
// Returns the gradient of x [S, R, C_0] when need_vx, else an undefined tensor.
at::Tensor mlp_tile_backward(const MLPWeights& w, const at::Tensor& x, const std::vector<at::Tensor>& zs,
                             const std::vector<at::Tensor>& ys, const at::Tensor& v_out, MLPGrads& g, bool need_vx);

// Builds MLPWeights from the op arguments, checking shapes, dtypes and devices (messages name the argument).
MLPWeights make_mlp_weights(const char* op, const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                            const std::vector<c10::optional<at::Tensor>>& gamma,
                            const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                            const at::Tensor& x_like, int64_t B, int64_t C_in, int64_t mm_dtype);

}  // namespace srn
