// The CPU tile loops' LayerNorm(+affine)+ReLU row (srn_math.h's layernorm_relu_row<float, Y>: the same contract and
// the same one-pass shifted moments) written for AVX-512: 16 floats a vector and the bf16 output through
// VCVTNEPS2BF16 (round to nearest even, like to_storage<c10::BFloat16>). The generic row, auto-vectorised by GCC 12 to
// 8-wide vectors with a five-instruction integer rounding per bf16, took ~350 cycles per 256-wide row on the AMX Xeon:
// a third of a bf16 march's forward. Likewise the VJP of a row (v_z out as float or as bf16, the bias gradient added)
// and a layer's output rebuilt from xhat as bf16. Used where the CPU has AVX512-BF16 (ln_row_avx512_available) for
// rows of a multiple of 16; compiled for every x86-64 target through function attributes.
#include "common/cpu_gemm.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SRN_HAVE_LN512 1
#define SRN_LN512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
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
SRN_LN512_TARGET float layernorm_relu_row_avx512(float* z, int64_t n, const float* bias, const float* gamma,
                                                 const float* beta, float eps, float* xhat, float* y,
                                                 c10::BFloat16* y_mm) {
  // moments of d = z - z_0 (bias added in place first), two accumulator pairs
  const float shift = z[0] + (bias ? bias[0] : 0.f);
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 s1a = _mm512_setzero_ps(), s1b = _mm512_setzero_ps(), s2a = _mm512_setzero_ps(), s2b = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    __m512 v0 = _mm512_loadu_ps(z + k), v1 = _mm512_loadu_ps(z + k + 16);
    if (bias) {
      v0 = _mm512_add_ps(v0, _mm512_loadu_ps(bias + k));
      v1 = _mm512_add_ps(v1, _mm512_loadu_ps(bias + k + 16));
      _mm512_storeu_ps(z + k, v0);
      _mm512_storeu_ps(z + k + 16, v1);
    }
    const __m512 d0 = _mm512_sub_ps(v0, sh), d1 = _mm512_sub_ps(v1, sh);
    s1a = _mm512_add_ps(s1a, d0);
    s1b = _mm512_add_ps(s1b, d1);
    s2a = _mm512_fmadd_ps(d0, d0, s2a);
    s2b = _mm512_fmadd_ps(d1, d1, s2b);
  }
  if (k < n) {  // n % 32 == 16
    __m512 v = _mm512_loadu_ps(z + k);
    if (bias) {
      v = _mm512_add_ps(v, _mm512_loadu_ps(bias + k));
      _mm512_storeu_ps(z + k, v);
    }
    const __m512 d = _mm512_sub_ps(v, sh);
    s1a = _mm512_add_ps(s1a, d);
    s2a = _mm512_fmadd_ps(d, d, s2a);
  }
  const float md = _mm512_reduce_add_ps(_mm512_add_ps(s1a, s1b)) / float(n);
  float var = _mm512_reduce_add_ps(_mm512_add_ps(s2a, s2b)) / float(n) - md * md;
  var = var > 0.f ? var : 0.f;
  const float rstd = 1.f / std::sqrt(var + eps);
  // normalise, affine, ReLU; out as float and / or bf16
  const __m512 mean = _mm512_set1_ps(shift + md), rs = _mm512_set1_ps(rstd), zero = _mm512_setzero_ps();
  for (k = 0; k < n; k += 16) {
    const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(z + k), mean), rs);
    if (xhat) _mm512_storeu_ps(xhat + k, xh);
    __m512 a = gamma ? _mm512_fmadd_ps(xh, _mm512_loadu_ps(gamma + k), _mm512_loadu_ps(beta + k)) : xh;
    a = _mm512_max_ps(a, zero);
    if (y) _mm512_storeu_ps(y + k, a);
    if (y_mm) _mm256_storeu_si256(reinterpret_cast<__m256i*>(y_mm + k), (__m256i)_mm512_cvtneps_pbh(a));
  }
  return rstd;
}

// The ReLU mask of a row: xhat * gamma + beta > 0 (no affine: xhat > 0).
SRN_LN512_TARGET static inline __mmask16 relu_mask(const float* xhat, const float* gamma, const float* beta,
                                                   int64_t k) {
  const __m512 xh = _mm512_loadu_ps(xhat + k);
  const __m512 a = gamma ? _mm512_fmadd_ps(xh, _mm512_loadu_ps(gamma + k), _mm512_loadu_ps(beta + k)) : xh;
  return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
}

SRN_LN512_TARGET void layernorm_relu_row_vjp_avx512(const float* xhat, const float* v_y, int64_t n, float rstd,
                                                    const float* gamma, const float* beta, float* g, float* v_gamma,
                                                    float* v_beta, c10::BFloat16* v_z, float* v_bias) {
  // the masked gradient g (times gamma), its sums with and without xhat, the affine gradients
  __m512 sa = _mm512_setzero_ps(), sb = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = relu_mask(xhat, gamma, beta, k);
    const __m512 xh = _mm512_loadu_ps(xhat + k), vy = _mm512_maskz_loadu_ps(m, v_y + k);
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
        rs, _mm512_fnmadd_ps(_mm512_loadu_ps(xhat + k), mgx, _mm512_sub_ps(_mm512_loadu_ps(g + k), mg)));
    if (v_z) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(v_z + k), (__m256i)_mm512_cvtneps_pbh(v));
    } else {
      _mm512_storeu_ps(g + k, v);
    }
    if (v_bias) _mm512_storeu_ps(v_bias + k, _mm512_add_ps(v, _mm512_loadu_ps(v_bias + k)));
  }
}

SRN_LN512_TARGET void relu_row_bf16_avx512(const float* xhat, int64_t n, const float* gamma, const float* beta,
                                           c10::BFloat16* out) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 xh = _mm512_loadu_ps(xhat + k);
    const __m512 a = gamma ? _mm512_fmadd_ps(xh, _mm512_loadu_ps(gamma + k), _mm512_loadu_ps(beta + k)) : xh;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), (__m256i)_mm512_cvtneps_pbh(_mm512_max_ps(a, zero)));
  }
}
#else
[[noreturn]] static void ln512_unavailable() {
  TORCH_CHECK(false, "srn_fast: the AVX-512 LayerNorm rows need an x86-64 build");
}
float layernorm_relu_row_avx512(float*, int64_t, const float*, const float*, const float*, float, float*, float*,
                                c10::BFloat16*) {
  ln512_unavailable();
}
void layernorm_relu_row_vjp_avx512(const float*, const float*, int64_t, float, const float*, const float*, float*, float*,
                                   float*, c10::BFloat16*, float*) {
  ln512_unavailable();
}
void relu_row_bf16_avx512(const float*, int64_t, const float*, const float*, c10::BFloat16*) { ln512_unavailable(); }
#endif

}  // namespace cpu
}  // namespace srn
