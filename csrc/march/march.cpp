// srn_fast.ops.march: the reference ray marcher (phi -> LSTMCell -> step along the ray, T times) fused into one
// op with a hand-written backward that walks the steps in reverse.
//
// Memory: in "recompute" mode the forward keeps per step and ray only x_t, h_t, c_t and the LSTM gates
// (3 + 2H + 4H numbers) and the backward recomputes phi's activations; "store" mode keeps phi's activations
// as well; "inference" keeps nothing.
//   CPU (march_cpu.h): tiles of ~128 rays of one scene go through all steps while they are in cache, in parallel
//        over tiles, on raw pointers (phi via srn::tile, the LSTM's products via AVX-512 loops or cpu::gemm, cell
//        loops vectorised); a plain linear last layer of phi (not the reference's: LayerNorm in every layer) is
//        folded into the LSTM's input GEMM (LstmInput below).
//   CUDA (march_tile_forward / march_tile_backward below): the whole batch is one tile: batched GEMMs through
//        ATen (cuBLAS) with the torch-free element-wise kernels of common/elementwise_kernels.cu between them.
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include "common/checks.h"
#include "common/elementwise.h"
#include "common/mlp_tile.h"
#include "common/scratch_pool.h"
#include "common/tile_loops.h"
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
    at::Tensor pre = at::mm(v.reshape({M, v.size(2)}), lw.w_ih.t());  // the bias is added in the step row
    pre.addmm_(h, lw.w_hh.t());
    at::Tensor c_new = at::empty_like(c), h_new = at::empty_like(h), x_new = at::empty({M, 3}, x0.options());
    lstm_step_forward(pre, lw.bias, c, x.reshape({M, 3}), d2, lw.w_out, lw.b_out, c_new, h_new, x_new);
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

// Pointers to sv's buffers; of the per-step activations (sv.zs / sv.rstd: L per step) only those of the first L_run
// layers, the ones the tiles run.
template <typename T>
march_cpu::Saved<T> saved_ptrs(const Saved& sv, int64_t BN, size_t L, size_t L_run) {
  march_cpu::Saved<T> p;
  auto ptr = [](const at::Tensor& t) {  // null: none, or not of type T
    return t.defined() && t.scalar_type() == c10::CppTypeToScalarType<T>::value ? t.data_ptr<T>() : nullptr;
  };
  p.xs = ptr(sv.xs);
  p.hs = ptr(sv.hs);
  p.cs = ptr(sv.cs);
  p.gates = ptr(sv.gates);
  p.steps = ptr(sv.steps);
  for (size_t i = 0; i < sv.zs.size(); ++i) {
    if (i % L >= L_run) continue;
    p.act.push_back(ptr(sv.zs[i]));
    const bool mm = sv.zs[i].defined() && sv.zs[i].scalar_type() == at::kBFloat16;  // shapes.xhat_dtype
    p.act_mm.push_back(mm ? sv.zs[i].data_ptr<at::BFloat16>() : nullptr);
    p.rstd.push_back(ptr(sv.rstd[i]));
  }
  p.BN = BN;
  return p;
}

