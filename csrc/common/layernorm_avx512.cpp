// The CPU tile loops' LayerNorm(+affine)+ReLU rows (srn_math.h's layernorm_relu_row<float, Y> row by row: the same
// contract and the same one-pass shifted moments) written for AVX-512: 16 floats a vector and the bf16 output through
// VCVTNEPS2BF16 (round to nearest even, like to_storage<c10::BFloat16>). The generic row, auto-vectorised by GCC 12 to
// 8-wide vectors with a five-instruction integer rounding per bf16, took ~350 cycles per 256-wide row on the AMX Xeon:
// a third of a bf16 march's forward. Likewise the VJP of a row (v_z out as float or as bf16, the bias gradient added,
// and the layer's output rebuilt from xhat as bf16 on the way), one row or two side by side. Used where the CPU has
// AVX512-BF16 (ln_row_avx512_available) for rows of a multiple of 16; compiled for every x86-64 target through
// function attributes.
#include "common/aligned.h"
#include "common/cpu_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SRN_HAVE_LN512 1
#define SRN_LN512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#else
#define SRN_HAVE_LN512 0
#endif

namespace srn {
namespace cpu {

bool ln_row_avx512_available() { return SRN_HAVE_LN512 && dpbf16_available(); }

namespace {
std::atomic<bool>& rows_flag() {
  static std::atomic<bool> on(true);
  return on;
}
}  // namespace

bool avx512_rows() { return rows_flag().load(std::memory_order_relaxed) && ln_row_avx512_available(); }
void set_avx512_rows(bool on) { rows_flag() = on; }

#if SRN_HAVE_LN512
// R rows (row strides ldz, ldx, ldy) in groups of 8: each group's moments first, two rows side by side (two
// independent accumulator chains), then its eight rstd with one vector square root and division, then its normalise
// pass while the group's rows are still in L1. One row at a time, the reductions, the square root and the division
// were a ~100-cycle dependency chain per row (a quarter of the row). The bias is added where z is read, not stored
// back into z: that store cost a third of the rows' time (microbenchmark, 128 rows of 256 in L2: 0.35 -> 0.23 ns
// per element on the AMX Xeon, with the normalisation as one FMA).
SRN_LN512_TARGET static inline __m512 biased(const float* zr, const float* bias, int64_t k) {
  const __m512 v = _mm512_loadu_ps(zr + k);
  return bias ? _mm512_add_ps(v, _mm512_loadu_ps(bias + k)) : v;
}

// A vector of a row's shifted values d into its running sums: s1 += d, s2 += d^2.
SRN_LN512_TARGET __attribute__((always_inline)) static inline void add_moments(__m512 d, __m512& s1, __m512& s2) {
  s1 = _mm512_add_ps(s1, d);
  s2 = _mm512_fmadd_ps(d, d, s2);
}

// Rows per group of the rows functions below: their moments are one __m256 (group_mean_rstd).
constexpr int kGroup = 8;

// The eight rows' mean and rstd of a group at once, from their sums of (z - shift) and (z - shift)^2: one vector
// square root and division for all of them.
SRN_LN512_TARGET static inline void group_mean_rstd(const float* sum1, const float* sum2, const float* shift,
                                                    int64_t n, float eps, float* mean, float* rstd) {
  const __m256 inv_n = _mm256_set1_ps(1.f / float(n));
  const __m256 md = _mm256_mul_ps(_mm256_load_ps(sum1), inv_n);
  __m256 var = _mm256_fnmadd_ps(md, md, _mm256_mul_ps(_mm256_load_ps(sum2), inv_n));
  var = _mm256_max_ps(var, _mm256_setzero_ps());
  _mm256_store_ps(mean, _mm256_add_ps(_mm256_load_ps(shift), md));
  _mm256_store_ps(rstd, _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_sqrt_ps(_mm256_add_ps(var, _mm256_set1_ps(eps)))));
}

// xhat gamma + beta at columns k..k+15 (gamma null: no affine, xhat itself).
SRN_LN512_TARGET __attribute__((always_inline)) static inline __m512 affine(__m512 xh, const float* gamma,
                                                                           const float* beta, int64_t k) {
  return gamma ? _mm512_fmadd_ps(xh, _mm512_loadu_ps(gamma + k), _mm512_loadu_ps(beta + k)) : xh;
}

// Whether xhat rows (row stride ldx) can take non-temporal stores: 64-byte aligned rows (torch's allocations are; a
// row of 16k floats keeps it).
static bool streamable(const float* xhat, const c10::BFloat16* xhat_mm, int64_t ldx) {
  return xhat ? is_line_aligned(xhat) && ldx % 16 == 0 : xhat_mm && is_line_aligned(xhat_mm) && ldx % 32 == 0;
}

// 16 bf16 values (their bits) widened to float, exactly.
SRN_LN512_TARGET __attribute__((always_inline)) static inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 values of a saved xhat row: float rows, or bf16 rows (xh non-null; widened exactly).
SRN_LN512_TARGET __attribute__((always_inline)) static inline __m512 load_xhat(const float* xf,
                                                                              const c10::BFloat16* xh, int64_t k) {
  if (!xh) return _mm512_loadu_ps(xf + k);
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + k)));
}

