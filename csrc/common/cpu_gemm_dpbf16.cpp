// The "avx512bf16" route of cpu::gemm's bf16 overload (csrc/common/cpu_gemm.h): a register-blocked GEMM on the
// AVX512-BF16 instruction VDPBF16PS (two bf16 products per float32 lane, summed into a float32 accumulator), for
// CPUs that have it (Zen 4 and later, Cooper Lake, Sapphire Rapids and later). float32 accumulation and a float32
// result, like MKL's cblas_gemm_bf16bf16f32, at the instruction's rate: on Zen 4 MKL emulates bf16 and oneDNN
// (ATen's bf16 matmul) rounds every result to bf16.
//
//   C[M, N] = op(A)[M, K] @ op(B)[K, N] + beta * C     (beta 0 or 1)
//
// VDPBF16PS multiplies bf16 pairs: lane j of the accumulator gets a[2j] b[2j] + a[2j+1] b[2j+1]. So op(A) is read
// as rows of k-pairs (one 32-bit word per pair, broadcast to every lane) and op(B) is packed into 32-column panels
// of k-pairs, [ceil(K/2)][32] words per panel, zero-padded at the edges. A row-major op(A) (not transposed, K
// even) is read in place; otherwise it is packed too. Both packings are O((M + N) K) against the O(M N K) product.
// Weights are packed once per op call (dpbf16_pack_b, MLPWeights::W_pk). Compiled for every x86-64 target through
// function attributes, and called only when the CPU reports the
// instructions (dpbf16_available).
#include "common/cpu_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SRN_HAVE_DPBF16 1
#define SRN_DPBF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define SRN_HAVE_DPBF16 0
#endif

namespace srn {
namespace cpu {

bool dpbf16_available() {
#if SRN_HAVE_DPBF16
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

#if SRN_HAVE_DPBF16
namespace {

constexpr int kNR = 32;     // columns per panel (two zmm accumulators per row)
constexpr int kMR = 8;      // rows per micro-kernel call: 16 accumulators
constexpr int64_t kKC = 128;  // k-pairs per block: a panel's block is 16 KB, it stays in L1

inline uint32_t pair(const c10::BFloat16* p0, const c10::BFloat16* p1) {
  return uint32_t(p0 ? p0->x : 0) | (uint32_t(p1 ? p1->x : 0) << 16);
}

int64_t k_pairs(int64_t K) { return (K + 1) / 2; }
int64_t panels(int64_t N) { return (N + kNR - 1) / kNR; }

// op(A) [M, K] (A stored [M, K], or [K, M] when ta) -> rows of k-pairs Q[M][KP].
void pack_a(bool ta, int64_t M, int64_t K, const c10::BFloat16* A, int64_t lda, std::vector<uint32_t>& Q) {
  const int64_t KP = (K + 1) / 2;
  Q.resize(size_t(M * KP));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kp = 0; kp < KP; ++kp) {
      const int64_t k0 = 2 * kp, k1 = k0 + 1;
      const c10::BFloat16* p0 = ta ? A + k0 * lda + m : A + m * lda + k0;
      const c10::BFloat16* p1 = k1 < K ? (ta ? A + k1 * lda + m : A + m * lda + k1) : nullptr;
      Q[m * KP + kp] = pair(p0, p1);
    }
}

// rows x [kp_count] k-pairs of A (row r at a + r * a_stride bytes) times one panel block b [kp_count][32]:
// C rows [MR, nn] (nn <= 32 valid columns) = (accumulate ? C : 0) + the product.
template <int MR>
SRN_DPBF16_TARGET void micro(const char* a, int64_t a_stride, const uint32_t* b, int64_t kp_count, float* C,
                             int64_t ldc, int nn, bool accumulate) {
  __m512 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = _mm512_setzero_ps(), acc1[i] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kp_count; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * kNR + 16);
    for (int i = 0; i < MR; ++i) {
      int32_t w;
      std::memcpy(&w, a + i * a_stride + kp * 4, 4);
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(w);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
    }
  }
  const __mmask16 m0 = nn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nn) - 1);
  const __mmask16 m1 = nn >= 32 ? __mmask16(0xFFFF) : nn <= 16 ? __mmask16(0) : __mmask16((1u << (nn - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    if (accumulate) {
      acc0[i] = _mm512_add_ps(acc0[i], _mm512_maskz_loadu_ps(m0, c));
      acc1[i] = _mm512_add_ps(acc1[i], _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, acc0[i]);
    _mm512_mask_storeu_ps(c + 16, m1, acc1[i]);
  }
}

using MicroFn = void (*)(const char*, int64_t, const uint32_t*, int64_t, float*, int64_t, int, bool);
constexpr MicroFn kMicro[kMR + 1] = {nullptr,   micro<1>, micro<2>, micro<3>, micro<4>,
                                     micro<5>,  micro<6>, micro<7>, micro<8>};

}  // namespace

int64_t dpbf16_packed_words(int64_t K, int64_t N) { return panels(N) * k_pairs(K) * kNR; }

// op(B) [K, N] (B stored [K, N], or [N, K] when tb, row stride ldb) -> panels P[N/32][KP][32] of k-pairs,
// zero-padded.
void dpbf16_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P) {
  const int64_t KP = k_pairs(K);
  std::fill(P, P + dpbf16_packed_words(K, N), 0u);
  auto at = [&](int64_t k, int64_t n) -> const c10::BFloat16* {
    if (k >= K) return nullptr;
    return tb ? B + n * ldb + k : B + k * ldb + n;
  };
  for (int64_t p = 0; p < panels(N); ++p) {
    uint32_t* dst = P + p * KP * kNR;
    const int64_t n0 = p * kNR, nn = std::min<int64_t>(kNR, N - n0);
    for (int64_t kp = 0; kp < KP; ++kp)
      for (int64_t j = 0; j < nn; ++j) dst[kp * kNR + j] = pair(at(2 * kp, n0 + j), at(2 * kp + 1, n0 + j));
  }
}

