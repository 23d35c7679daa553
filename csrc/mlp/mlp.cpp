// srn_fast.ops.mlp: a stack of Linear -> LayerNorm(+affine) -> ReLU layers on points with per-scene or shared
// weights, forward and hand-written backward (see mlp.h for the arguments).
//   CPU: tiles of rays that stay in cache through every layer (srn::tile in common/mlp_tile.h), in parallel over
//        tiles; per-thread gradient accumulators summed at the end.
//   CUDA: the whole batch as one tile: batched GEMMs through ATen (cuBLAS) with the fused LayerNorm/ReLU kernels
//        of common/elementwise_kernels.cu between them.
#include "mlp/mlp.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"
#include "common/cpu_gemm.h"
#include "common/mlp_tile.h"

namespace srn {

namespace {

constexpr const char* kOp = "srn_fast.ops.mlp";
void check_x(const at::Tensor& x, int64_t mm_dtype) {
  check_float(kOp, "x", x);
  TORCH_CHECK(x.dim() == 3, kOp, ": x must have shape [B, N, C_in], got ", shape_str(x));
  TORCH_CHECK(mm_dtype == 0 || mm_dtype == 1, kOp, ": mm_dtype must be 0 (input dtype) or 1 (bfloat16)");
  TORCH_CHECK(mm_dtype == 0 || x.scalar_type() == at::kFloat, kOp,
              ": matmul_dtype=torch.bfloat16 needs float32 x, got ", x.scalar_type());
}

// act/rstd saved for backward on the CPU: per layer [B, N, C_l] / [B, N] (see tile::forward).
template <typename T>
void forward_cpu(const MLPWeights& w, const at::Tensor& x, at::Tensor& out, std::vector<at::Tensor>& act,
                 std::vector<at::Tensor>& rstd, int64_t tile_rows, bool bf16) {
  const int64_t B = x.size(0), N = x.size(1), C0 = x.size(2), CL = out.size(2);
  const int L = static_cast<int>(w.size());
  const tile::Grid tiles = tile::make_grid(B, N, tile_rows);
  const auto layers = tile::all_scene_layers<T>(w, B, bf16);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool save = !act.empty();
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    tile::Workspace<T> ws(layers[0].data(), L, tiles.R, false);
    std::vector<T*> ap(L), rp(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = tiles.scene(t), r0 = tiles.row0(t), n = tiles.rows(t);
      const int64_t row = s * N + r0;
      if (save) {
        for (int l = 0; l < L; ++l) {
          ap[l] = act[l].data_ptr<T>() + row * act[l].size(2);
          rp[l] = rstd[l].data_ptr<T>() + row;
        }
      }
      tile::forward<T>(layers[s].data(), L, n, xp + row * C0, C0, op + row * CL, CL, save ? ap.data() : nullptr,
                       save ? rp.data() : nullptr, ws);
    }
  });
}