// One vector of a row's normalise pass: xhat into xr as float or into xmr as bf16 (streamed or not; both null: not
// kept), ReLU(xhat gamma + beta) into yr as float and / or ymr as bf16 (either may be null).
SRN_LN512_TARGET __attribute__((always_inline)) static inline void emit(__m512 xh, int64_t k, float* xr,
                                                                        c10::BFloat16* xmr, bool stream,
                                                                        const float* gamma, const float* beta,
                                                                        float* yr, c10::BFloat16* ymr) {
  if (xr) {
    if (stream) {
      _mm512_stream_ps(xr + k, xh);
    } else {
      _mm512_storeu_ps(xr + k, xh);
    }
  } else if (xmr) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(xh);
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(xmr + k), h);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xmr + k), h);
    }
  }
  const __m512 a = _mm512_max_ps(affine(xh, gamma, beta, k), _mm512_setzero_ps());
  if (yr) _mm512_storeu_ps(yr + k, a);
  if (ymr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(ymr + k), (__m256i)_mm512_cvtneps_pbh(a));
}

// emit for 32 columns (k..k+31) where xhat is kept as bf16 and there is no affine (phi's layers): both vectors
// rounded by one VCVTNE2PS2BF16 (VCVTNEPS2BF16 was ~40% of these rows on a Zen 4), and ReLU taken on the rounded
// bits for a bf16 output: rounding keeps the sign, so ReLU of the rounded xhat is the rounded ReLU, and on bf16 bits it
// is a signed 16-bit max with 0 (negatives and -0 have the sign bit set). The same bits as emit.
SRN_LN512_TARGET __attribute__((always_inline)) static inline void emit32_bf16(__m512 xa, __m512 xb, int64_t k,
                                                                               c10::BFloat16* xmr, bool stream,
                                                                               float* yr, c10::BFloat16* ymr) {
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(xb, xa);  // columns k..k+15 from xa, k+16..k+31 from xb
  if (stream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(xmr + k), h);
  } else {
    _mm512_storeu_si512(xmr + k, h);
  }
  if (ymr) _mm512_storeu_si512(ymr + k, _mm512_max_epi16(h, _mm512_setzero_si512()));
  if (yr) {
    _mm512_storeu_ps(yr + k, _mm512_max_ps(xa, _mm512_setzero_ps()));
    _mm512_storeu_ps(yr + k + 16, _mm512_max_ps(xb, _mm512_setzero_ps()));
  }
}