// ---- the LSTM's input on the CPU tiles: one GEMM, phi's last layer folded into it ----------------------------
// The tiles compute the gate pre-activations as one product [feat | h] [W_ih | W_hh]^T (march_cpu.h). When phi's
// last layer is plain linear (feat = a W_L^T + b_L, a = the output of layer L - 2, C wide), the march uses feat only
// there, so per scene s
//   feat W_ih^T = a M_s^T + W_ih b_L,s        with M_s = W_ih W_L,s  [4H, C]  (one small GEMM per op call)
// and the tiles never evaluate phi's last layer: a third of phi's 256-wide GEMMs (forward, recompute, input gradient
// and weight gradient) leaves every step, while the LSTM's GEMM keeps its size and stays in T (float32 under bf16
// too). Backward accumulates per scene G_s = sum v_pre^T [a | h_prev] [4H, C + H] and u_s = sum v_pre [4H] (the
// same GEMM as the unfolded one, against a instead of feat), and after the tiles, with G_s = [G_a,s | G_h,s]:
//   grad W_hh = sum_s G_h,s,  grad bias = sum_s u_s,  grad W_ih = sum_s G_a,s W_L,s^T + u_s b_L,s^T,
//   grad W_L,s = W_ih^T G_a,s,  grad b_L,s = W_ih^T u_s   (summed over s for shared weights).
// Unfolded (a last layer with LayerNorm, or phi of one layer) G_a,s is the gradient of W_ih itself.
struct LstmInput {
  bool fold = false;
  at::Tensor W_L, b_L;  // folded: phi's last layer per scene [B, F, C], [B, F] (shared ones expanded)
  at::Tensor w_in;      // [B, 4H, F' + H]: [W_ih (folded: M_s) | W_hh] per scene; F' = C folded, else F
  at::Tensor w_in_t;    // [B, F' + H, 4H]: w_in transposed (the AVX-512 forward's operand)
  at::Tensor bias;      // [B, 4H]: b_ih + b_hh (folded: + W_ih b_L,s)
};

// phi's last layer is folded on the CPU tiles (not the batched path) when it is plain linear and not the only one.
bool folds_last(const std::vector<bool>& norm, bool batched) {
  return !batched && norm.size() >= 2 && !norm.back();
}

LstmInput make_lstm_input(const MLPWeights& phi, const LSTMWeights& lw, int64_t B, bool batched) {
  LstmInput in;
  in.fold = folds_last(phi.norm, batched);
  const int64_t H4 = lw.w_ih.size(0);
  at::Tensor w_ih = lw.w_ih.unsqueeze(0).expand({B, H4, lw.w_ih.size(1)}), bias = lw.bias.unsqueeze(0);
  if (in.fold) {
    const at::Tensor& W = phi.W.back();  // [B, F, C] or [F, C]
    const at::Tensor& b = phi.b.back();  // [B, F] or [F]
    in.W_L = W.dim() == 3 ? W : W.unsqueeze(0).expand({B, W.size(0), W.size(1)});
    in.b_L = b.dim() == 2 ? b : b.unsqueeze(0).expand({B, b.size(0)});
    w_ih = at::matmul(lw.w_ih, in.W_L);
    bias = bias + at::matmul(in.b_L, lw.w_ih.t());
  }
  in.w_in = at::cat({w_ih, lw.w_hh.unsqueeze(0).expand({B, H4, lw.w_hh.size(1)})}, 2).contiguous();
  in.w_in_t = in.w_in.transpose(1, 2).contiguous();
  in.bias = bias.expand({B, H4}).contiguous();
  return in;
}

// The LSTM the tiles of scene s run.
template <typename T>
march_cpu::Lstm<T> scene_lstm(const LSTMWeights& lw, const LstmInput& in, int64_t s) {
  const int64_t H4 = in.w_in.size(1), K = in.w_in.size(2), H = lw.w_hh.size(1);
  return march_cpu::Lstm<T>{in.w_in.data_ptr<T>() + s * H4 * K, in.w_in_t.data_ptr<T>() + s * H4 * K,
                            in.bias.data_ptr<T>() + s * H4, lw.w_out.data_ptr<T>(), lw.b_out.data_ptr<T>(), H, K - H};
}

