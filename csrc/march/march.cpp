// srn_fast.ops.march: the reference ray marcher (phi -> LSTMCell -> step along the ray, T times) fused into one
// op with a hand-written backward that walks the steps in reverse.
//
// Memory: in "recompute" mode the forward keeps per step and ray only x_t, h_t, c_t and the LSTM gates
// (3 + 2H + 4H numbers) and the backward recomputes phi's activations; "store" mode keeps phi's activations
// as well; "inference" keeps nothing.
//   CPU (march_cpu.h): tiles of ~128 rays of one scene go through all steps while they are in cache, in parallel
//        over tiles, on raw pointers (phi via srn::tile + MKL sgemm, LSTM via cpu::gemm, cell loops vectorised).
//   CUDA (march_tile_forward / march_tile_backward below): the whole batch is one tile: batched GEMMs through
//        ATen (cuBLAS) with the torch-free element-wise kernels of common/elementwise_kernels.cu between them.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"
#include "common/elementwise.h"
#include "common/mlp_tile.h"
#include "march/march_cpu.h"

namespace srn {

namespace {

constexpr const char* kOp = "srn_fast.ops.march";
enum Mode : int64_t { kInference = 0, kRecompute = 1, kStore = 2 };

struct LSTMWeights {
  at::Tensor w_ih;   // [4H, F]
  at::Tensor w_hh;   // [4H, H]
  at::Tensor bias;   // [4H]  b_ih + b_hh
  at::Tensor w_out;  // [H]
  at::Tensor b_out;  // [1]
};

struct Saved {  // full-size buffers; undefined in inference mode
  at::Tensor xs;                        // [T, B, N, 3]   x_t, t < T
  at::Tensor hs, cs;                    // [T + 1, B, N, H]
  at::Tensor gates;                     // [T, B, N, 4H]  activated gates
  std::vector<at::Tensor> zs;           // store mode: T * L tensors [B, N, C_l] (CUDA: pre-norm z; CPU: the
                                        // tile::forward activation, see march_cpu.h)
  std::vector<at::Tensor> rstd;         // store mode, CPU: T * L tensors [B, N]
  at::Tensor steps;                     // [T + 1, B, N, 3] when return_steps
};

// CUDA: forward of one tile (the whole batch): x0, dirs [S, R, 3]. Returns x_T [S, R, 3].
at::Tensor march_tile_forward(const MLPWeights& phi, const LSTMWeights& lw, const at::Tensor& x0,
                              const at::Tensor& dirs, int64_t T, int64_t mode, Saved& sv) {
  const int64_t S = x0.size(0), R = x0.size(1), H = lw.w_hh.size(1), M = S * R;
  const size_t L = phi.size();
  at::Tensor x = x0;
  at::Tensor h = at::zeros({M, H}, x0.options()), c = at::zeros({M, H}, x0.options());
  const at::Tensor d2 = dirs.reshape({M, 3});
  if (sv.steps.defined()) sv.steps[0].copy_(x0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<at::Tensor> zs;
    const at::Tensor v = mlp_tile_forward(phi, x, mode == kStore ? &zs : nullptr);
    at::Tensor pre = at::addmm(lw.bias, v.reshape({M, v.size(2)}), lw.w_ih.t());
    pre.addmm_(h, lw.w_hh.t());
    at::Tensor c_new = at::empty_like(c), h_new = at::empty_like(h), x_new = at::empty({M, 3}, x0.options());
    lstm_step_forward(pre, c, x.reshape({M, 3}), d2, lw.w_out, lw.b_out, c_new, h_new, x_new);
    if (mode != kInference) {
      sv.xs[t].copy_(x);
      sv.gates[t].copy_(pre.view({S, R, 4 * H}));
      sv.hs[t + 1].copy_(h_new.view({S, R, H}));
      sv.cs[t + 1].copy_(c_new.view({S, R, H}));
      for (size_t l = 0; l < zs.size(); ++l) sv.zs[t * L + l].copy_(zs[l]);
    }
    x = x_new.view({S, R, 3});
    h = h_new;
    c = c_new;
    if (sv.steps.defined()) sv.steps[t + 1].copy_(x);
  }
  return x;
}

struct LSTMGrads {
  at::Tensor w_ih, w_hh, bias, w_out, b_out;  // [4H, F], [4H, H], [4H], [1, H], [1]
};

// CUDA: backward of one tile (the whole batch). v_xT [S, R, 3]. Returns (v_x0, v_dirs) [S, R, 3].
std::pair<at::Tensor, at::Tensor> march_tile_backward(const MLPWeights& phi, const LSTMWeights& lw,
                                                      const at::Tensor& dirs, const at::Tensor& v_xT, int64_t T,
                                                      int64_t mode, double clamp_v, const Saved& sv,
                                                      MLPGrads& g_phi, LSTMGrads& g) {
  const int64_t S = dirs.size(0), R = dirs.size(1), H = lw.w_hh.size(1), M = S * R;
  const size_t L = phi.size();
  const at::Tensor d2 = dirs.reshape({M, 3});
  at::Tensor v_x = v_xT.reshape({M, 3}).clone();
  at::Tensor v_h = at::zeros({M, H}, dirs.options()), v_c = at::zeros({M, H}, dirs.options());
  at::Tensor v_dirs = at::zeros({M, 3}, dirs.options());
  at::Tensor v_pre = at::empty({M, 4 * H}, dirs.options()), v_s = at::empty({M}, dirs.options());
  for (int64_t t = T - 1; t >= 0; --t) {
    const at::Tensor gates = sv.gates[t].reshape({M, 4 * H});
    const at::Tensor c_prev = sv.cs[t].reshape({M, H}), c_new = sv.cs[t + 1].reshape({M, H});
    const at::Tensor h_prev = sv.hs[t].reshape({M, H}), h_new = sv.hs[t + 1].reshape({M, H});
    const at::Tensor x_t = sv.xs[t];
    lstm_step_backward(gates, c_prev, c_new, h_new, d2, v_x, v_h, v_c, lw.w_out, lw.b_out, clamp_v, v_pre, v_s,
                       v_dirs);
    g.w_out.addmm_(v_s.unsqueeze(0), h_new);
    g.b_out.add_(v_s.sum());
    std::vector<at::Tensor> zs, ys;
    at::Tensor feat;
    if (mode == kStore) {
      for (size_t l = 0; l < L; ++l) zs.push_back(sv.zs[t * L + l]);
      feat = phi.norm[L - 1] ? ln_relu_forward(zs[L - 1], phi.gamma[L - 1], phi.beta[L - 1]) : zs[L - 1];
    } else {
      feat = mlp_tile_forward(phi, x_t, &zs, &ys);
    }
    const at::Tensor f2 = feat.reshape({M, feat.size(2)});
    g.w_ih.addmm_(v_pre.t(), f2);
    g.w_hh.addmm_(v_pre.t(), h_prev);
    g.bias.add_(v_pre.sum(0));
    const at::Tensor v_feat = at::mm(v_pre, lw.w_ih).view({S, R, feat.size(2)});
    v_h = at::mm(v_pre, lw.w_hh);
    const at::Tensor v_xphi = mlp_tile_backward(phi, x_t, zs, ys, v_feat, g_phi, true);
    v_x.add_(v_xphi.reshape({M, 3}));
  }
  return {v_x.view({S, R, 3}), v_dirs.view({S, R, 3})};
}

LSTMWeights make_lstm(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias,
                      const at::Tensor& w_out, const at::Tensor& b_out, int64_t F) {
  check_same(kOp, "lstm.weight_ih", w_ih, x, "x0");
  check_same(kOp, "lstm.weight_hh", w_hh, x, "x0");
  check_same(kOp, "lstm bias", bias, x, "x0");
  check_same(kOp, "lstm.out_weight", w_out, x, "x0");
  check_same(kOp, "lstm.out_bias", b_out, x, "x0");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * w_hh.size(1), kOp,
              ": lstm.weight_hh must have shape [4H, H], got ", shape_str(w_hh));
  const int64_t H = w_hh.size(1);
  check_shape(kOp, "lstm.weight_ih", w_ih, {4 * H, F}, "[4H, F] with F = phi's output width");
  check_shape(kOp, "lstm bias (bias_ih + bias_hh)", bias, {4 * H}, "[4H]");
  TORCH_CHECK(w_out.numel() == H, kOp, ": lstm.out_weight must have shape [1, H] with H = ", H, ", got ",
              shape_str(w_out));
  TORCH_CHECK(b_out.numel() == 1, kOp, ": lstm.out_bias must have shape [1], got ", shape_str(b_out));
  return LSTMWeights{w_ih.contiguous(), w_hh.contiguous(), bias.contiguous(), w_out.reshape({H}).contiguous(),
                     b_out.reshape({1}).contiguous()};
}

void check_rays(const at::Tensor& x0, const at::Tensor& dirs) {
  check_float(kOp, "x0", x0);
  check_shape(kOp, "x0", x0, {-1, -1, 3}, "[B, N, 3]");
  check_shape(kOp, "dirs", dirs, {x0.size(0), x0.size(1), 3}, "[B, N, 3] like x0");
  check_same(kOp, "dirs", dirs, x0, "x0");
}

// The whole batch as one tile through batched GEMMs (march_tile_forward / march_tile_backward): always on CUDA,
// and on the CPU when tile_rows == 0 (so that the CPU tests exercise the CUDA path's logic too).
bool batched_path(const at::Tensor& x, int64_t tile_rows) { return x.is_cuda() || tile_rows == 0; }

// Gradient accumulators, [threads, ...] (undefined = not needed).
struct Accumulators {
  std::vector<at::Tensor> W, b, gamma, beta;
  at::Tensor w_ih, w_hh, bias, w_out, b_out;
};

// ---- CPU: tiles on raw pointers (march_cpu.h) ----------------------------------------------------------------

template <typename T>
march_cpu::Lstm<T> lstm_ptrs(const LSTMWeights& lw, int64_t F) {
  return march_cpu::Lstm<T>{lw.w_ih.data_ptr<T>(), lw.w_hh.data_ptr<T>(), lw.bias.data_ptr<T>(),
                            lw.w_out.data_ptr<T>(), lw.b_out.data_ptr<T>(), lw.w_hh.size(1), F};
}

template <typename T>
march_cpu::Saved<T> saved_ptrs(const Saved& sv, int64_t BN) {
  march_cpu::Saved<T> p;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  p.xs = ptr(sv.xs);
  p.hs = ptr(sv.hs);
  p.cs = ptr(sv.cs);
  p.gates = ptr(sv.gates);
  p.steps = ptr(sv.steps);
  for (auto& a : sv.zs) p.act.push_back(a.data_ptr<T>());
  for (auto& r : sv.rstd) p.rstd.push_back(r.data_ptr<T>());
  p.BN = BN;
  return p;
}

template <typename T>
void forward_cpu(const MLPWeights& phi, const LSTMWeights& lw, const at::Tensor& x0, const at::Tensor& dirs,
                 int64_t steps, Saved& sv, at::Tensor& xT, int64_t tile_rows, bool bf16) {
  const int64_t B = x0.size(0), N = x0.size(1), F = phi.W.back().size(-2);
  const int L = static_cast<int>(phi.size());
  const tile::Grid grid = tile::make_grid(B, N, tile_rows);
  const auto layers = tile::all_scene_layers<T>(phi, B, bf16);
  const march_cpu::Lstm<T> lp = lstm_ptrs<T>(lw, F);
  march_cpu::Saved<T> sp = saved_ptrs<T>(sv, B * N);
  const T* xp = x0.data_ptr<T>();
  const T* dp = dirs.data_ptr<T>();
  T* op = xT.data_ptr<T>();
  at::parallel_for(0, grid.count(), 1, [&](int64_t i0, int64_t i1) {
    tile::Workspace<T> ws(layers[0].data(), L, grid.R, false);
    march_cpu::Scratch<T> sc(grid.R, lp.H, F, L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = grid.scene(i), n = grid.rows(i), row = s * N + grid.row0(i);
      march_cpu::tile_forward<T>(layers[s].data(), L, lp, n, row, xp + row * 3, dp + row * 3, steps, op + row * 3,
                                 sp, ws, sc);
    }
  });
}

template <typename T>
void backward_cpu(const MLPWeights& phi, const LSTMWeights& lw, const at::Tensor& x0, const at::Tensor& dirs,
                  const at::Tensor& v_xT, int64_t steps, double clamp_v, const Saved& sv, Accumulators& acc,
                  at::Tensor& v_x0, at::Tensor& v_dirs, int64_t tile_rows) {
  const int64_t B = x0.size(0), N = x0.size(1), F = phi.W.back().size(-2);
  const int L = static_cast<int>(phi.size());
  const tile::Grid grid = tile::make_grid(B, N, tile_rows);
  const auto layers = tile::all_scene_layers<T>(phi, B, false);
  const march_cpu::Lstm<T> lp = lstm_ptrs<T>(lw, F);
  const march_cpu::Saved<T> sp = saved_ptrs<T>(sv, B * N);
  const T* dp = dirs.data_ptr<T>();
  const T* vp = v_xT.data_ptr<T>();
  T* vx0 = v_x0.data_ptr<T>();
  T* vd = v_dirs.data_ptr<T>();
  const bool recompute = sv.zs.empty();
  at::parallel_for(0, grid.count(), 1, [&](int64_t i0, int64_t i1) {
    const int64_t tid = at::get_thread_num();
    tile::Workspace<T> ws(layers[0].data(), L, grid.R, recompute);
    march_cpu::Scratch<T> sc(grid.R, lp.H, F, L);
    auto lstm_acc = [tid](const at::Tensor& a) { return tile::acc_ptr<T>(a, tid, 0, 0, false); };
    march_cpu::LstmGrad<T> gl{lstm_acc(acc.w_ih), lstm_acc(acc.w_hh), lstm_acc(acc.bias), lstm_acc(acc.w_out),
                              lstm_acc(acc.b_out)};
    std::vector<tile::LayerGrad<T>> gp(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = grid.scene(i), n = grid.rows(i), row = s * N + grid.row0(i);
      const auto& ly = layers[s];
      for (int l = 0; l < L; ++l) {
        const int64_t co = ly[l].cout;
        gp[l].weight = tile::acc_ptr<T>(acc.W[l], tid, s, co * ly[l].cin, phi.per_scene(l));
        gp[l].bias = tile::acc_ptr<T>(acc.b[l], tid, s, co, phi.b[l].dim() == 2);
        gp[l].ln_weight = tile::acc_ptr<T>(acc.gamma[l], tid, s, co, false);
        gp[l].ln_bias = tile::acc_ptr<T>(acc.beta[l], tid, s, co, false);
      }
      march_cpu::tile_backward<T>(ly.data(), L, lp, n, row, dp + row * 3, steps, vp + row * 3,
                                  T(clamp_v), sp, gp.data(), gl, vx0 + row * 3, vd + row * 3, ws, sc);
    }
  });
}

}  // namespace

