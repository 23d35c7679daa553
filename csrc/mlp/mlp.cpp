// srn_fast.ops.mlp: a stack of Linear -> LayerNorm(+affine) -> ReLU layers on points with per-scene or shared
// weights, forward and hand-written backward (see mlp.h for the arguments).
//   CPU: tiles of rays that stay in cache through every layer (srn::tile in common/mlp_tile.h), in parallel over
//        tiles; per-thread gradient accumulators summed at the end.
//   CUDA: the whole batch as one tile: batched GEMMs through ATen (cuBLAS) with the fused LayerNorm/ReLU kernels
//        of common/elementwise_kernels.cu between them.
#include "mlp/mlp.h"

#include <ATen/Parallel.h>
#include <atomic>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"
#include "common/cpu_gemm.h"
#include "common/mlp_tile.h"
#include "common/scratch_pool.h"
#include "common/tile_loops.h"

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

// Row `row` of a saved per-layer buffer [B, N, C] / [B, N] of element type T; nullptr for a [0] placeholder or a
// buffer of another dtype (a bf16 xhat is reached through saved_row<c10::BFloat16>, its T pointer stays null).
template <typename T>
T* saved_row(const at::Tensor& t, int64_t row) {
  if (is_placeholder(t) || t.scalar_type() != c10::CppTypeToScalarType<T>::value) return nullptr;
  return reinterpret_cast<T*>(t.data_ptr()) + row * (t.dim() == 3 ? t.size(2) : 1);
}

// act/rstd saved for backward on the CPU: per layer [B, N, C_l] / [B, N] (see tile::forward); empty = keep nothing.
template <typename T>
void forward_cpu(const MLPWeights& w, const at::Tensor& x, at::Tensor& out, const std::vector<at::Tensor>& act,
                 const std::vector<at::Tensor>& rstd, int64_t tile_rows, bool bf16) {
  const int64_t B = x.size(0), N = x.size(1), C0 = x.size(2), CL = out.size(2);
  const int L = static_cast<int>(w.size());
  const tile::Grid tiles = tile::make_grid(B, N, tile_rows);
  const auto layers = tile::all_scene_layers<T>(w, B, bf16);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool save = !act.empty();
  tile::parallel_tiles(tiles.count(), [&](auto take) {
    tile::Workspace<T> ws(layers[0].data(), L, tiles.R, false);
    std::vector<T*> ap(L), rp(L);
    std::vector<c10::BFloat16*> hp(L);  // bf16 xhat rows (shapes.xhat_dtype)
    for (int64_t t; take(t);) {
      const int64_t s = tiles.scene(t), n = tiles.rows(t), row = tiles.row(t);
      if (save) {
        for (int l = 0; l < L; ++l) {
          ap[l] = saved_row<T>(act[l], row);
          hp[l] = saved_row<c10::BFloat16>(act[l], row);
          rp[l] = saved_row<T>(rstd[l], row);
        }
      }
      tile::forward<T>(layers[s].data(), L, n, xp + row * C0, C0, op + row * CL, CL, save ? ap.data() : nullptr,
                       save ? rp.data() : nullptr, ws, /*stream_act=*/save, save ? hp.data() : nullptr);
    }
  });
}