// After the tiles: the per-scene accumulators G [threads, B, 4H, F' + H] and u [threads, B, 4H] into the LSTM's
// gradients (thread 0's slot of acc.w_ih, w_hh, bias) and, folded, phi's last layer's (where wanted).
void unpack_lstm_grads(const LstmInput& in, const LSTMWeights& lw, const at::Tensor& G_acc, const at::Tensor& u_acc,
                       Accumulators& acc) {
  const int64_t H = lw.w_hh.size(1), Fp = in.w_in.size(2) - H;
  const at::Tensor G = G_acc.sum(0), u = u_acc.sum(0);  // [B, 4H, F' + H], [B, 4H]
  const at::Tensor G_a = G.narrow(2, 0, Fp);
  acc.w_hh[0].add_(G.narrow(2, Fp, H).sum(0));
  acc.bias[0].add_(u.sum(0));
  if (!in.fold) {
    acc.w_ih[0].add_(G_a.sum(0));
    return;
  }
  acc.w_ih[0].add_(at::matmul(G_a, in.W_L.transpose(1, 2)).sum(0)).addmm_(u.t(), in.b_L);
  at::Tensor& gW = acc.W.back();
  if (gW.defined()) {
    const at::Tensor g = at::matmul(lw.w_ih.t(), G_a);  // [B, F, C]
    gW[0].add_(gW.dim() == 4 ? g : g.sum(0));
  }
  at::Tensor& gb = acc.b.back();
  if (gb.defined()) {
    const at::Tensor g = at::matmul(u, lw.w_ih);  // [B, F]
    gb[0].add_(gb.dim() == 3 ? g : g.sum(0));
  }
}

// What the CPU tile loops of one op call share: the tile grid, every scene's layers, the saved buffers and scene 0's
// LSTM (its sizes). The tiles run phi's first L_run layers: all L, or L - 1 where the last is folded (LstmInput).
template <typename T>
struct CpuTiles {
  int L, L_run;
  tile::Grid grid;
  std::vector<std::vector<tile::Layer<T>>> layers;
  march_cpu::Saved<T> sp;
  march_cpu::Lstm<T> l0;
  CpuTiles(const MLPWeights& phi, const LSTMWeights& lw, const LstmInput& lin, const Saved& sv, int64_t B, int64_t N,
           int64_t tile_rows, bool bf16)
      : L(static_cast<int>(phi.size())),
        L_run(lin.fold ? L - 1 : L),
        grid(tile::make_grid(B, N, tile_rows)),
        layers(tile::all_scene_layers<T>(phi, B, bf16)),
        sp(saved_ptrs<T>(sv, B * N, L, L_run)),
        l0(scene_lstm<T>(lw, lin, 0)) {}
};

template <typename T>
void forward_cpu(const MLPWeights& phi, const LSTMWeights& lw, const LstmInput& lin, const at::Tensor& x0,
                 const at::Tensor& dirs, int64_t steps, Saved& sv, at::Tensor& xT, int64_t tile_rows, bool bf16) {
  const int64_t N = x0.size(1);
  CpuTiles<T> ct(phi, lw, lin, sv, x0.size(0), N, tile_rows, bf16);
  const tile::Grid& grid = ct.grid;
  const T* xp = x0.data_ptr<T>();
  const T* dp = dirs.data_ptr<T>();
  T* op = xT.data_ptr<T>();
  tile::parallel_tiles(grid.count(), [&](auto take) {
    tile::Workspace<T> ws(ct.layers[0].data(), ct.L_run, grid.R, false);
    march_cpu::Scratch<T> sc(grid.R, ct.l0.H, ct.l0.F, ct.L_run);
    for (int64_t i; take(i);) {
      const int64_t s = grid.scene(i), n = grid.rows(i), row = grid.row(i);
      march_cpu::tile_forward<T>(ct.layers[s].data(), ct.L_run, scene_lstm<T>(lw, lin, s), n, row, xp + row * 3,
                                 dp + row * 3, steps, op + row * 3, ct.sp, ws, sc);
    }
  });
}