template <typename T>
void backward_cpu(const MLPWeights& w, const at::Tensor& x, const at::Tensor& v_out, const std::vector<at::Tensor>& act,
                  const std::vector<at::Tensor>& rstd, at::Tensor& v_x, std::vector<at::Tensor>& gW,
                  std::vector<at::Tensor>& gb, std::vector<at::Tensor>& gg, std::vector<at::Tensor>& gbe,
                  int64_t tile_rows, bool bf16) {
  const int64_t B = x.size(0), N = x.size(1), C0 = x.size(2), CL = v_out.size(2);
  const int L = static_cast<int>(w.size());
  const tile::Grid tiles = tile::make_grid(B, N, tile_rows);
  const bool recompute = act.empty();
  const auto layers = tile::all_scene_layers<T>(w, B, bf16);
  const T* xp = x.data_ptr<T>();
  const T* vp = v_out.data_ptr<T>();
  T* vxp = v_x.defined() ? v_x.data_ptr<T>() : nullptr;
  at::parallel_for(0, tiles.count(), 1, [&](int64_t t0, int64_t t1) {
    const int64_t tid = at::get_thread_num();
    tile::Workspace<T> ws(layers[0].data(), L, tiles.R, recompute);
    std::vector<const T*> ap(L), rp(L);
    std::vector<tile::LayerGrad<T>> grads(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = tiles.scene(t), r0 = tiles.row0(t), n = tiles.rows(t);
      const int64_t row = s * N + r0;
      const auto& ly = layers[s];
      for (int l = 0; l < L; ++l) {
        const int64_t co = ly[l].cout;
        grads[l].weight = tile::acc_ptr<T>(gW[l], tid, s, co * ly[l].cin, w.per_scene(l));
        grads[l].bias = tile::acc_ptr<T>(gb[l], tid, s, co, w.b[l].dim() == 2);
        grads[l].ln_weight = tile::acc_ptr<T>(gg[l], tid, s, co, false);
        grads[l].ln_bias = tile::acc_ptr<T>(gbe[l], tid, s, co, false);
      }
      if (recompute) {
        // rerun the forward on this tile, keeping the activations in the workspace; its output is not needed
        // but must go somewhere: the third float buffer is free until backward() starts.
        tile::forward<T>(ly.data(), L, n, xp + row * C0, C0, ws.buf(2), CL, ws.act(), ws.rstd(), ws);
        for (int l = 0; l < L; ++l) {
          ap[l] = ws.act()[l];
          rp[l] = ws.rstd()[l];
        }
      } else {
        for (int l = 0; l < L; ++l) {
          ap[l] = act[l].data_ptr<T>() + row * act[l].size(2);
          rp[l] = rstd[l].data_ptr<T>() + row;
        }
      }
      tile::backward<T>(ly.data(), L, n, xp + row * C0, C0, ap.data(), rp.data(), vp + row * CL, CL,
                        vxp ? vxp + row * C0 : nullptr, C0, false, grads.data(), ws);
    }
  });
}

}  // namespace

