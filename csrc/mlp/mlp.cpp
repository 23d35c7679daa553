// srn_fast.ops.mlp: a stack of Linear -> LayerNorm(+affine) -> ReLU layers on points with per-scene or shared
// weights, forward and hand-written backward. CPU: tiles of rays that stay in cache through every layer, in
// parallel over tiles; CUDA: the whole batch as one tile (batched GEMMs + fused LayerNorm/ReLU kernels).
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"
#include "common/mlp_tile.h"

namespace srn {

namespace {

constexpr const char* kOp = "srn_fast.ops.mlp";

struct Tiles {
  int64_t B, N, R, per_scene;
  int64_t count() const { return B * per_scene; }
  int64_t scene(int64_t t) const { return t / per_scene; }
  int64_t row0(int64_t t) const { return (t % per_scene) * R; }
  int64_t rows(int64_t t) const { return std::min(R, N - row0(t)); }
};

Tiles make_tiles(int64_t B, int64_t N, int64_t R) {
  R = std::max<int64_t>(1, R);
  return Tiles{B, N, R, (N + R - 1) / R};
}

// rows [r0, r0 + n) of scene b of a [B, N, C] tensor, as a [1, n, C] view
at::Tensor tile_of(const at::Tensor& t, int64_t b, int64_t r0, int64_t n) {
  return t.select(0, b).narrow(0, r0, n).unsqueeze(0);
}

void check_x(const at::Tensor& x) {
  check_float(kOp, "x", x);
  TORCH_CHECK(x.dim() == 3, kOp, ": x must have shape [B, N, C_in], got ", shape_str(x));
}

}  // namespace

// x [B, N, C_0]; weights: per layer [B, C_out, C_in] or [C_out, C_in]; biases [B, C_out] or [C_out];
// ln weights / biases [C_out] or None; norm flags. save: return the pre-norm activations for backward.
// mm_dtype: 0 = the input dtype, 1 = bfloat16 matmuls. Returns [out [B, N, C_L], z_0, ..., z_{L-1} (if save)].
std::vector<at::Tensor> mlp_forward(const at::Tensor& x_, const std::vector<at::Tensor>& W,
                                    const std::vector<at::Tensor>& b,
                                    const std::vector<c10::optional<at::Tensor>>& gamma,
                                    const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                                    bool save, int64_t tile_rows, int64_t mm_dtype) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const MLPWeights w = make_mlp_weights(kOp, W, b, gamma, beta, norm, x, B, x.size(2), mm_dtype);
  const size_t L = w.size();
  std::vector<at::Tensor> result;
  if (x.is_cuda()) {
    c10::DeviceGuard guard(x.device());
    std::vector<at::Tensor> zs;
    result.push_back(mlp_tile_forward(w, x, save ? &zs : nullptr));
    for (auto& z : zs) result.push_back(z);
    return result;
  }
  auto out = at::empty({B, N, w.W[L - 1].size(-2)}, x.options());
  std::vector<at::Tensor> zs_full;
  if (save) {
    for (size_t l = 0; l < L; ++l) zs_full.push_back(at::empty({B, N, w.W[l].size(-2)}, x.options()));
  }
  const Tiles tiles = make_tiles(B, N, tile_rows);
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = tiles.scene(t), r0 = tiles.row0(t), n = tiles.rows(t);
      if (n <= 0) continue;
      std::vector<at::Tensor> zs;
      at::Tensor y = mlp_tile_forward(w.scenes(s, 1), tile_of(x, s, r0, n), save ? &zs : nullptr);
      tile_of(out, s, r0, n).copy_(y);
      for (size_t l = 0; l < zs.size(); ++l) tile_of(zs_full[l], s, r0, n).copy_(zs[l]);
    }
  });
  result.push_back(out);
  for (auto& z : zs_full) result.push_back(z);
  return result;
}