template <typename T>
void backward_cpu(const MLPWeights& phi, const LSTMWeights& lw, const LstmInput& lin, const at::Tensor& x0,
                  const at::Tensor& dirs, const at::Tensor& v_xT, int64_t steps, double clamp_v, const Saved& sv,
                  Accumulators& acc, at::Tensor& v_x0, at::Tensor& v_dirs, int64_t tile_rows, bool bf16) {
  const int64_t B = x0.size(0), N = x0.size(1);
  CpuTiles<T> ct(phi, lw, lin, sv, B, N, tile_rows, bf16);  // bf16: both gradient GEMMs of phi in bf16
  const tile::Grid& grid = ct.grid;
  const march_cpu::Lstm<T>& l0 = ct.l0;
  // the LSTM's input-weight and bias gradients accumulate per scene (G_s, u_s; see LstmInput)
  const int64_t NT = at::get_num_threads(), H4 = 4 * l0.H;
  const at::Tensor G = pooled_zeros({NT, B, H4, l0.K()}, x0.options()), u = pooled_zeros({NT, B, H4}, x0.options());
  const T* dp = dirs.data_ptr<T>();
  const T* vp = v_xT.data_ptr<T>();
  T* vx0 = v_x0.data_ptr<T>();
  T* vd = v_dirs.data_ptr<T>();
  const bool recompute = sv.zs.empty();
  at::parallel_for(0, grid.count(), 1, [&](int64_t i0, int64_t i1) {
    const int64_t tid = at::get_thread_num();
    tile::Workspace<T> ws(ct.layers[0].data(), ct.L_run, grid.R, recompute, bf16 && cpu::weight_grad_zipped());
    march_cpu::Scratch<T> sc(grid.R, l0.H, l0.F, ct.L_run);
    auto lstm_acc = [tid](const at::Tensor& a) { return tile::acc_ptr<T>(a, tid, 0, 0, false); };
    march_cpu::LstmGrad<T> gl{nullptr, nullptr, lstm_acc(acc.w_out), lstm_acc(acc.b_out)};
    std::vector<tile::LayerGrad<T>> gp(ct.L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = grid.scene(i), n = grid.rows(i), row = grid.row(i);
      const auto& ly = ct.layers[s];
      for (int l = 0; l < ct.L_run; ++l) {
        const int64_t co = ly[l].cout;
        gp[l].weight = tile::acc_ptr<T>(acc.W[l], tid, s, co * ly[l].cin, phi.per_scene(l));
        gp[l].bias = tile::acc_ptr<T>(acc.b[l], tid, s, co, phi.b[l].dim() == 2);
        gp[l].ln_weight = tile::acc_ptr<T>(acc.gamma[l], tid, s, co, false);
        gp[l].ln_bias = tile::acc_ptr<T>(acc.beta[l], tid, s, co, false);
      }
      gl.w_in = tile::acc_ptr<T>(G, tid, s, H4 * l0.K(), true);
      gl.bias = tile::acc_ptr<T>(u, tid, s, H4, true);
      const bool more = i + 1 < i1;
      march_cpu::tile_backward<T>(ly.data(), ct.L_run, scene_lstm<T>(lw, lin, s), n, row, dp + row * 3, steps,
                                  vp + row * 3, T(clamp_v), ct.sp, gp.data(), gl, vx0 + row * 3, vd + row * 3, ws, sc,
                                  more ? grid.row(i + 1) : 0, more ? grid.rows(i + 1) : 0);
    }
  });
  unpack_lstm_grads(lin, lw, G, u, acc);
}

}  // namespace