// A row's normalise pass: zk(k) gives columns k..k+15 of z (biased), turned into (z - mean) rstd by one FMA
// (nmr = -mean rstd) and emitted; 32 columns at a time through emit32_bf16 where xhat is kept as bf16 only, there is
// no affine and the row is whole 32-column blocks (a streamed bf16 row is then on 64-byte lines: streamable).
template <typename ZK>
SRN_LN512_TARGET __attribute__((always_inline)) static inline void normalise_row(
    ZK zk, int64_t n, __m512 rs, __m512 nmr, float* xr, c10::BFloat16* xmr, bool stream, const float* gamma,
    const float* beta, float* yr, c10::BFloat16* ymr) {
  if (!xr && xmr && !gamma && n % 32 == 0) {
    for (int64_t k = 0; k < n; k += 32) {
      emit32_bf16(_mm512_fmadd_ps(zk(k), rs, nmr), _mm512_fmadd_ps(zk(k + 16), rs, nmr), k, xmr, stream, yr, ymr);
    }
    return;
  }
  for (int64_t k = 0; k < n; k += 16) emit(_mm512_fmadd_ps(zk(k), rs, nmr), k, xr, xmr, stream, gamma, beta, yr, ymr);
}

SRN_LN512_TARGET void layernorm_relu_rows_avx512(float* z, int64_t R, int64_t ldz, int64_t n, const float* bias,
                                                 const float* gamma, const float* beta, float eps, float* xhat,
                                                 c10::BFloat16* xhat_mm, int64_t ldx, float* y, c10::BFloat16* y_mm,
                                                 int64_t ldy, float* rstd_out, bool stream) {
  constexpr int G = kGroup;
  const __m512 zero = _mm512_setzero_ps();
  stream = stream && streamable(xhat, xhat_mm, ldx);
  const float b0 = bias ? bias[0] : 0.f;
  for (int64_t r0 = 0; r0 < R; r0 += G) {
    const int g = int(std::min<int64_t>(G, R - r0));
    alignas(32) float sum1[G] = {}, sum2[G] = {}, shift[G] = {}, mean[G], rstd[G];
    // moments about each row's first value (shifted: no cancellation), two rows side by side (one row at a time in
    // a lambda or with a flag for the second row, GCC 12 kept the pointers in memory: 15% slower)
    int i = 0;
    for (; i + 2 <= g; i += 2) {
      const float* za = z + (r0 + i) * ldz;
      const float* zb = za + ldz;
      shift[i] = za[0] + b0;
      shift[i + 1] = zb[0] + b0;
      const __m512 sha = _mm512_set1_ps(shift[i]), shb = _mm512_set1_ps(shift[i + 1]);
      __m512 s1a = zero, s2a = zero, s1b = zero, s2b = zero;
      for (int64_t k = 0; k < n; k += 16) {
        const __m512 da = _mm512_sub_ps(biased(za, bias, k), sha), db = _mm512_sub_ps(biased(zb, bias, k), shb);
        add_moments(da, s1a, s2a);
        add_moments(db, s1b, s2b);
      }
      sum1[i] = _mm512_reduce_add_ps(s1a);
      sum2[i] = _mm512_reduce_add_ps(s2a);
      sum1[i + 1] = _mm512_reduce_add_ps(s1b);
      sum2[i + 1] = _mm512_reduce_add_ps(s2b);
    }
    for (; i < g; ++i) {
      const float* za = z + (r0 + i) * ldz;
      shift[i] = za[0] + b0;
      const __m512 sha = _mm512_set1_ps(shift[i]);
      __m512 s1a = zero, s2a = zero;
      for (int64_t k = 0; k < n; k += 16) {
        const __m512 da = _mm512_sub_ps(biased(za, bias, k), sha);
        add_moments(da, s1a, s2a);
      }
      sum1[i] = _mm512_reduce_add_ps(s1a);
      sum2[i] = _mm512_reduce_add_ps(s2a);
    }
    group_mean_rstd(sum1, sum2, shift, n, eps, mean, rstd);
    for (int i = 0; i < g; ++i) {
      const int64_t r = r0 + i;
      const float* zr = z + r * ldz;
      float* xr = xhat ? xhat + r * ldx : nullptr;
      c10::BFloat16* xmr = xhat_mm ? xhat_mm + r * ldx : nullptr;
      const __m512 rs = _mm512_set1_ps(rstd[i]), nmr = _mm512_set1_ps(-mean[i] * rstd[i]);
      float* yr = y ? y + r * ldy : nullptr;
      c10::BFloat16* ymr = y_mm ? y_mm + r * ldy : nullptr;
      normalise_row([&](int64_t k) SRN_LN512_TARGET { return biased(zr, bias, k); }, n, rs, nmr, xr, xmr, stream,
                    gamma, beta, yr, ymr);
      if (rstd_out) rstd_out[r] = rstd[i];
    }
  }
  if (stream) _mm_sfence();  // the streamed stores ordered before whatever reads xhat next (another thread's backward)
}

