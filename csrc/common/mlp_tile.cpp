#include "common/mlp_tile.h"

#include <ATen/Parallel.h>

#include <cstring>

#include "common/checks.h"
#include "common/elementwise.h"

namespace srn {

namespace {

// z = a W^T + b for a [S, R, C_in].
at::Tensor linear(const MLPWeights& w, size_t l, const at::Tensor& a) {
  const at::Tensor& Wm = w.W_mm[l];
  const bool lowp = Wm.scalar_type() != a.scalar_type();
  const at::Tensor am = lowp ? a.to(Wm.scalar_type()) : a;
  if (w.per_scene(l)) {
    if (!lowp) return at::baddbmm(w.b[l].unsqueeze(1), am, Wm.transpose(1, 2));
    return at::bmm(am, Wm.transpose(1, 2)).to(a.scalar_type()).add_(w.b[l].unsqueeze(1));
  }
  const int64_t S = a.size(0), R = a.size(1);
  const auto a2 = am.reshape({S * R, a.size(2)});
  at::Tensor z = lowp ? at::mm(a2, Wm.t()).to(a.scalar_type()).add_(w.b[l]) : at::addmm(w.b[l], a2, Wm.t());
  return z.view({S, R, Wm.size(0)});
}

at::Tensor activation(const MLPWeights& w, size_t l, const at::Tensor& z) {
  return w.norm[l] ? ln_relu_forward(z, w.gamma[l], w.beta[l]) : z;
}

}  // namespace

at::Tensor mlp_tile_forward(const MLPWeights& w, const at::Tensor& x, std::vector<at::Tensor>* zs,
                            std::vector<at::Tensor>* ys) {
  at::Tensor a = x;
  for (size_t l = 0; l < w.size(); ++l) {
    at::Tensor z = linear(w, l, a);
    a = activation(w, l, z);
    if (zs) zs->push_back(z);
    if (ys) ys->push_back(a);
  }
  return a;
}

at::Tensor mlp_tile_backward(const MLPWeights& w, const at::Tensor& x, const std::vector<at::Tensor>& zs,
                             const std::vector<at::Tensor>& ys, const at::Tensor& v_out, MLPGrads& g, bool need_vx) {
  at::Tensor v = v_out;
  const int64_t S = x.size(0), R = x.size(1);
  for (size_t li = w.size(); li-- > 0;) {
    const at::Tensor a = li == 0 ? x : (ys.empty() ? activation(w, li - 1, zs[li - 1]) : ys[li - 1]);
    const at::Tensor v_z = w.norm[li]
                               ? ln_relu_backward(zs[li], v, w.gamma[li], w.beta[li],
                                                  g.gamma.empty() ? at::Tensor() : g.gamma[li],
                                                  g.beta.empty() ? at::Tensor() : g.beta[li])
                               : v;
    // bf16 layers (W_mm in bf16): both gradient GEMMs in bf16 with float32 accumulation (cuBLAS on CUDA)
    const at::Tensor& Wm = w.W_mm[li];
    const bool lowp = Wm.scalar_type() != v_z.scalar_type();
    const at::Tensor vzm = lowp ? v_z.to(Wm.scalar_type()) : v_z, am = lowp ? a.to(Wm.scalar_type()) : a;
    const int64_t Co = v_z.size(2), Ci = a.size(2);
    if (w.per_scene(li)) {
      if (g.W[li].defined()) {
        if (lowp) g.W[li].add_(at::bmm(vzm.transpose(1, 2), am));
        else g.W[li].baddbmm_(v_z.transpose(1, 2), a);
      }
      if (g.b[li].defined()) g.b[li].add_(v_z.sum(1));
    } else {
      const auto v2 = vzm.reshape({S * R, Co});
      if (g.W[li].defined()) {
        if (lowp) g.W[li].add_(at::mm(v2.t(), am.reshape({S * R, Ci})));
        else g.W[li].addmm_(v2.t(), a.reshape({S * R, Ci}));
      }
      if (g.b[li].defined()) g.b[li].add_(v_z.reshape({S * R, Co}).sum(0));
    }
    if (li > 0 || need_vx) {
      v = w.per_scene(li) ? at::bmm(vzm, Wm) : at::mm(vzm.reshape({S * R, Co}), Wm).view({S, R, Ci});
      if (lowp) v = v.to(v_z.scalar_type());
    }
  }
  return need_vx ? v : at::Tensor();
}

// The CPU tile loops' bf16 layers (`layers`), prepared in one parallel pass over (layer, scene): W rounded to bf16
// into W_mm (round to nearest even, as at::Tensor::to), widened back to float32 into W_wide for the "widened" route,
// packed into W_pk for the "avx512bf16" / "amx" routes, [fwd | bwd] per scene (the forward's op(B) = W^T, then the
// input gradient's op(B) = W; see Layer::weight_pk_fwd / _bwd), the directions in `pack` only. A conversion through
// ATen and a packing pass per layer took ~90 us per 2 x 256 x 256 layer, 0.3 ms of a 3.8 ms bf16 phi forward.
static void prepare_bf16(MLPWeights& w, const std::vector<size_t>& layers, int pack) {
  std::vector<std::pair<size_t, int64_t>> jobs;  // (layer, scene)
  for (size_t l : layers) {
    for (int64_t s = 0; s < (w.per_scene(l) ? w.W[l].size(0) : 1); ++s) jobs.emplace_back(l, s);
  }
  at::parallel_for(0, int64_t(jobs.size()), 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const auto [l, s] = jobs[j];
      const int64_t Co = w.W[l].size(-2), Ci = w.W[l].size(-1), n = Co * Ci;
      const float* src = w.W[l].data_ptr<float>() + s * n;
      c10::BFloat16* dst = w.W_mm[l].data_ptr<at::BFloat16>() + s * n;
      SRN_SIMD
      for (int64_t i = 0; i < n; ++i) dst[i] = to_storage<c10::BFloat16, float>(src[i]);
      if (w.W_wide[l].defined()) {
        float* wide = w.W_wide[l].data_ptr<float>() + s * n;
        SRN_SIMD
        for (int64_t i = 0; i < n; ++i) wide[i] = float(dst[i]);
      }
      if (w.W_pk[l].defined()) {
        const int64_t fwd = cpu::bf16_packed_words(Ci, Co);
        uint32_t* P = reinterpret_cast<uint32_t*>(w.W_pk[l].data_ptr<int32_t>()) + s * w.W_pk[l].size(1);
        if (pack & kPackFwd) cpu::bf16_pack_b(true, Ci, Co, dst, Ci, P);
        if (pack & kPackBwd) cpu::bf16_pack_b(false, Co, Ci, dst, Ci, P + fwd);
      }
    }
  });
}