// Backward of mlp_forward. v_out [B, N, C_L]; zs: the saved pre-norm activations.
// needs: [x, weights, biases, ln weights, ln biases]. Returns [v_x, v_W..., v_b..., v_gamma..., v_beta...]
// (undefined where not needed).
std::vector<at::Tensor> mlp_backward(const at::Tensor& v_out_, const at::Tensor& x_, const std::vector<at::Tensor>& zs,
                                     const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                                     const std::vector<c10::optional<at::Tensor>>& gamma,
                                     const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                                     const std::vector<bool>& needs, int64_t tile_rows) {
  check_x(x_);
  const at::Tensor x = x_.contiguous(), v_out = v_out_.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const MLPWeights w = make_mlp_weights(kOp, W, b, gamma, beta, norm, x, B, x.size(2), 0);
  const size_t L = w.size();
  TORCH_CHECK(zs.size() == L, kOp, ": backward needs the ", L, " saved activations, got ", zs.size());
  TORCH_CHECK(needs.size() == 5, kOp, ": needs must have 5 flags");
  const bool need_x = needs[0], need_W = needs[1], need_b = needs[2], need_g = needs[3], need_be = needs[4];
  const bool on_cuda = x.is_cuda();
  const int64_t T = on_cuda ? 1 : at::get_num_threads();

  // Accumulators: [T, ...] per thread on the CPU (summed at the end), the gradient itself on CUDA.
  auto acc = [&](const at::Tensor& like, bool need) {
    if (!need) return at::Tensor();
    std::vector<int64_t> shape{T};
    for (auto s : like.sizes()) shape.push_back(s);
    return at::zeros(shape, like.options());
  };
  std::vector<at::Tensor> gW(L), gb(L), gg(L), gbe(L);
  for (size_t l = 0; l < L; ++l) {
    gW[l] = acc(w.W[l], need_W);
    gb[l] = acc(w.b[l], need_b);
    if (w.gamma[l].defined()) {
      gg[l] = acc(w.gamma[l], need_g);
      gbe[l] = acc(w.beta[l], need_be);
    }
  }
  auto thread_grads = [&](int64_t tid) {
    MLPGrads g;
    for (size_t l = 0; l < L; ++l) {
      g.W.push_back(gW[l].defined() ? gW[l][tid] : at::Tensor());
      g.b.push_back(gb[l].defined() ? gb[l][tid] : at::Tensor());
      g.gamma.push_back(gg[l].defined() ? gg[l][tid] : at::Tensor());
      g.beta.push_back(gbe[l].defined() ? gbe[l][tid] : at::Tensor());
    }
    return g;
  };
  at::Tensor v_x;
  if (on_cuda) {
    c10::DeviceGuard guard(x.device());
    MLPGrads g = thread_grads(0);
    v_x = mlp_tile_backward(w, x, zs, {}, v_out, g, need_x);
  } else {
    if (need_x) v_x = at::empty_like(x);
    std::vector<at::Tensor> zc;
    for (const auto& z : zs) zc.push_back(z.contiguous());
    const Tiles tiles = make_tiles(B, N, tile_rows);
    at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
      MLPGrads g_all = thread_grads(at::get_thread_num());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t s = tiles.scene(t), r0 = tiles.row0(t), n = tiles.rows(t);
        if (n <= 0) continue;
        std::vector<at::Tensor> zt;
        for (size_t l = 0; l < L; ++l) zt.push_back(tile_of(zc[l], s, r0, n));
        MLPGrads g = g_all.scenes(s, 1, w);
        at::Tensor vx = mlp_tile_backward(w.scenes(s, 1), tile_of(x, s, r0, n), zt, {}, tile_of(v_out, s, r0, n),
                                          g, need_x);
        if (need_x) tile_of(v_x, s, r0, n).copy_(vx);
      }
    });
  }
  std::vector<at::Tensor> out{v_x};
  auto reduce = [](const at::Tensor& t) { return t.defined() ? t.sum(0) : t; };
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gW[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gb[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gg[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gbe[l]));
  return out;
}

void register_mlp(pybind11::module& m) {
  m.def("mlp_forward", &mlp_forward, "Fused MLP forward", pybind11::arg("x"), pybind11::arg("weights"),
        pybind11::arg("biases"), pybind11::arg("ln_weights"), pybind11::arg("ln_biases"), pybind11::arg("norm"),
        pybind11::arg("save"), pybind11::arg("tile_rows") = 128, pybind11::arg("mm_dtype") = 0);
  m.def("mlp_backward", &mlp_backward, "Fused MLP backward", pybind11::arg("v_out"), pybind11::arg("x"),
        pybind11::arg("zs"), pybind11::arg("weights"), pybind11::arg("biases"), pybind11::arg("ln_weights"),
        pybind11::arg("ln_biases"), pybind11::arg("norm"), pybind11::arg("needs"), pybind11::arg("tile_rows") = 128);
}

}  // namespace srn