// layernorm_relu_rows_avx512 of a thin layer (phi's 3-wide input layer) whose pre-activation z = x W^T + bias is
// computed where the rows read it, C multiply-adds a vector, instead of written by a GEMM and read back twice.
// wt [C][n]: W transposed. Same groups of 8 rows, two side by side for the moments; the moments pass keeps the
// group's z rows in zb [8, n] (L1) for the normalise pass, which recomputed them: 27.7 -> 23.5 kcycles a 128-row call in
// the 128x128 bf16 step (Zen 4).
template <int C>
SRN_LN512_TARGET static void thin_rows(const float* x, int64_t ldxi, const float* wt, int64_t R, int64_t n,
                                       const float* bias, const float* gamma, const float* beta, float eps,
                                       float* xhat, c10::BFloat16* xhat_mm, int64_t ldx, float* y,
                                       c10::BFloat16* y_mm, int64_t ldy, float* rstd_out, bool stream,
                                       float* zb) {
  constexpr int G = kGroup;
  const __m512 zero = _mm512_setzero_ps();
  auto zvec = [&](const __m512* xb, int64_t k) SRN_LN512_TARGET {
    __m512 z = bias ? _mm512_loadu_ps(bias + k) : zero;
    for (int c = 0; c < C; ++c) z = _mm512_fmadd_ps(xb[c], _mm512_loadu_ps(wt + c * n + k), z);
    return z;
  };
  auto zfirst = [&](const float* xr) {  // the row's z[0], the shift of its moments
    float z = bias ? bias[0] : 0.f;
    for (int c = 0; c < C; ++c) z += xr[c] * wt[c * n];
    return z;
  };
  for (int64_t r0 = 0; r0 < R; r0 += G) {
    const int g = int(std::min<int64_t>(G, R - r0));
    alignas(32) float sum1[G] = {}, sum2[G] = {}, shift[G] = {}, mean[G], rstd[G];
    for (int i = 0; i < g; i += 2) {
      const float* xa = x + (r0 + i) * ldxi;
      const float* xb_ = i + 1 < g ? xa + ldxi : xa;  // an odd last row: computed twice, its copy dropped
      __m512 ba[C], bb[C];
      for (int c = 0; c < C; ++c) ba[c] = _mm512_set1_ps(xa[c]), bb[c] = _mm512_set1_ps(xb_[c]);
      shift[i] = zfirst(xa);
      const float shift_b = zfirst(xb_);
      const __m512 sha = _mm512_set1_ps(shift[i]), shb = _mm512_set1_ps(shift_b);
      __m512 s1a = zero, s2a = zero, s1b = zero, s2b = zero;
      float* za = zb + i * n;
      float* zbb = zb + (i + 1 < g ? i + 1 : i) * n;  // an odd last row's copy overwrites its own z with itself
      for (int64_t k = 0; k < n; k += 16) {
        const __m512 z0 = zvec(ba, k), z1 = zvec(bb, k);
        _mm512_store_ps(za + k, z0);
        _mm512_store_ps(zbb + k, z1);
        add_moments(_mm512_sub_ps(z0, sha), s1a, s2a);
        add_moments(_mm512_sub_ps(z1, shb), s1b, s2b);
      }
      sum1[i] = _mm512_reduce_add_ps(s1a);
      sum2[i] = _mm512_reduce_add_ps(s2a);
      if (i + 1 < g) {
        shift[i + 1] = shift_b;
        sum1[i + 1] = _mm512_reduce_add_ps(s1b);
        sum2[i + 1] = _mm512_reduce_add_ps(s2b);
      }
    }
    group_mean_rstd(sum1, sum2, shift, n, eps, mean, rstd);
    for (int i = 0; i < g; ++i) {
      const int64_t r = r0 + i;
      const float* zr = zb + i * n;
      float* xr = xhat ? xhat + r * ldx : nullptr;
      c10::BFloat16* xmr = xhat_mm ? xhat_mm + r * ldx : nullptr;
      const __m512 rs = _mm512_set1_ps(rstd[i]), nmr = _mm512_set1_ps(-mean[i] * rstd[i]);
      float* yr = y ? y + r * ldy : nullptr;
      c10::BFloat16* ymr = y_mm ? y_mm + r * ldy : nullptr;
      normalise_row([&](int64_t k) SRN_LN512_TARGET { return _mm512_load_ps(zr + k); }, n, rs, nmr, xr, xmr, stream,
                    gamma, beta, yr, ymr);
      if (rstd_out) rstd_out[r] = rstd[i];
    }
  }
  if (stream) _mm_sfence();
}