template <typename T>
void backward_cpu(const MLPWeights& w, const at::Tensor& x, const at::Tensor& v_out, const std::vector<at::Tensor>& act,
                  const std::vector<at::Tensor>& rstd, at::Tensor& v_x, std::vector<at::Tensor>& gW,
                  std::vector<at::Tensor>& gb, std::vector<at::Tensor>& gg, std::vector<at::Tensor>& gbe,
                  int64_t tile_rows, bool bf16, int64_t chunks) {
  const int64_t B = x.size(0), N = x.size(1), C0 = x.size(2), CL = v_out.size(2);
  const int L = static_cast<int>(w.size());
  const tile::Grid tiles = tile::make_grid(B, N, tile_rows);
  const bool recompute = act.empty();
  const auto layers = tile::all_scene_layers<T>(w, B, bf16);
  const T* xp = x.data_ptr<T>();
  const T* vp = v_out.data_ptr<T>();
  T* vxp = v_x.defined() ? v_x.data_ptr<T>() : nullptr;
  // the recomputed forward stops before a plain last layer: backward keeps nothing of it (its input gradient and
  // weight gradient read the previous layer's saved activation), so its GEMM would be work for nothing
  const int L_fwd = L - (w.norm[L - 1] ? 0 : 1);
  // a static split of the tiles into one chunk per accumulator slot, not forward_cpu's atomic counter: which tiles
  // are added into which slot must not depend on timing, or the summed gradients would change from run to run in
  // their last bits (tests/test_buffer_cache.py compares runs exactly). Each chunk zeroes its own slots first;
  // `chunks` is the accumulators' slot count.
  const int64_t per_chunk = (tiles.count() + chunks - 1) / chunks;
  auto run_chunk = [&](int64_t slot) {
    for (int l = 0; l < L; ++l) {
      for (const at::Tensor* acc : {&gW[l], &gb[l], &gg[l], &gbe[l]}) tile::zero_slot<T>(*acc, slot);
    }
    const int64_t t0 = slot * per_chunk, t1 = std::min(tiles.count(), t0 + per_chunk);
    if (t0 >= t1) return;
    tile::Workspace<T> ws(layers[0].data(), L, tiles.R, recompute, bf16 && cpu::weight_grad_zipped());
    std::vector<const T*> ap(L), rp(L);
    std::vector<const c10::BFloat16*> hp(L, nullptr);  // bf16 xhat rows of a stored forward
    std::vector<tile::LayerGrad<T>> grads(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = tiles.scene(t), n = tiles.rows(t), row = tiles.row(t);
      const auto& ly = layers[s];
      for (int l = 0; l < L; ++l) {
        const int64_t co = ly[l].cout;
        grads[l].weight = tile::acc_ptr<T>(gW[l], slot, s, co * ly[l].cin, w.per_scene(l));
        grads[l].bias = tile::acc_ptr<T>(gb[l], slot, s, co, w.b[l].dim() == 2);
        grads[l].ln_weight = tile::acc_ptr<T>(gg[l], slot, s, co, false);
        grads[l].ln_bias = tile::acc_ptr<T>(gbe[l], slot, s, co, false);
      }
      if (recompute) {
        // rerun the forward on this tile (its first L_fwd layers), keeping the activations in the workspace; its
        // output is not needed but must go somewhere: the third float buffer is free until backward() starts.
        tile::forward<T>(ly.data(), L_fwd, n, xp + row * C0, C0, ws.buf(2), ly[std::max(L_fwd, 1) - 1].cout,
                         ws.act(), ws.rstd(), ws);
        for (int l = 0; l < L; ++l) {
          ap[l] = ws.act()[l];
          rp[l] = ws.rstd()[l];
        }
      } else {
        for (int l = 0; l < L; ++l) {
          ap[l] = saved_row<T>(act[l], row);
          hp[l] = saved_row<c10::BFloat16>(act[l], row);
          rp[l] = saved_row<T>(rstd[l], row);
        }
      }
      tile::backward<T>(ly.data(), L, n, xp + row * C0, C0, ap.data(), rp.data(), vp + row * CL, CL,
                        vxp ? vxp + row * C0 : nullptr, C0, false, grads.data(), ws, hp.data());
    }
  };
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) run_chunk(k);
  });
}

}  // namespace

