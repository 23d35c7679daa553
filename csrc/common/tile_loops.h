// The parallel loops around srn::tile (csrc/common/mlp_tile.h) on the CPU: each scene's tile layers, per-thread (or
// per-chunk) gradient accumulators, and the grid of tiles over a [B, N] batch of rays. Used by the fused MLP op
// (csrc/mlp) and the fused march (csrc/march).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "common/mlp_tile.h"
#include "common/scratch_pool.h"

namespace srn {
namespace tile {

// The tile layers of scene b of w (per-scene weights sliced, shared ones as they are). With bf16, layers at least
// kMinBf16Width (mlp_tile.h) wide on both sides get their bf16 weight copy (w.W_mm) for reduced-precision matmuls;
// narrower ones (phi's 3-wide input layer, the 3-wide rgb layer) stay in T: they cost nothing and rounding point
// coordinates to bf16 would shift them by ~0.4%.
template <typename T>
std::vector<Layer<T>> scene_layers(const MLPWeights& w, int64_t b, bool bf16) {
  std::vector<Layer<T>> out(w.size());
  for (size_t l = 0; l < w.size(); ++l) {
    Layer<T>& t = out[l];
    const bool ps = w.per_scene(l);
    t.cout = w.W[l].size(-2);
    t.cin = w.W[l].size(-1);
    t.weight = w.W[l].data_ptr<T>() + (ps ? b * t.cout * t.cin : 0);
    t.bias = w.b[l].data_ptr<T>() + (w.b[l].dim() == 2 ? b * t.cout : 0);
    t.ln_weight = w.gamma[l].defined() ? w.gamma[l].data_ptr<T>() : nullptr;
    t.ln_bias = w.beta[l].defined() ? w.beta[l].data_ptr<T>() : nullptr;
    t.norm = w.norm[l];
    if (bf16 && std::min(t.cin, t.cout) >= kMinBf16Width) {
      t.weight_mm = w.W_mm[l].data_ptr<at::BFloat16>() + (ps ? b * t.cout * t.cin : 0);
      if (l < w.W_wide.size() && w.W_wide[l].defined()) {
        t.weight_wide = w.W_wide[l].data_ptr<float>() + (ps ? b * t.cout * t.cin : 0);
      }
      if (l < w.W_pk.size() && w.W_pk[l].defined()) {
        const at::Tensor& pk = w.W_pk[l];
        t.weight_pk_fwd = reinterpret_cast<const uint32_t*>(pk.data_ptr<int32_t>()) + (ps ? b * pk.size(1) : 0);
        t.weight_pk_bwd = t.weight_pk_fwd + cpu::bf16_packed_words(t.cin, t.cout);
      }
    }
  }
  return out;
}

// scene_layers() of every scene b < B.
template <typename T>
std::vector<std::vector<Layer<T>>> all_scene_layers(const MLPWeights& w, int64_t B, bool bf16) {
  std::vector<std::vector<Layer<T>>> out;
  for (int64_t b = 0; b < B; ++b) out.push_back(scene_layers<T>(w, b, bf16));
  return out;
}

// Per-thread gradient accumulators: [threads, ...like], zeroed, reused between calls (scratch_pool.h); undefined
// when not needed.
inline at::Tensor thread_acc(int64_t threads, const at::Tensor& like, bool need) {
  if (!need || !like.defined()) return at::Tensor();
  std::vector<int64_t> shape{threads};
  for (auto s : like.sizes()) shape.push_back(s);
  return pooled_zeros(shape, like.options());
}

// The same left uninitialised, for loops where each slot's user zeroes it first (zero_slot).
inline at::Tensor slot_acc(int64_t slots, const at::Tensor& like, bool need) {
  if (!need || !like.defined()) return at::Tensor();
  std::vector<int64_t> shape{slots};
  for (auto s : like.sizes()) shape.push_back(s);
  return pooled_empty(shape, like.options());
}

// Zeroes slot k of slot_acc() (nothing when undefined).
template <typename T>
void zero_slot(const at::Tensor& acc, int64_t k) {
  if (!acc.defined()) return;
  const int64_t numel = acc.numel() / acc.size(0);
  std::memset(acc.data_ptr<T>() + k * numel, 0, sizeof(T) * numel);
}

// Thread tid's accumulator of thread_acc(), at scene b when per_scene (per_scene_numel values per scene).
template <typename T>
T* acc_ptr(const at::Tensor& acc, int64_t tid, int64_t b, int64_t per_scene_numel, bool per_scene) {
  if (!acc.defined()) return nullptr;
  const int64_t numel = acc.numel() / acc.size(0);
  return acc.data_ptr<T>() + tid * numel + (per_scene ? b * per_scene_numel : 0);
}

// The CPU tiles of a [B, N] batch of rays: per scene ceil(N / R) tiles of R rows (the last one shorter); tile i
// covers scene scene(i), rows [row0(i), row0(i) + rows(i)). Tiles never straddle scenes (per-scene weights).
struct Grid {
  int64_t B, N, R, per_scene;
  int64_t count() const { return B * per_scene; }
  int64_t scene(int64_t i) const { return i / per_scene; }
  int64_t row0(int64_t i) const { return (i % per_scene) * R; }
  int64_t rows(int64_t i) const { return std::min(R, N - row0(i)); }
  int64_t row(int64_t i) const { return scene(i) * N + row0(i); }  // its first row in the flat [B * N] rows
};

inline Grid make_grid(int64_t B, int64_t N, int64_t R) {
  R = std::max<int64_t>(1, std::min<int64_t>(R, std::max<int64_t>(N, 1)));
  return Grid{B, N, R, (N + R - 1) / R};
}

// For loops that accumulate nothing (the forwards): the tiles 0..count-1 handed out one at a time by an atomic
// counter, not split in fixed shares, so a thread slowed by anything else on its core does not hold the others up at
// the end. per_thread(take) runs once on each thread (set up its scratch there), and takes tiles with
// `for (int64_t i; take(i);)`. A loop that accumulates must not use it: which thread sums which tile would then
// depend on timing, and so would the sums' last bits.
template <typename F>
void parallel_tiles(int64_t count, F per_thread) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    per_thread([&next, count](int64_t& i) { return (i = next.fetch_add(1)) < count; });
  });
}

}  // namespace tile
}  // namespace srn