void layernorm_relu_rows_thin_avx512(const float* x, int64_t ldxi, int64_t cin, const float* W, int64_t R, int64_t n,
                                     const float* bias, const float* gamma, const float* beta, float eps, float* xhat,
                                     c10::BFloat16* xhat_mm, int64_t ldx, float* y, c10::BFloat16* y_mm, int64_t ldy,
                                     float* rstd_out, bool stream) {
  TORCH_CHECK(cin >= 1 && cin <= 4, "srn_fast: layernorm_relu_rows_thin_avx512 takes 1 to 4 input columns");
  stream = stream && streamable(xhat, xhat_mm, ldx);
  // wt: W transposed, [cin][n] (read a vector of 16 columns at a time); zb: a group's z rows [kGroup, n]
  thread_local aligned_vector<float> wt, zb;
  wt.resize(size_t(cin * n));
  zb.resize(size_t(kGroup * n));
  for (int64_t k = 0; k < n; ++k)
    for (int64_t c = 0; c < cin; ++c) wt[c * n + k] = W[k * cin + c];
  auto run = [&](auto C) {
    thin_rows<decltype(C)::value>(x, ldxi, wt.data(), R, n, bias, gamma, beta, eps, xhat, xhat_mm, ldx, y, y_mm, ldy,
                                  rstd_out, stream, zb.data());
  };
  switch (cin) {
    case 1: return run(std::integral_constant<int, 1>());
    case 2: return run(std::integral_constant<int, 2>());
    case 3: return run(std::integral_constant<int, 3>());
    default: return run(std::integral_constant<int, 4>());
  }
}

// 16 bf16 values (columns k..k+15 of row `row`) into their half-words of k-pair panels (RowZip): one masked store of
// the 16 words, the other row of the pair left as it is.
SRN_LN512_TARGET static inline void store_zipped(uint32_t* panels, int64_t kps, int64_t row, int64_t k, __m256i h) {
  uint32_t* dst = panels + (k / 32) * kps * 32 + (row / 2) * 32 + (k % 32);
  const bool odd = row & 1;
  __m512i w = _mm512_cvtepu16_epi32(h);
  if (odd) w = _mm512_slli_epi32(w, 16);
  _mm512_mask_storeu_epi16(dst, odd ? __mmask32(0xAAAAAAAAu) : __mmask32(0x55555555u), w);
}