void mlp_forward(const at::Tensor& x_, const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                 const std::vector<c10::optional<at::Tensor>>& gamma, const std::vector<c10::optional<at::Tensor>>& beta,
                 const std::vector<bool>& norm, bool save, int64_t tile_rows, int64_t mm_dtype, at::Tensor out,
                 std::vector<at::Tensor> acts, std::vector<at::Tensor> rstd) {
  check_x(x_, mm_dtype);
  const at::Tensor x = x_.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const bool batched = x.is_cuda() || tile_rows == 0;  // the whole batch as one tile (CUDA; CPU tile_rows 0)
  const MLPWeights w = make_mlp_weights(kOp, W, b, gamma, beta, norm, x, B, x.size(2), mm_dtype, !batched, kPackFwd);
  const size_t L = w.size();
  check_out(kOp, "out", out, {B, N, w.W[L - 1].size(-2)}, x);
  TORCH_CHECK(acts.size() == L && rstd.size() == L, kOp, ": acts and rstd must have one entry per layer");
  for (size_t l = 0; l < L; ++l) {  // what is kept: see mlp.h
    const int64_t C = w.W[l].size(-2);
    const bool keep_act = save && (batched || l + 1 < L || w.norm[l]);
    const bool keep_rstd = save && !batched && w.norm[l];
    const std::string i = "[" + std::to_string(l) + "]";
    if (keep_act) check_out(kOp, "acts" + i, acts[l], {B, N, C}, x, xhat_dtype(batched, mm_dtype, w.norm[l], x));
    else TORCH_CHECK(is_placeholder(acts[l]), kOp, ": acts", i, " must be a [0] placeholder");
    if (keep_rstd) check_out(kOp, "rstd" + i, rstd[l], {B, N}, x);
    else TORCH_CHECK(is_placeholder(rstd[l]), kOp, ": rstd", i, " must be a [0] placeholder");
  }
  if (batched) {
    c10::DeviceGuard guard(x.device());
    std::vector<at::Tensor> zs;
    out.copy_(mlp_tile_forward(w, x, save ? &zs : nullptr));
    for (size_t l = 0; l < zs.size(); ++l) acts[l].copy_(zs[l]);
    return;
  }
  if (mm_dtype == 1) cpu::bf16_route();  // picks the bf16 GEMM route (a one-time measurement) outside the parallel loop
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_forward", [&] {
    forward_cpu<scalar_t>(w, x, out, save ? acts : std::vector<at::Tensor>{}, rstd, tile_rows, mm_dtype == 1);
  });
}

void mlp_backward(const at::Tensor& v_out_, const at::Tensor& x_, const std::vector<at::Tensor>& acts,
                  const std::vector<at::Tensor>& rstd, const std::vector<at::Tensor>& W,
                  const std::vector<at::Tensor>& b, const std::vector<c10::optional<at::Tensor>>& gamma,
                  const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm, int64_t tile_rows,
                  int64_t mm_dtype, at::Tensor v_x, std::vector<at::Tensor> v_W, std::vector<at::Tensor> v_b,
                  std::vector<at::Tensor> v_gamma, std::vector<at::Tensor> v_beta) {
  check_x(x_, mm_dtype);
  const at::Tensor x = x_.contiguous(), v_out = v_out_.contiguous();
  const int64_t B = x.size(0), N = x.size(1);
  const bool batched = x.is_cuda() || tile_rows == 0;  // the batched whole-batch path
  TORCH_CHECK(acts.size() == W.size() && rstd.size() == W.size(), kOp, ": acts and rstd must have one entry per layer");
  const size_t L = W.size();
  const bool saved = L > 0 && (!is_placeholder(acts[0]) || (L > 1 && !is_placeholder(acts[L - 2])));
  // the input gradient's packed weights, and the forward's where it is recomputed
  const MLPWeights w = make_mlp_weights(kOp, W, b, gamma, beta, norm, x, B, x.size(2), mm_dtype, !batched,
                                        saved ? kPackBwd : kPackBoth);
  check_same(kOp, "grad_output", v_out, x, "x");
  check_shape(kOp, "grad_output", v_out, {B, N, w.W[L - 1].size(-2)}, "[B, N, C_out] (the output's shape)");
  TORCH_CHECK(v_W.size() == L && v_b.size() == L && v_gamma.size() == L && v_beta.size() == L, kOp,
              ": the gradient lists must have one entry per layer");
  const bool need_x = !is_placeholder(v_x);
  if (need_x) check_out(kOp, "grad_x", v_x, x.sizes(), x);
  auto wanted = [&](const at::Tensor& out, const at::Tensor& like, const char* what, size_t l) {
    if (is_placeholder(out)) return false;
    TORCH_CHECK(like.defined(), kOp, ": ", what, "[", l, "] has no parameter to take a gradient of");
    check_out(kOp, std::string(what) + "[" + std::to_string(l) + "]", out, like.sizes(), x);
    return true;
  };
  // accumulator slots: one for the batched path (zeroed here), else one per chunk of tiles (zeroed by the chunk)
  const int64_t T = batched ? 1 : at::get_num_threads();
  auto acc = batched ? tile::thread_acc : tile::slot_acc;
  std::vector<at::Tensor> gW(L), gb(L), gg(L), gbe(L);
  for (size_t l = 0; l < L; ++l) {
    gW[l] = acc(T, w.W[l], wanted(v_W[l], w.W[l], "grad_weights", l));
    gb[l] = acc(T, w.b[l], wanted(v_b[l], w.b[l], "grad_biases", l));
    gg[l] = acc(T, w.gamma[l], wanted(v_gamma[l], w.gamma[l], "grad_ln_weights", l));
    gbe[l] = acc(T, w.beta[l], wanted(v_beta[l], w.beta[l], "grad_ln_biases", l));
  }
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
    std::vector<at::Tensor> zs;
    if (saved) {
      for (auto& a : acts) zs.push_back(a.contiguous());
    } else {
      mlp_tile_forward(w, x, &zs);
    }
    const at::Tensor vx = mlp_tile_backward(w, x, zs, {}, v_out, g, need_x);
    if (need_x) v_x.copy_(vx);
  } else {
    std::vector<at::Tensor> act, rs;
    if (saved) {
      for (size_t l = 0; l < L; ++l) {
        const at::ScalarType want = xhat_dtype(false, mm_dtype, w.norm[l], x);
        TORCH_CHECK(is_placeholder(acts[l]) || acts[l].scalar_type() == want, kOp, ": acts[", l, "] must be ", want,
                    " (what the forward keeps), got ", acts[l].scalar_type());
        act.push_back(acts[l].contiguous());
        rs.push_back(rstd[l].contiguous());
      }
    }
    at::Tensor vx = need_x ? v_x : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_backward", [&] {
      backward_cpu<scalar_t>(w, x, v_out, act, rs, vx, gW, gb, gg, gbe, tile_rows, mm_dtype == 1, T);
    });
  }
  for (size_t l = 0; l < L; ++l) {
    reduce_into(v_W[l], gW[l]);
    reduce_into(v_b[l], gb[l]);
    reduce_into(v_gamma[l], gg[l]);
    reduce_into(v_beta[l], gbe[l]);
  }
}