// The Python side (srn_fast/ops/march.py, a torch.library custom op) allocates every output from the shape
// function its fake kernel shares (srn_fast/ops/shapes.py); a tensor of shape [0] in an output slot means "not
// kept" / "not needed". Forward writes:
//   xT [B, N, 3]; steps_out [T + 1, B, N, 3] (the points of every step) or [0];
//   unless mode == inference: xs [T, B, N, 3], hs, cs [T + 1, B, N, H] (index 0 = zeros), gates [T, B, N, 4H];
//   store mode, per phi layer l: acts[l] [T, B, N, C_l] (CPU: tile::forward's saved activation; batched path: the
//   pre-norm z) and, on the CPU, rstd[l] [T, B, N] for norm layers; [0] otherwise, and for a last layer the CPU
//   tiles fold into the LSTM (LstmInput). acts are x0's dtype, but bf16 for a norm layer's xhat on the CPU tiles
//   with mm_dtype 1 (checks.h xhat_dtype).
void march_forward(const at::Tensor& x0_, const at::Tensor& dirs_, const std::vector<at::Tensor>& W,
                   const std::vector<at::Tensor>& b, const std::vector<c10::optional<at::Tensor>>& gamma,
                   const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                   const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias, const at::Tensor& w_out,
                   const at::Tensor& b_out, int64_t steps, int64_t mode, int64_t tile_rows, int64_t mm_dtype,
                   at::Tensor xT, at::Tensor steps_out, at::Tensor xs, at::Tensor hs, at::Tensor cs, at::Tensor gates,
                   std::vector<at::Tensor> acts, std::vector<at::Tensor> rstd) {
  check_rays(x0_, dirs_);
  TORCH_CHECK(steps >= 0, kOp, ": steps must be >= 0, got ", steps);
  TORCH_CHECK(mode >= 0 && mode <= 2, kOp, ": unknown mode ", mode);
  const at::Tensor x0 = x0_.contiguous(), dirs = dirs_.contiguous();
  const int64_t B = x0.size(0), N = x0.size(1);
  const bool batched = batched_path(x0, tile_rows);
  const MLPWeights phi = make_mlp_weights(kOp, W, b, gamma, beta, norm, x0, B, 3, mm_dtype, !batched, kPackFwd);
  const int64_t F = phi.W.back().size(-2);
  const LSTMWeights lw = make_lstm(x0, w_ih, w_hh, bias, w_out, b_out, F);
  const int64_t H = lw.w_hh.size(1), T = steps;
  const size_t L = phi.size();
  check_out(kOp, "xT", xT, {B, N, 3}, x0);
  TORCH_CHECK(acts.size() == L && rstd.size() == L, kOp, ": acts and rstd must have one entry per phi layer");
  Saved sv;
  if (!is_placeholder(steps_out)) {
    check_out(kOp, "steps", steps_out, {T + 1, B, N, 3}, x0);
    sv.steps = steps_out;
  }
  if (mode != kInference) {
    check_out(kOp, "xs", xs, {T, B, N, 3}, x0);
    check_out(kOp, "hs", hs, {T + 1, B, N, H}, x0);
    check_out(kOp, "cs", cs, {T + 1, B, N, H}, x0);
    check_out(kOp, "gates", gates, {T, B, N, 4 * H}, x0);
    sv.xs = xs, sv.hs = hs, sv.cs = cs, sv.gates = gates;
    sv.hs[0].zero_();
    sv.cs[0].zero_();
  }
  const bool folded = folds_last(phi.norm, batched);  // then phi's last layer never runs in the tiles: no acts
  for (size_t l = 0; l < L; ++l) {
    const std::string i = "[" + std::to_string(l) + "]";
    const bool keep_rstd = mode == kStore && !batched && phi.norm[l];
    if (mode == kStore && !(folded && l == L - 1)) {
      check_out(kOp, "acts" + i, acts[l], {T, B, N, phi.W[l].size(-2)}, x0,
                xhat_dtype(batched, mm_dtype, phi.norm[l], x0));
    } else {
      TORCH_CHECK(is_placeholder(acts[l]), kOp, ": acts", i, " must be a [0] placeholder");
    }
    if (keep_rstd) check_out(kOp, "rstd" + i, rstd[l], {T, B, N}, x0);
    else TORCH_CHECK(is_placeholder(rstd[l]), kOp, ": rstd", i, " must be a [0] placeholder");
  }
  if (mode == kStore) {
    for (int64_t t = 0; t < T; ++t) {
      for (size_t l = 0; l < L; ++l) {
        sv.zs.push_back(is_placeholder(acts[l]) ? at::Tensor() : acts[l][t]);
        if (!batched) sv.rstd.push_back(phi.norm[l] ? rstd[l][t] : at::Tensor());
      }
    }
  }
  if (batched) {
    c10::DeviceGuard guard(x0.device());
    xT.copy_(march_tile_forward(phi, lw, x0, dirs, T, mode, sv));
  } else {
    if (mm_dtype == 1) cpu::bf16_route();  // the bf16 GEMM route is measured once, outside the parallel loop
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "march_forward", [&] {
      forward_cpu<scalar_t>(phi, lw, make_lstm_input(phi, lw, B, batched), x0, dirs, T, sv, xT, tile_rows,
                            mm_dtype == 1);
    });
  }
}