std::vector<at::Tensor> mlp_forward(const at::Tensor& x_, const std::vector<at::Tensor>& W,
                                    const std::vector<at::Tensor>& b,
                                    const std::vector<c10::optional<at::Tensor>>& gamma,
                                    const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                                    bool save, int64_t tile_rows, int64_t mm_dtype) {
  check_x(x_, mm_dtype);
  const at::Tensor x = x_.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const MLPWeights w = make_mlp_weights(kOp, W, b, gamma, beta, norm, x, B, x.size(2), mm_dtype);
  const size_t L = w.size();
  std::vector<at::Tensor> result;
  if (x.is_cuda() || tile_rows == 0) {  // the whole batch as one tile (CUDA; CPU with tile_rows 0, for tests)
    c10::DeviceGuard guard(x.device());
    std::vector<at::Tensor> zs;
    result.push_back(mlp_tile_forward(w, x, save ? &zs : nullptr));
    for (auto& z : zs) result.push_back(z);
    return result;
  }
  auto out = at::empty({B, N, w.W[L - 1].size(-2)}, x.options());
  std::vector<at::Tensor> act, rstd;
  if (save) {
    for (size_t l = 0; l < L; ++l) act.push_back(at::empty({B, N, w.W[l].size(-2)}, x.options()));
    for (size_t l = 0; l < L; ++l) rstd.push_back(at::empty({B, N}, x.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_forward", [&] {
    forward_cpu<scalar_t>(w, x, out, act, rstd, tile_rows, mm_dtype == 1);
  });
  result.push_back(out);
  for (auto& t : act) result.push_back(t);
  for (auto& t : rstd) result.push_back(t);
  return result;
}

std::vector<at::Tensor> mlp_backward(const at::Tensor& v_out_, const at::Tensor& x_,
                                     const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& W,
                                     const std::vector<at::Tensor>& b,
                                     const std::vector<c10::optional<at::Tensor>>& gamma,
                                     const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                                     const std::vector<bool>& needs, int64_t tile_rows, int64_t mm_dtype) {
  check_x(x_, mm_dtype);
  const at::Tensor x = x_.contiguous(), v_out = v_out_.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const MLPWeights w = make_mlp_weights(kOp, W, b, gamma, beta, norm, x, B, x.size(2), mm_dtype);
  const size_t L = w.size();
  check_same(kOp, "grad_output", v_out, x, "x");
  check_shape(kOp, "grad_output", v_out, {B, N, w.W[L - 1].size(-2)}, "[B, N, C_out] (the output's shape)");
  TORCH_CHECK(needs.size() == 5, kOp, ": needs must have 5 flags (x, weights, biases, ln weights, ln biases)");
  const bool batched = x.is_cuda() || tile_rows == 0;  // the batched whole-batch path
  TORCH_CHECK(saved.empty() || saved.size() == (batched ? L : 2 * L), kOp, ": backward got ", saved.size(),
              " saved activations, expected none (recompute) or ", batched ? L : 2 * L);
  const bool need_x = needs[0], need_W = needs[1], need_b = needs[2], need_g = needs[3], need_be = needs[4];
  const int64_t T = batched ? 1 : at::get_num_threads();
  std::vector<at::Tensor> gW(L), gb(L), gg(L), gbe(L);
  for (size_t l = 0; l < L; ++l) {
    gW[l] = tile::thread_acc(T, w.W[l], need_W);
    gb[l] = tile::thread_acc(T, w.b[l], need_b);
    gg[l] = tile::thread_acc(T, w.gamma[l], need_g);
    gbe[l] = tile::thread_acc(T, w.beta[l], need_be);
  }
  at::Tensor v_x;
  if (batched) {
    c10::DeviceGuard guard(x.device());
    MLPGrads g;
    auto first = [](const at::Tensor& t) { return t.defined() ? t[0] : t; };
    for (size_t l = 0; l < L; ++l) {
      g.W.push_back(first(gW[l]));
      g.b.push_back(first(gb[l]));
      g.gamma.push_back(first(gg[l]));
      g.beta.push_back(first(gbe[l]));
    }
    std::vector<at::Tensor> zs = saved;
    if (zs.empty()) mlp_tile_forward(w, x, &zs);
    v_x = mlp_tile_backward(w, x, zs, {}, v_out, g, need_x);
  } else {
    if (need_x) v_x = at::empty_like(x);
    std::vector<at::Tensor> act, rstd;
    for (size_t l = 0; l < saved.size() / 2; ++l) {
      act.push_back(saved[l].contiguous());
      rstd.push_back(saved[L + l].contiguous());
    }
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_backward", [&] {
      backward_cpu<scalar_t>(w, x, v_out, act, rstd, v_x, gW, gb, gg, gbe, tile_rows, mm_dtype == 1);
    });
  }
  std::vector<at::Tensor> out{v_x};
  auto reduce = [&](const at::Tensor& t) { return !t.defined() ? t : (T == 1 ? t[0] : t.sum(0)); };
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gW[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gb[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gg[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gbe[l]));
  return out;
}

void register_mlp(pybind11::module& m) {
  namespace py = pybind11;
  m.def("mlp_forward", &mlp_forward, "Fused MLP forward (see csrc/mlp/mlp.h)", py::arg("x"), py::arg("weights"),
        py::arg("biases"), py::arg("ln_weights"), py::arg("ln_biases"), py::arg("norm"), py::arg("save"),
        py::arg("tile_rows") = 128, py::arg("mm_dtype") = 0);
  m.def("mlp_backward", &mlp_backward, "Fused MLP backward (see csrc/mlp/mlp.h)", py::arg("v_out"), py::arg("x"),
        py::arg("saved"), py::arg("weights"), py::arg("biases"), py::arg("ln_weights"), py::arg("ln_biases"),
        py::arg("norm"), py::arg("needs"), py::arg("tile_rows") = 128, py::arg("mm_dtype") = 0);
  m.def("cpu_gemm_backend", [] { return std::string(cpu::gemm_backend()); },
        "The CPU matmul backend of the tile loops: 'blas' (torch's MKL) or 'aten'");
  m.def("set_cpu_gemm_backend", [](const std::string& name) { cpu::set_gemm_backend(name); },
        "Select the CPU matmul backend: 'auto', 'blas' or 'aten' (for tests and benchmarks)");
}

}  // namespace srn