// Returns [x_T [B, N, 3], steps [T+1, B, N, 3] or undefined, xs, hs, cs, gates, zs...] (saved for backward
// unless mode == inference).
std::vector<at::Tensor> march_forward(const at::Tensor& x0_, const at::Tensor& dirs_, const std::vector<at::Tensor>& W,
                                      const std::vector<at::Tensor>& b,
                                      const std::vector<c10::optional<at::Tensor>>& gamma,
                                      const std::vector<c10::optional<at::Tensor>>& beta,
                                      const std::vector<bool>& norm, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const at::Tensor& bias, const at::Tensor& w_out, const at::Tensor& b_out,
                                      int64_t steps, int64_t mode, bool return_steps, int64_t tile_rows,
                                      int64_t mm_dtype) {
  check_rays(x0_, dirs_);
  TORCH_CHECK(steps >= 0, kOp, ": steps must be >= 0, got ", steps);
  TORCH_CHECK(mode >= 0 && mode <= 2, kOp, ": unknown mode ", mode);
  const at::Tensor x0 = x0_.contiguous(), dirs = dirs_.contiguous();
  const int64_t B = x0.size(0), N = x0.size(1);
  const MLPWeights phi = make_mlp_weights(kOp, W, b, gamma, beta, norm, x0, B, 3, mm_dtype);
  const int64_t F = phi.W.back().size(-2);
  const LSTMWeights lw = make_lstm(x0, w_ih, w_hh, bias, w_out, b_out, F);
  const int64_t H = lw.w_hh.size(1), T = steps;
  const size_t L = phi.size();
  const auto opt = x0.options();
  const bool batched = batched_path(x0, tile_rows);
  Saved sv;
  if (mode != kInference) {
    sv.xs = at::empty({T, B, N, 3}, opt);
    sv.hs = at::empty({T + 1, B, N, H}, opt);
    sv.cs = at::empty({T + 1, B, N, H}, opt);
    sv.hs[0].zero_();
    sv.cs[0].zero_();
    sv.gates = at::empty({T, B, N, 4 * H}, opt);
    if (mode == kStore) {
      for (int64_t t = 0; t < T; ++t) {
        for (size_t l = 0; l < L; ++l) {
          sv.zs.push_back(at::empty({B, N, phi.W[l].size(-2)}, opt));
          if (!batched) sv.rstd.push_back(at::empty({B, N}, opt));
        }
      }
    }
  }
  if (return_steps) sv.steps = at::empty({T + 1, B, N, 3}, opt);
  at::Tensor xT;
  if (batched) {
    c10::DeviceGuard guard(x0.device());
    xT = march_tile_forward(phi, lw, x0, dirs, T, mode, sv);
  } else {
    xT = at::empty_like(x0);
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "march_forward", [&] {
      forward_cpu<scalar_t>(phi, lw, x0, dirs, T, sv, xT, tile_rows, mm_dtype == 1);
    });
  }
  std::vector<at::Tensor> out{xT, sv.steps, sv.xs, sv.hs, sv.cs, sv.gates};
  for (auto& z : sv.zs) out.push_back(z);
  for (auto& r : sv.rstd) out.push_back(r);
  return out;
}