void gemm_dpbf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                 const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local std::vector<uint32_t> bp;
  bp.resize(size_t(dpbf16_packed_words(K, N)));
  dpbf16_pack_b(tb, K, N, B, ldb, bp.data());
  gemm_dpbf16_packed(ta, M, N, K, A, lda, bp.data(), beta, C, ldc);
}

void gemm_dpbf16_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                        const uint32_t* Bp, float beta, float* C, int64_t ldc) {
  thread_local std::vector<uint32_t> ap;
  const int64_t KP = k_pairs(K);
  // op(A)'s rows as k-pairs: in place when A is row-major with an even K (the forward and input-gradient GEMMs)
  const char* a;
  int64_t a_stride;  // bytes between rows
  if (!ta && K % 2 == 0) {
    a = reinterpret_cast<const char*>(A), a_stride = lda * int64_t(sizeof(c10::BFloat16));
  } else {
    pack_a(ta, M, K, A, lda, ap);
    a = reinterpret_cast<const char*>(ap.data()), a_stride = KP * 4;
  }
  for (int64_t k0 = 0; k0 < KP; k0 += kKC) {
    const int64_t kc = std::min(kKC, KP - k0);
    const bool accumulate = k0 > 0 || beta != 0.f;
    for (int64_t n0 = 0; n0 < N; n0 += kNR) {
      const uint32_t* panel = Bp + (n0 / kNR) * KP * kNR + k0 * kNR;
      const int nn = int(std::min<int64_t>(kNR, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = int(std::min<int64_t>(kMR, M - m0));
        kMicro[mr](a + m0 * a_stride + k0 * 4, a_stride, panel, kc, C + m0 * ldc + n0, ldc, nn, accumulate);
      }
    }
  }
}
#else
[[noreturn]] static void unavailable() {
  TORCH_CHECK(false, "srn_fast: the 'avx512bf16' bf16 route needs an x86-64 build (GCC or Clang)");
}
int64_t dpbf16_packed_words(int64_t, int64_t) { return 0; }
void dpbf16_pack_b(bool, int64_t, int64_t, const c10::BFloat16*, int64_t, uint32_t*) { unavailable(); }
void gemm_dpbf16(bool, bool, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
                 int64_t, float, float*, int64_t) {
  unavailable();
}
void gemm_dpbf16_packed(bool, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const uint32_t*, float,
                        float*, int64_t) {
  unavailable();
}
#endif

}  // namespace cpu
}  // namespace srn