// Backward from what march_forward saved (mode recompute or store). Writes the gradients into the outputs that are
// not [0] placeholders: v_x0, v_dirs [B, N, 3]; v_W[l], v_b[l], v_gamma[l], v_beta[l] shaped like the phi
// parameters; v_w_ih [4H, F], v_w_hh [4H, H], v_bias [4H], v_w_out [1, H], v_b_out [1].
void march_backward(const at::Tensor& v_xT_, const at::Tensor& x0_, const at::Tensor& dirs_, const at::Tensor& xs,
                    const at::Tensor& hs, const at::Tensor& cs, const at::Tensor& gates,
                    const std::vector<at::Tensor>& acts, const std::vector<at::Tensor>& rstd,
                    const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                    const std::vector<c10::optional<at::Tensor>>& gamma,
                    const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& bias, const at::Tensor& w_out,
                    const at::Tensor& b_out, int64_t steps, int64_t mode, double clamp_v, int64_t tile_rows,
                    int64_t mm_dtype, at::Tensor v_x0, at::Tensor v_dirs, std::vector<at::Tensor> v_W,
                    std::vector<at::Tensor> v_b, std::vector<at::Tensor> v_gamma, std::vector<at::Tensor> v_beta,
                    at::Tensor v_w_ih, at::Tensor v_w_hh, at::Tensor v_bias, at::Tensor v_w_out, at::Tensor v_b_out) {
  check_rays(x0_, dirs_);
  TORCH_CHECK(mode == kRecompute || mode == kStore, kOp, ": backward needs a forward in recompute or store mode");
  const at::Tensor x0 = x0_.contiguous(), dirs = dirs_.contiguous(), v_xT = v_xT_.contiguous();
  const int64_t B = x0.size(0), N = x0.size(1);
  const bool batched = batched_path(x0, tile_rows);
  const MLPWeights phi = make_mlp_weights(kOp, W, b, gamma, beta, norm, x0, B, 3, mm_dtype, !batched);
  const size_t L = phi.size();
  const LSTMWeights lw = make_lstm(x0, w_ih, w_hh, bias, w_out, b_out, phi.W.back().size(-2));
  const int64_t T = steps, H = lw.w_hh.size(1);
  check_shape(kOp, "grad_xT", v_xT, {B, N, 3}, "[B, N, 3]");
  TORCH_CHECK(acts.size() == L && rstd.size() == L, kOp, ": acts and rstd must have one entry per phi layer");
  TORCH_CHECK(v_W.size() == L && v_b.size() == L && v_gamma.size() == L && v_beta.size() == L, kOp,
              ": the gradient lists must have one entry per phi layer");
  Saved sv;
  check_shape(kOp, "xs", xs, {T, B, N, 3}, "[T, B, N, 3]");
  check_shape(kOp, "hs", hs, {T + 1, B, N, H}, "[T + 1, B, N, H]");
  check_shape(kOp, "cs", cs, {T + 1, B, N, H}, "[T + 1, B, N, H]");
  check_shape(kOp, "gates", gates, {T, B, N, 4 * H}, "[T, B, N, 4H]");
  sv.xs = xs.contiguous(), sv.hs = hs.contiguous(), sv.cs = cs.contiguous(), sv.gates = gates.contiguous();
  if (mode == kStore) {
    std::vector<at::Tensor> a(L), r(L);
    const bool folded = folds_last(phi.norm, batched);
    for (size_t l = 0; l < L; ++l) {
      if (folded && l == L - 1) continue;  // never kept (see LstmInput)
      a[l] = acts[l].contiguous();
      check_shape(kOp, "acts", a[l], {T, B, N, phi.W[l].size(-2)}, "[T, B, N, C_l]");
      const at::ScalarType want = xhat_dtype(batched, mm_dtype, phi.norm[l], x0);
      TORCH_CHECK(a[l].scalar_type() == want, kOp, ": acts[", l, "] must be ", want, " (what the forward keeps), got ",
                  a[l].scalar_type());
      if (!batched && phi.norm[l]) {
        r[l] = rstd[l].contiguous();
        check_shape(kOp, "rstd", r[l], {T, B, N}, "[T, B, N]");
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      for (size_t l = 0; l < L; ++l) {
        sv.zs.push_back(a[l].defined() ? a[l][t] : at::Tensor());
        if (!batched) sv.rstd.push_back(r[l].defined() ? r[l][t] : at::Tensor());
      }
    }
  }
  const int64_t NT = batched ? 1 : at::get_num_threads();
  auto wanted = [&](const at::Tensor& out, const at::Tensor& like, const std::string& what) {
    if (is_placeholder(out)) return false;
    TORCH_CHECK(like.defined(), kOp, ": ", what, " has no parameter to take a gradient of");
    check_out(kOp, what, out, like.sizes(), x0);
    return true;
  };
  std::vector<at::Tensor> gW(L), gb(L), gg(L), gbe(L);
  const bool folded = folds_last(phi.norm, batched);
  for (size_t l = 0; l < L; ++l) {
    const std::string i = "[" + std::to_string(l) + "]";
    // a folded last layer never runs in the tiles: its gradients come from unpack_lstm_grads, into slot 0 only
    const int64_t slots = folded && l == L - 1 ? 1 : NT;
    gW[l] = tile::thread_acc(slots, phi.W[l], wanted(v_W[l], phi.W[l], "grad_weights" + i));
    gb[l] = tile::thread_acc(slots, phi.b[l], wanted(v_b[l], phi.b[l], "grad_biases" + i));
    gg[l] = tile::thread_acc(NT, phi.gamma[l], wanted(v_gamma[l], phi.gamma[l], "grad_ln_weights" + i));
    gbe[l] = tile::thread_acc(NT, phi.beta[l], wanted(v_beta[l], phi.beta[l], "grad_ln_biases" + i));
  }
  // The LSTM's gradients are accumulated always (cheap); only the wanted ones are written out.
  wanted(v_w_ih, w_ih, "grad_w_ih");
  wanted(v_w_hh, w_hh, "grad_w_hh");
  wanted(v_bias, bias, "grad_bias");
  wanted(v_w_out, w_out, "grad_w_out");
  wanted(v_b_out, b_out, "grad_b_out");
  // w_ih, w_hh and the bias: one slot (the CPU tiles sum per thread and scene into G / u, which unpack_lstm_grads
  // adds into slot 0; the batched path uses slot 0); w_out and b_out: one per thread
  at::Tensor g_wih = tile::thread_acc(1, lw.w_ih, true), g_whh = tile::thread_acc(1, lw.w_hh, true);
  at::Tensor g_bias = tile::thread_acc(1, lw.bias, true);
  at::Tensor g_wout = tile::thread_acc(NT, lw.w_out.view({1, -1}), true), g_bout = tile::thread_acc(NT, lw.b_out, true);
  at::Tensor vx0, vdirs;
  if (batched) {
    c10::DeviceGuard guard(x0.device());
    MLPGrads gp;
    for (size_t l = 0; l < L; ++l) {
      gp.W.push_back(gW[l].defined() ? gW[l][0] : at::Tensor());
      gp.b.push_back(gb[l].defined() ? gb[l][0] : at::Tensor());
      gp.gamma.push_back(gg[l].defined() ? gg[l][0] : at::Tensor());
      gp.beta.push_back(gbe[l].defined() ? gbe[l][0] : at::Tensor());
    }
    LSTMGrads gl{g_wih[0], g_whh[0], g_bias[0], g_wout[0], g_bout[0]};
    std::tie(vx0, vdirs) = march_tile_backward(phi, lw, dirs, v_xT, T, mode, clamp_v, sv, gp, gl);
  } else {
    vx0 = at::empty_like(x0);
    vdirs = at::empty_like(x0);
    Accumulators acc{gW, gb, gg, gbe, g_wih, g_whh, g_bias, g_wout, g_bout};
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "march_backward", [&] {
      backward_cpu<scalar_t>(phi, lw, make_lstm_input(phi, lw, B, batched), x0, dirs, v_xT, T, clamp_v, sv, acc, vx0,
                             vdirs, tile_rows, mm_dtype == 1);
    });
  }
  if (!is_placeholder(v_x0)) {
    check_out(kOp, "grad_x0", v_x0, x0.sizes(), x0);
    v_x0.copy_(vx0);
  }
  if (!is_placeholder(v_dirs)) {
    check_out(kOp, "grad_dirs", v_dirs, x0.sizes(), x0);
    v_dirs.copy_(vdirs);
  }
  for (size_t l = 0; l < L; ++l) {
    reduce_into(v_W[l], gW[l]);
    reduce_into(v_b[l], gb[l]);
    reduce_into(v_gamma[l], gg[l]);
    reduce_into(v_beta[l], gbe[l]);
  }
  reduce_into(v_w_ih, g_wih);
  reduce_into(v_w_hh, g_whh);
  reduce_into(v_bias, g_bias);
  reduce_into(v_w_out, g_wout);
  reduce_into(v_b_out, g_bout);
}