void register_mlp(pybind11::module& m) {
  namespace py = pybind11;
  m.def("mlp_forward", &mlp_forward, "Fused MLP forward into allocated outputs (see csrc/mlp/mlp.h)", py::arg("x"),
        py::arg("weights"), py::arg("biases"), py::arg("ln_weights"), py::arg("ln_biases"), py::arg("norm"),
        py::arg("save"), py::arg("tile_rows"), py::arg("mm_dtype"), py::arg("out"), py::arg("acts"), py::arg("rstd"));
  m.def("mlp_backward", &mlp_backward, "Fused MLP backward into allocated outputs (see csrc/mlp/mlp.h)",
        py::arg("grad_out"), py::arg("x"), py::arg("acts"), py::arg("rstd"), py::arg("weights"), py::arg("biases"),
        py::arg("ln_weights"), py::arg("ln_biases"), py::arg("norm"), py::arg("tile_rows"), py::arg("mm_dtype"),
        py::arg("grad_x"), py::arg("grad_weights"), py::arg("grad_biases"), py::arg("grad_ln_weights"),
        py::arg("grad_ln_biases"));
  m.def("cpu_gemm_backend", [] { return std::string(cpu::gemm_backend()); },
        "The CPU matmul backend of the tile loops: 'blas' (torch's MKL) or 'aten'");
  m.def("set_cpu_gemm_backend", [](const std::string& name) { cpu::set_gemm_backend(name); },
        "Select the CPU matmul backend: 'auto', 'blas' or 'aten' (for tests and benchmarks)");
  m.def("cpu_gemm", [](bool ta, bool tb, const at::Tensor& a, const at::Tensor& b, at::Tensor c, double beta) {
        // c [M, N] = op(a) op(b) + beta * c on contiguous float32/float64 CPU tensors, or bf16 a and b with a
        // float32 c (the bf16 route in use) (for the tests)
        const bool bf16 = a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
                          c.scalar_type() == at::kFloat;
        TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.is_contiguous() && b.is_contiguous() &&
                    c.is_contiguous() && (bf16 || (a.dtype() == c.dtype() && b.dtype() == c.dtype())) &&
                    a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(),
                    "cpu_gemm: a, b, c must be contiguous 2-D CPU tensors of one dtype (or bf16 a, b and float32 c)");
        const int64_t M = c.size(0), N = c.size(1), K = ta ? a.size(0) : a.size(1);
        TORCH_CHECK((ta ? a.size(1) : a.size(0)) == M && (tb ? b.size(1) : b.size(0)) == K &&
                    (tb ? b.size(0) : b.size(1)) == N, "cpu_gemm: shapes do not match");
        if (bf16) {
          return cpu::gemm(ta, tb, M, N, K, a.data_ptr<at::BFloat16>(), a.size(1), b.data_ptr<at::BFloat16>(),
                           b.size(1), float(beta), c.data_ptr<float>(), N);
        }
        AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "cpu_gemm", [&] {
          cpu::gemm(ta, tb, M, N, K, a.data_ptr<scalar_t>(), a.size(1), b.data_ptr<scalar_t>(), b.size(1),
                    scalar_t(beta), c.data_ptr<scalar_t>(), N);
        });
      }, "c = op(a) op(b) + beta * c through the tile loops' cpu::gemm (for the tests)");
  m.def("cpu_bf16_route", [] { return std::string(cpu::bf16_route()); },
        "The CPU bf16 GEMM route of the tile loops: 'amx', 'avx512bf16', 'mkl', 'widened' (the fastest measured "
        "of these unless set; the first the CPU has, in that order, under torch.use_deterministic_algorithms) or "
        "'onednn' (only when set)");
  m.def("set_cpu_bf16_route", [](const std::string& name) { cpu::set_bf16_route(name); },
        "Select the CPU bf16 GEMM route: 'auto' (fastest measured with a float32 result), 'amx', 'avx512bf16', "
        "'mkl', 'widened' or 'onednn'");
  m.def("set_cpu_amx_weight_grad_mkl", [](bool on) { cpu::set_amx_weight_grad_mkl(on); },
        "Under the 'amx' route, weight-gradient GEMMs through srn_fast's AMX kernel (False, the default) or through "
        "MKL's bf16 GEMM where torch has it (True; for the tests)");
  m.def("cpu_weight_grad_zipped", [] { return cpu::weight_grad_zipped(); },
        "Whether the tile loops' weight gradients take their operands from k-pair panels (the 'amx' route)");
  m.def("set_cpu_weight_grad_zipped", [](bool on) { cpu::set_weight_grad_zipped(on); },
        "Under the 'amx' route, the tile loops' weight gradients from k-pair panels the VJP rows write (True, the "
        "default) or from plain bf16 rows packed per GEMM (False; for the tests: the same bits)");
  m.def("release_scratch_pool", [] { return release_scratch_pool(); },
        "Free the idle reused CPU scratch blocks of the ops' backward passes (csrc/common/scratch_pool.h); returns the "
        "bytes freed");
  m.def("scratch_pool_bytes", [] { return scratch_pool_bytes(); }, "Bytes the CPU scratch pool holds, in use or idle");
  m.def("set_scratch_pool_enabled", [](bool on) { set_scratch_pool_enabled(on); },
        "Turn the CPU scratch pool on (default) or off (off also frees its idle blocks)");
  m.def("scratch_pool_enabled", [] { return scratch_pool_enabled(); }, "Whether the CPU scratch pool is on");
  m.def("cpu_avx512_rows", [] { return cpu::avx512_rows(); },
        "Whether the CPU tile loops run their LayerNorm rows in AVX-512 (CPUs with AVX512-BF16)");
  m.def("set_cpu_avx512_rows", [](bool on) { cpu::set_avx512_rows(on); },
        "Turn the AVX-512 LayerNorm rows off (False: the generic rows; for the tests) or back on");
  m.def("cpu_lstm_gemm_avx512", [] { return cpu::lstm_gemm_avx512(); },
        "Whether the march's float32 LSTM products run on srn_fast's AVX-512 loops (else MKL's sgemm)");
  m.def("set_cpu_lstm_gemm_avx512", [](bool on) { cpu::set_lstm_gemm_avx512(on); },
        "Turn the AVX-512 LSTM products off (False: MKL's sgemm; for the tests and A/B timing) or back on");
  m.def("cpu_tile_gemm_rates", [] { return cpu::tile_gemm_rates(); },
        "GFLOP/s (every thread on its own tile) at a tile's shape of the float32 GEMM and of each bf16 route "
        "(measured once)");
}

}  // namespace srn