// Backward. saved = [xs, hs, cs, gates, zs..., rstd...] from march_forward (rstd: store mode on the CPU).
// needs = [x0, dirs, phi weights, phi biases,
// phi ln weights, phi ln biases]. Returns [v_x0, v_dirs, v_W..., v_b..., v_gamma..., v_beta...,
// v_w_ih, v_w_hh, v_bias, v_w_out [1, H], v_b_out [1]].
std::vector<at::Tensor> march_backward(const at::Tensor& v_xT_, const at::Tensor& x0_, const at::Tensor& dirs_,
                                       const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& W,
                                       const std::vector<at::Tensor>& b,
                                       const std::vector<c10::optional<at::Tensor>>& gamma,
                                       const std::vector<c10::optional<at::Tensor>>& beta,
                                       const std::vector<bool>& norm, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const at::Tensor& bias, const at::Tensor& w_out, const at::Tensor& b_out,
                                       int64_t steps, int64_t mode, double clamp_v, const std::vector<bool>& needs,
                                       int64_t tile_rows) {
  check_rays(x0_, dirs_);
  TORCH_CHECK(mode == kRecompute || mode == kStore, kOp, ": backward needs a forward in recompute or store mode");
  const at::Tensor x0 = x0_.contiguous(), dirs = dirs_.contiguous(), v_xT = v_xT_.contiguous();
  const int64_t B = x0.size(0);
  const MLPWeights phi = make_mlp_weights(kOp, W, b, gamma, beta, norm, x0, B, 3, 0);
  const size_t L = phi.size();
  const LSTMWeights lw = make_lstm(x0, w_ih, w_hh, bias, w_out, b_out, phi.W.back().size(-2));
  const int64_t T = steps;
  const bool batched = batched_path(x0, tile_rows);
  const size_t n_store = mode == kStore ? (batched ? 1 : 2) * T * L : 0;
  TORCH_CHECK(saved.size() == 4 + n_store, kOp, ": wrong number of saved tensors: got ", saved.size(), ", expected ",
              4 + n_store);
  Saved sv;
  sv.xs = saved[0].contiguous();
  sv.hs = saved[1].contiguous();
  sv.cs = saved[2].contiguous();
  sv.gates = saved[3].contiguous();
  for (size_t i = 0; i < size_t(mode == kStore ? T * L : 0); ++i) {
    sv.zs.push_back(saved[4 + i].contiguous());
    if (!batched) sv.rstd.push_back(saved[4 + T * L + i].contiguous());
  }
  TORCH_CHECK(needs.size() == 6, kOp, ": needs must have 6 flags");
  const int64_t NT = batched ? 1 : at::get_num_threads();
  auto acc = [&](const at::Tensor& like, bool need) {
    if (!need || !like.defined()) return at::Tensor();
    std::vector<int64_t> shape{NT};
    for (auto s : like.sizes()) shape.push_back(s);
    return at::zeros(shape, like.options());
  };
  std::vector<at::Tensor> gW(L), gb(L), gg(L), gbe(L);
  for (size_t l = 0; l < L; ++l) {
    gW[l] = acc(phi.W[l], needs[2]);
    gb[l] = acc(phi.b[l], needs[3]);
    gg[l] = acc(phi.gamma[l], needs[4]);
    gbe[l] = acc(phi.beta[l], needs[5]);
  }
  at::Tensor g_wih = acc(lw.w_ih, true), g_whh = acc(lw.w_hh, true), g_bias = acc(lw.bias, true);
  at::Tensor g_wout = acc(lw.w_out.view({1, -1}), true), g_bout = acc(lw.b_out, true);
  auto grads_of = [&](int64_t tid, MLPGrads& gp, LSTMGrads& gl) {
    for (size_t l = 0; l < L; ++l) {
      gp.W.push_back(gW[l].defined() ? gW[l][tid] : at::Tensor());
      gp.b.push_back(gb[l].defined() ? gb[l][tid] : at::Tensor());
      gp.gamma.push_back(gg[l].defined() ? gg[l][tid] : at::Tensor());
      gp.beta.push_back(gbe[l].defined() ? gbe[l][tid] : at::Tensor());
    }
    gl = LSTMGrads{g_wih[tid], g_whh[tid], g_bias[tid], g_wout[tid], g_bout[tid]};
  };
  at::Tensor v_x0, v_dirs;
  if (batched) {
    c10::DeviceGuard guard(x0.device());
    MLPGrads gp;
    LSTMGrads gl;
    grads_of(0, gp, gl);
    auto r = march_tile_backward(phi, lw, dirs, v_xT, T, mode, clamp_v, sv, gp, gl);
    v_x0 = r.first;
    v_dirs = r.second;
  } else {
    v_x0 = at::empty_like(x0);
    v_dirs = at::empty_like(x0);
    Accumulators acc{gW, gb, gg, gbe, g_wih, g_whh, g_bias, g_wout, g_bout};
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "march_backward", [&] {
      backward_cpu<scalar_t>(phi, lw, x0, dirs, v_xT, T, clamp_v, sv, acc, v_x0, v_dirs, tile_rows);
    });
  }
  auto reduce = [NT](const at::Tensor& t) { return !t.defined() ? t : (NT == 1 ? t[0] : t.sum(0)); };
  std::vector<at::Tensor> out{needs[0] ? v_x0 : at::Tensor(), needs[1] ? v_dirs : at::Tensor()};
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gW[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gb[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gg[l]));
  for (size_t l = 0; l < L; ++l) out.push_back(reduce(gbe[l]));
  out.push_back(reduce(g_wih));
  out.push_back(reduce(g_whh));
  out.push_back(reduce(g_bias));
  out.push_back(reduce(g_wout));
  out.push_back(reduce(g_bout));
  return out;
}

void register_march(pybind11::module& m) {
  m.def("march_forward", &march_forward, "Fused ray march forward");
  m.def("march_backward", &march_backward, "Fused ray march backward");
}

}  // namespace srn