MLPWeights make_mlp_weights(const char* op, const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& b,
                            const std::vector<c10::optional<at::Tensor>>& gamma,
                            const std::vector<c10::optional<at::Tensor>>& beta, const std::vector<bool>& norm,
                            const at::Tensor& x, int64_t B, int64_t C_in, int64_t mm_dtype, bool tiles, int pack) {
  const size_t L = W.size();
  TORCH_CHECK(L > 0, op, ": layers must hold at least one layer");
  TORCH_CHECK(b.size() == L && gamma.size() == L && beta.size() == L && norm.size() == L, op,
              ": weights, biases, ln weights, ln biases and norm flags must have one entry per layer (got ", L, ", ",
              b.size(), ", ", gamma.size(), ", ", beta.size(), ", ", norm.size(), ")");
  MLPWeights w;
  // CPU float32 bf16 layers on the "widened" route get their weights widened here, once per op call; on the
  // "avx512bf16" route, packed
  const bool cpu_bf16 = tiles && mm_dtype == 1 && x.is_cpu() && x.scalar_type() == at::kFloat;
  const char* route = cpu_bf16 ? cpu::bf16_route() : "";
  const bool widened_route = std::strcmp(route, "widened") == 0;
  const bool packed_route = cpu_bf16 && cpu::bf16_route_packs_b();
  int64_t c = C_in;
  std::vector<size_t> prepared;  // the layers prepare_bf16 fills
  for (size_t l = 0; l < L; ++l) {
    const std::string wn = "layers[" + std::to_string(l) + "].weight", bn = "layers[" + std::to_string(l) + "].bias";
    const at::Tensor& Wl = W[l];
    check_same(op, wn.c_str(), Wl, x, "x");
    check_same(op, bn.c_str(), b[l], x, "x");
    TORCH_CHECK(Wl.dim() == 2 || Wl.dim() == 3, op, ": ", wn, " must have shape [C_out, C_in] or [B, C_out, C_in], got ",
                shape_str(Wl));
    const int64_t Co = Wl.size(-2), Ci = Wl.size(-1);
    TORCH_CHECK(Ci == c, op, ": ", wn, " has C_in = ", Ci, " but its input has ", c, " channels (", wn, " shape ",
                shape_str(Wl), ")");
    if (Wl.dim() == 3) {
      TORCH_CHECK(Wl.size(0) == B, op, ": ", wn, " is per scene with ", Wl.size(0), " scenes but x has B = ", B);
      check_shape(op, bn.c_str(), b[l], {B, Co}, "[B, C_out] for a per-scene weight");
    } else {
      check_shape(op, bn.c_str(), b[l], {Co}, "[C_out] for a shared weight");
    }
    at::Tensor g = gamma[l].has_value() ? *gamma[l] : at::Tensor();
    at::Tensor be = beta[l].has_value() ? *beta[l] : at::Tensor();
    TORCH_CHECK(g.defined() == be.defined(), op, ": layers[", l, "]: ln_weight and ln_bias must be given together");
    TORCH_CHECK(norm[l] || !g.defined(), op, ": layers[", l, "] has LayerNorm parameters but norm=False");
    if (g.defined()) {
      check_same(op, "ln_weight", g, x, "x");
      check_same(op, "ln_bias", be, x, "x");
      check_shape(op, ("layers[" + std::to_string(l) + "].ln_weight").c_str(), g, {Co}, "[C_out]");
      check_shape(op, ("layers[" + std::to_string(l) + "].ln_bias").c_str(), be, {Co}, "[C_out]");
      g = g.contiguous();
      be = be.contiguous();
    }
    const at::Tensor Wc = Wl.contiguous();
    w.W.push_back(Wc);
    // bf16 copies only for layers at least tile::kMinBf16Width wide on both sides (see mlp_tile.h), on every path
    const bool bf16_layer = mm_dtype == 1 && std::min(Co, Ci) >= tile::kMinBf16Width;
    if (bf16_layer && cpu_bf16) {  // filled by prepare_bf16 below
      w.W_mm.push_back(at::empty(Wc.sizes(), Wc.options().dtype(at::kBFloat16)));
      w.W_wide.push_back(widened_route ? at::empty(Wc.sizes(), Wc.options()) : at::Tensor());
      const int64_t words = cpu::bf16_packed_words(Ci, Co) + cpu::bf16_packed_words(Co, Ci);
      w.W_pk.push_back(packed_route ? at::empty({Wl.dim() == 3 ? B : 1, words}, Wc.options().dtype(at::kInt))
                                    : at::Tensor());
      prepared.push_back(l);
    } else {
      w.W_mm.push_back(bf16_layer ? Wc.to(at::kBFloat16) : Wc);
      w.W_wide.push_back(at::Tensor());
      w.W_pk.push_back(at::Tensor());
    }
    w.b.push_back(b[l].contiguous());
    w.gamma.push_back(g);
    w.beta.push_back(be);
    w.norm.push_back(norm[l]);
    c = Co;
  }
  if (!prepared.empty()) prepare_bf16(w, prepared, pack);
  return w;
}

}  // namespace srn