void register_march(pybind11::module& m) {
  namespace py = pybind11;
  m.def("march_forward", &march_forward, "Fused ray march forward into allocated outputs (see march.cpp)",
        py::arg("x0"), py::arg("dirs"), py::arg("weights"), py::arg("biases"), py::arg("ln_weights"),
        py::arg("ln_biases"), py::arg("norm"), py::arg("w_ih"), py::arg("w_hh"), py::arg("bias"), py::arg("w_out"),
        py::arg("b_out"), py::arg("steps"), py::arg("mode"), py::arg("tile_rows"), py::arg("mm_dtype"),
        py::arg("xT"), py::arg("steps_out"), py::arg("xs"), py::arg("hs"), py::arg("cs"), py::arg("gates"),
        py::arg("acts"), py::arg("rstd"));
  m.def("march_backward", &march_backward, "Fused ray march backward into allocated outputs (see march.cpp)",
        py::arg("grad_xT"), py::arg("x0"), py::arg("dirs"), py::arg("xs"), py::arg("hs"), py::arg("cs"),
        py::arg("gates"), py::arg("acts"), py::arg("rstd"), py::arg("weights"), py::arg("biases"),
        py::arg("ln_weights"), py::arg("ln_biases"), py::arg("norm"), py::arg("w_ih"), py::arg("w_hh"),
        py::arg("bias"), py::arg("w_out"), py::arg("b_out"), py::arg("steps"), py::arg("mode"), py::arg("clamp"),
        py::arg("tile_rows"), py::arg("mm_dtype"), py::arg("grad_x0"), py::arg("grad_dirs"),
        py::arg("grad_weights"), py::arg("grad_biases"), py::arg("grad_ln_weights"), py::arg("grad_ln_biases"),
        py::arg("grad_w_ih"), py::arg("grad_w_hh"), py::arg("grad_bias"), py::arg("grad_w_out"),
        py::arg("grad_b_out"));
}

}  // namespace srn