// kBits: as rows2_vjp's (below).
template <bool kBits>
SRN_LN512_TARGET static void row_vjp(const float* xhat, const c10::BFloat16* xhat_mm, const float* v_y, int64_t n,
                                     float rstd, const float* gamma, const float* beta, float* g, float* v_gamma,
                                     float* v_beta, c10::BFloat16* v_z, float* v_bias, c10::BFloat16* y_mm,
                                     const RowZip* zip) {
  uint32_t* const vz_zip = zip && v_z ? zip->v_z : nullptr;
  uint32_t* const y_zip = zip ? zip->y : nullptr;
  // the masked gradient g (times gamma), its sums with and without xhat, the affine gradients; the layer's output
  // ReLU(xhat gamma + beta) as bf16 on the way when asked
  __m512 sa = _mm512_setzero_ps(), sb = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    __m512 xh;
    __mmask16 m;
    __m256i h = _mm256_setzero_si256();  // the layer's output as bf16, where asked for
    if constexpr (kBits) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xhat_mm + k));
      xh = widen(b);
      m = _mm256_cmpgt_epi16_mask(b, _mm256_setzero_si256());
      h = _mm256_max_epi16(b, _mm256_setzero_si256());
    } else {
      xh = load_xhat(xhat, xhat_mm, k);
      const __m512 a = affine(xh, gamma, beta, k);
      m = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
      if (y_mm || y_zip) h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(m, a));
    }
    if (y_mm || y_zip) {
      if (y_mm) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y_mm + k), h);
      if (y_zip) store_zipped(y_zip, zip->kp_stride, zip->row, k, h);
    }
    const __m512 vy = _mm512_maskz_loadu_ps(m, v_y + k);
    if (v_gamma) _mm512_storeu_ps(v_gamma + k, _mm512_fmadd_ps(vy, xh, _mm512_loadu_ps(v_gamma + k)));
    if (v_beta) _mm512_storeu_ps(v_beta + k, _mm512_add_ps(vy, _mm512_loadu_ps(v_beta + k)));
    const __m512 gk = gamma ? _mm512_mul_ps(vy, _mm512_loadu_ps(gamma + k)) : vy;
    _mm512_storeu_ps(g + k, gk);
    sa = _mm512_add_ps(sa, gk);
    sb = _mm512_fmadd_ps(gk, xh, sb);
  }
  const __m512 mg = _mm512_set1_ps(_mm512_reduce_add_ps(sa) / float(n));
  const __m512 mgx = _mm512_set1_ps(_mm512_reduce_add_ps(sb) / float(n)), rs = _mm512_set1_ps(rstd);
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v = _mm512_mul_ps(
        rs, _mm512_fnmadd_ps(load_xhat(xhat, xhat_mm, k), mgx, _mm512_sub_ps(_mm512_loadu_ps(g + k), mg)));
    if (v_z) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(v_z + k), h);
      if (vz_zip) store_zipped(vz_zip, zip->kp_stride, zip->row, k, h);
    } else {
      _mm512_storeu_ps(g + k, v);
    }
    if (v_bias) _mm512_storeu_ps(v_bias + k, _mm512_add_ps(v, _mm512_loadu_ps(v_bias + k)));
  }
}

SRN_LN512_TARGET void layernorm_relu_row_vjp_avx512(const float* xhat, const c10::BFloat16* xhat_mm,
                                                    const float* v_y, int64_t n, float rstd, const float* gamma,
                                                    const float* beta, float* g, float* v_gamma, float* v_beta,
                                                    c10::BFloat16* v_z, float* v_bias, c10::BFloat16* y_mm,
                                                    const RowZip* zip) {
  if (xhat_mm && !gamma && !beta)
    return row_vjp<true>(nullptr, xhat_mm, v_y, n, rstd, nullptr, nullptr, g, v_gamma, v_beta, v_z, v_bias, y_mm, zip);
  row_vjp<false>(xhat, xhat_mm, v_y, n, rstd, gamma, beta, g, v_gamma, v_beta, v_z, v_bias, y_mm, zip);
}

SRN_LN512_TARGET void layernorm_relu_act_row_avx512(const float* xhat, const c10::BFloat16* xhat_mm, int64_t n,
                                                    const float* gamma, const float* beta, float* y) {
  for (int64_t k = 0; k < n; k += 16) {
    _mm512_storeu_ps(y + k, _mm512_max_ps(affine(load_xhat(xhat, xhat_mm, k), gamma, beta, k), _mm512_setzero_ps()));
  }
}

// Columns k..k+15 of an even row (both's low half) and the row after it (its high half) into their k-pair panel
// words (RowZip): one full store.
SRN_LN512_TARGET static inline void store_zipped2(uint32_t* panels, int64_t kps, int64_t row, int64_t k, __m512i both) {
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  _mm512_storeu_si512(panels + (k / 32) * kps * 32 + (row / 2) * 32 + (k % 32), _mm512_permutexvar_epi16(pairs, both));
}

// kBits: xhat saved as bf16 and no affine (phi's layers): the ReLU mask and the rebuilt bf16 output come from xhat's
// bf16 bits (signed 16-bit compare and max with 0, as in emit32_bf16), not from a float compare and a conversion back
// to bf16 of a value that already was one: the same bits.
template <bool kBits>
SRN_LN512_TARGET static void rows2_vjp(const float* xhat, const c10::BFloat16* xhat_mm, int64_t ldx,
                                       const float* v_y, int64_t ldv, int64_t n, const float* rstd,
                                       const float* gamma, const float* beta, float* g, float* v_gamma,
                                       float* v_beta, c10::BFloat16* v_z, float* v_bias,
                                       c10::BFloat16* y_mm, const RowZip* zip) {
  const float* xf1 = xhat ? xhat + ldx : nullptr;
  const c10::BFloat16* xh1p = xhat_mm ? xhat_mm + ldx : nullptr;
  const float* vy1p = v_y + ldv;
  float* g1 = g + n;
  uint32_t* const vz_zip = zip ? zip->v_z : nullptr;
  uint32_t* const y_zip = zip ? zip->y : nullptr;
  const __m512 zero = _mm512_setzero_ps();
  __m512 sa0 = zero, sb0 = zero, sa1 = zero, sb1 = zero;
  for (int64_t k = 0; k < n; k += 16) {
    __m512 xh0, xh1;
    __mmask16 m0, m1;
    // the layer's output ReLU(xhat gamma + beta) as bf16 where asked for: the two rows' 16 values, low and high half
    __m512i ys = _mm512_setzero_si512();
    if constexpr (kBits) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xhat_mm + k));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh1p + k));
      xh0 = widen(b0), xh1 = widen(b1);
      const __m256i z16 = _mm256_setzero_si256();
      m0 = _mm256_cmpgt_epi16_mask(b0, z16), m1 = _mm256_cmpgt_epi16_mask(b1, z16);
      if (y_mm || y_zip) {
        ys = _mm512_max_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1), _mm512_setzero_si512());
      }
    } else {
      xh0 = load_xhat(xhat, xhat_mm, k), xh1 = load_xhat(xf1, xh1p, k);
      const __m512 a0 = affine(xh0, gamma, beta, k), a1 = affine(xh1, gamma, beta, k);
      m0 = _mm512_cmp_ps_mask(a0, zero, _CMP_GT_OQ), m1 = _mm512_cmp_ps_mask(a1, zero, _CMP_GT_OQ);
      if (y_mm || y_zip) ys = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_mov_ps(m1, a1), _mm512_maskz_mov_ps(m0, a0));
    }
    if (y_mm || y_zip) {
      if (y_mm) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y_mm + k), _mm512_castsi512_si256(ys));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y_mm + n + k), _mm512_extracti64x4_epi64(ys, 1));
      }
      if (y_zip) store_zipped2(y_zip, zip->kp_stride, zip->row, k, ys);
    }
    const __m512 vy0 = _mm512_maskz_loadu_ps(m0, v_y + k), vy1 = _mm512_maskz_loadu_ps(m1, vy1p + k);
    if (v_gamma) {
      const __m512 t = _mm512_fmadd_ps(vy0, xh0, _mm512_loadu_ps(v_gamma + k));
      _mm512_storeu_ps(v_gamma + k, _mm512_fmadd_ps(vy1, xh1, t));
    }
    if (v_beta) _mm512_storeu_ps(v_beta + k, _mm512_add_ps(vy1, _mm512_add_ps(vy0, _mm512_loadu_ps(v_beta + k))));
    const __m512 gk0 = gamma ? _mm512_mul_ps(vy0, _mm512_loadu_ps(gamma + k)) : vy0;
    const __m512 gk1 = gamma ? _mm512_mul_ps(vy1, _mm512_loadu_ps(gamma + k)) : vy1;
    _mm512_storeu_ps(g + k, gk0);
    _mm512_storeu_ps(g1 + k, gk1);
    sa0 = _mm512_add_ps(sa0, gk0);
    sb0 = _mm512_fmadd_ps(gk0, xh0, sb0);
    sa1 = _mm512_add_ps(sa1, gk1);
    sb1 = _mm512_fmadd_ps(gk1, xh1, sb1);
  }
  // as the one-row function: the same bits
  const __m512 mg0 = _mm512_set1_ps(_mm512_reduce_add_ps(sa0) / float(n));
  const __m512 mgx0 = _mm512_set1_ps(_mm512_reduce_add_ps(sb0) / float(n));
  const __m512 mg1 = _mm512_set1_ps(_mm512_reduce_add_ps(sa1) / float(n));
  const __m512 mgx1 = _mm512_set1_ps(_mm512_reduce_add_ps(sb1) / float(n));
  const __m512 rs0 = _mm512_set1_ps(rstd[0]), rs1 = _mm512_set1_ps(rstd[1]);
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 v0 = _mm512_mul_ps(
        rs0, _mm512_fnmadd_ps(load_xhat(xhat, xhat_mm, k), mgx0, _mm512_sub_ps(_mm512_loadu_ps(g + k), mg0)));
    const __m512 v1 = _mm512_mul_ps(
        rs1, _mm512_fnmadd_ps(load_xhat(xf1, xh1p, k), mgx1, _mm512_sub_ps(_mm512_loadu_ps(g1 + k), mg1)));
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);  // both rows rounded by one instruction
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v_z + k), _mm512_castsi512_si256(both));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v_z + n + k), _mm512_extracti64x4_epi64(both, 1));
    if (vz_zip) store_zipped2(vz_zip, zip->kp_stride, zip->row, k, both);
    if (v_bias) _mm512_storeu_ps(v_bias + k, _mm512_add_ps(v1, _mm512_add_ps(v0, _mm512_loadu_ps(v_bias + k))));
  }
}

SRN_LN512_TARGET void layernorm_relu_rows2_vjp_avx512(const float* xhat, const c10::BFloat16* xhat_mm, int64_t ldx,
                                                     const float* v_y, int64_t ldv, int64_t n, const float* rstd,
                                                     const float* gamma, const float* beta, float* g, float* v_gamma,
                                                     float* v_beta, c10::BFloat16* v_z, float* v_bias,
                                                     c10::BFloat16* y_mm, const RowZip* zip) {
  if (xhat_mm && !gamma && !beta)
    return rows2_vjp<true>(nullptr, xhat_mm, ldx, v_y, ldv, n, rstd, nullptr, nullptr, g, v_gamma, v_beta, v_z, v_bias,
                           y_mm, zip);
  rows2_vjp<false>(xhat, xhat_mm, ldx, v_y, ldv, n, rstd, gamma, beta, g, v_gamma, v_beta, v_z, v_bias, y_mm, zip);
}

#else
[[noreturn]] static void ln512_unavailable() {
  TORCH_CHECK(false, "srn_fast: the AVX-512 LayerNorm rows need an x86-64 build");
}
void layernorm_relu_rows_avx512(float*, int64_t, int64_t, int64_t, const float*, const float*, const float*, float,
                                float*, c10::BFloat16*, int64_t, float*, c10::BFloat16*, int64_t, float*, bool) {
  ln512_unavailable();
}
void layernorm_relu_row_vjp_avx512(const float*, const c10::BFloat16*, const float*, int64_t, float, const float*,
                                   const float*, float*, float*, float*, c10::BFloat16*, float*, c10::BFloat16*,
                                   const RowZip*) {
  ln512_unavailable();
}
void layernorm_relu_rows2_vjp_avx512(const float*, const c10::BFloat16*, int64_t, const float*, int64_t, int64_t,
                                     const float*, const float*, const float*, float*, float*, float*, c10::BFloat16*,
                                     float*, c10::BFloat16*, const RowZip*) {
  ln512_unavailable();
}
void layernorm_relu_rows_thin_avx512(const float*, int64_t, int64_t, const float*, int64_t, int64_t, const float*,
                                     const float*, const float*, float, float*, c10::BFloat16*, int64_t, float*,
                                     c10::BFloat16*, int64_t, float*, bool) {
  ln512_unavailable();
}
void layernorm_relu_act_row_avx512(const float*, const c10::BFloat16*, int64_t, const float*, const float*, float*) {
  ln512_unavailable();
}
#endif

}  // namespace cpu
}  // namespace srn
