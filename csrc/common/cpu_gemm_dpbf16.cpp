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
// of k-pairs, [ceil(K/2)][32] words per panel. A row-major op(A) (not transposed, K even) is read in place;
// otherwise it is packed too (A^T, the weight gradient's: into 8-row panels). Both packings are O((M + N) K)
// against the O(M N K) product. Weights are packed once per op call (dpbf16_pack_b, MLPWeights::W_pk).
// Compiled for every x86-64 target through function attributes, and called only when the CPU reports the
// instructions (dpbf16_available).
#include "common/aligned.h"
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
constexpr int kMR = 8;      // rows per micro-kernel call: 16 accumulators (measured faster than 12 x 32)
constexpr int64_t kKC = 128;  // k-pairs per block: a panel's block is 16 KB, it stays in L1

inline uint32_t pair(const c10::BFloat16* p0, const c10::BFloat16* p1) {
  return uint32_t(p0 ? p0->x : 0) | (uint32_t(p1 ? p1->x : 0) << 16);
}

int64_t k_pairs(int64_t K) { return (K + 1) / 2; }
int64_t panels(int64_t N) { return (N + kNR - 1) / kNR; }

// Two vectors of 32 bf16 interleaved into k-pair words: lo = (a[j], b[j]) for j < 16, hi for 16 <= j < 32.
SRN_DPBF16_TARGET inline void zip(__m512i a, __m512i b, __m512i& lo, __m512i& hi) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo_idx = _mm512_load_si512(kLo);
  lo = _mm512_permutex2var_epi16(a, lo_idx, b);
  hi = _mm512_permutex2var_epi16(a, _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16)), b);
}

// out[j] = (r0[j], r1[j]) for j < n <= 32: two rows of bf16 interleaved into k-pair words (r1 null: zeros).
SRN_DPBF16_TARGET inline void interleave(const c10::BFloat16* r0, const c10::BFloat16* r1, int n, uint32_t* out) {
  const __mmask32 m = n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
  __m512i lo, hi;
  zip(_mm512_maskz_loadu_epi16(m, r0), r1 ? _mm512_maskz_loadu_epi16(m, r1) : _mm512_setzero_si512(), lo, hi);
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? __mmask16(0xFFFF) : n <= 16 ? __mmask16(0) : __mmask16((1u << (n - 16)) - 1);
  _mm512_mask_storeu_epi32(out, m0, lo);
  _mm512_mask_storeu_epi32(out + 16, m1, hi);
}

// op(A) [M, K] -> the micro-kernel's A operand. A^T (A stored [K, M], the weight-gradient GEMM): panels of kMR rows,
// [M/kMR][KP][kMR] words (row stride 4 bytes, k-pair stride 4 kMR). A row-major with an odd K: rows of
// k-pairs [M][KP] (row stride 4 KP, k-pair stride 4). Returns {row stride, k-pair stride, panel stride} in bytes.
struct ALayout {
  int64_t row, kp, panel;  // panel: bytes from rows m0 to m0 + kMR (row stride x kMR for row-major layouts)
};

SRN_DPBF16_TARGET ALayout pack_a(bool ta, int64_t M, int64_t K, const c10::BFloat16* A, int64_t lda,
                                 aligned_vector<uint32_t>& Q) {
  const int64_t KP = k_pairs(K);
  if (!ta) {
    Q.resize(size_t(M * KP));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t kp = 0; kp < KP; ++kp)
        Q[m * KP + kp] = pair(A + m * lda + 2 * kp, 2 * kp + 1 < K ? A + m * lda + 2 * kp + 1 : nullptr);
    return {KP * 4, 4, KP * 4 * kMR};
  }
  static_assert(kMR == 8, "32 rows of A^T are zipped into four 8-row panels at once");
  const int64_t panel = KP * kMR;  // words per panel; rows past M in the last panel are never read
  Q.resize(size_t((M + kMR - 1) / kMR * panel));
  for (int64_t kp = 0; kp < KP; ++kp) {
    const c10::BFloat16* r0 = A + 2 * kp * lda;
    const c10::BFloat16* r1 = 2 * kp + 1 < K ? r0 + lda : nullptr;
    int64_t m0 = 0;
    for (; m0 + 32 <= M; m0 += 32) {
      __m512i lo, hi;
      zip(_mm512_loadu_si512(r0 + m0), r1 ? _mm512_loadu_si512(r1 + m0) : _mm512_setzero_si512(), lo, hi);
      // words 0-7 of lo to panel m0 / 8, words 8-15 to the next (masked stores: lanes 8-15 land at q + panel)
      uint32_t* q = Q.data() + (m0 / kMR) * panel + kp * kMR;
      _mm512_mask_storeu_epi32(q, 0x00FF, lo);
      _mm512_mask_storeu_epi32(q + panel - kMR, 0xFF00, lo);
      _mm512_mask_storeu_epi32(q + 2 * panel, 0x00FF, hi);
      _mm512_mask_storeu_epi32(q + 3 * panel - kMR, 0xFF00, hi);
    }
    for (; m0 < M; m0 += kMR)
      interleave(r0 + m0, r1 ? r1 + m0 : nullptr, int(std::min<int64_t>(kMR, M - m0)),
                 Q.data() + (m0 / kMR) * panel + kp * kMR);
  }
  return {4, kMR * 4, panel * 4};
}

// op(B) = B [K, N] row-major -> P: two rows interleaved per k-pair (the weight gradient's activations, every tile);
// panels of kp_stride k-pairs, those past K zeros.
SRN_DPBF16_TARGET void pack_rows(int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P,
                                 int64_t kp_stride) {
  const int64_t KP = k_pairs(K);
  for (int64_t p = 0; p < panels(N); ++p) {
    const int64_t n0 = p * kNR;
    const int nn = int(std::min<int64_t>(kNR, N - n0));
    for (int64_t kp = 0; kp < KP; ++kp) {
      const c10::BFloat16* r0 = B + 2 * kp * ldb + n0;
      interleave(r0, 2 * kp + 1 < K ? r0 + ldb : nullptr, nn, P + (p * kp_stride + kp) * kNR);
    }
    std::fill(P + (p * kp_stride + KP) * kNR, P + (p + 1) * kp_stride * kNR, 0u);
  }
}

// mr rows of A (row i, k-pair kp at a + i * a_row + kp * a_kp bytes) times one panel block b [kp_count][32]:
// C rows [MR, nn] (nn <= 32 valid columns) = (accumulate ? C : 0) + the product.
template <int MR>
SRN_DPBF16_TARGET void micro(const char* a, int64_t a_row, int64_t a_kp, const uint32_t* b, int64_t kp_count,
                             float* C, int64_t ldc, int nn, bool accumulate) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc0[i] = _mm512_setzero_ps(), acc1[i] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kp_count; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kp * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kp * kNR + 16);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t w;
      std::memcpy(&w, a + i * a_row + kp * a_kp, 4);
      const __m512bh ai = (__m512bh)_mm512_set1_epi32(w);
      acc0[i] = _mm512_dpbf16_ps(acc0[i], ai, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], ai, b1);
    }
  }
  const __mmask16 m0 = nn >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nn) - 1);
  const __mmask16 m1 = nn >= 32 ? __mmask16(0xFFFF) : nn <= 16 ? __mmask16(0) : __mmask16((1u << (nn - 16)) - 1);
#pragma GCC unroll 8
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

// Ask for the C rows [mr, nn] (row stride ldc) that a micro-kernel call will add into, before it runs: an accumulated
// C (a weight gradient's per-thread sums) is often out of L1 and L2, and the micro-kernel loads it only after its
// k-loop, where the loads' latency is not hidden behind anything. With write intent, as the call stores them back:
// the 128x128 bf16 step's weight-gradient calls 221-223 -> 207-210 kcycles (Zen 4, rdtsc build, 3 pairs of runs).
inline void prefetch_c(const float* C, int64_t ldc, int64_t mr, int nn) {
  for (int64_t i = 0; i < mr; ++i) prefetch_span(C + i * ldc, int64_t(sizeof(float)) * nn, /*for_write=*/true);
}

// The C rows of the micro-kernel call after the one at (m0, n0) in the loops below (rows first, then panels).
inline void prefetch_next_c(float* C, int64_t ldc, int64_t M, int64_t N, int64_t m0, int64_t n0) {
  const int64_t m1 = m0 + kMR < M ? m0 + kMR : 0, n1 = m0 + kMR < M ? n0 : n0 + kNR;
  if (n1 < N) prefetch_c(C + m1 * ldc + n1, ldc, std::min<int64_t>(kMR, M - m1), int(std::min<int64_t>(kNR, N - n1)));
}

using MicroFn = void (*)(const char*, int64_t, int64_t, const uint32_t*, int64_t, float*, int64_t, int, bool);
constexpr MicroFn kMicro[kMR + 1] = {nullptr,  micro<1>, micro<2>, micro<3>, micro<4>,
                                     micro<5>, micro<6>, micro<7>, micro<8>};

// The blocked loops of gemm_dpbf16_packed and gemm_dpbf16_zipped_at: blocks of kKC k-pairs, panels of kNR columns
// (panel p's k-pair kp at B + (p * kp_stride + kp) * kNR words), micro-kernel calls of kMR rows whose op(A) starts at
// a_at(m0, k0) (row stride a_row, k-pair stride a_kp, in bytes); where C is added into, the next call's C rows are
// asked for while the current one runs; side's lines a few with each call.
template <typename AAt>
void run_blocks(int64_t M, int64_t N, int64_t KP, AAt a_at, int64_t a_row, int64_t a_kp, const uint32_t* B,
                int64_t kp_stride, float beta, float* C, int64_t ldc, Trickle* side) {
  if (beta != 0.f) prefetch_c(C, ldc, std::min<int64_t>(kMR, M), int(std::min<int64_t>(kNR, N)));
  if (side) side->pace((KP + kKC - 1) / kKC * ((N + kNR - 1) / kNR) * ((M + kMR - 1) / kMR));
  for (int64_t k0 = 0; k0 < KP; k0 += kKC) {
    const int64_t kc = std::min(kKC, KP - k0);
    const bool accumulate = k0 > 0 || beta != 0.f;
    for (int64_t n0 = 0; n0 < N; n0 += kNR) {
      const uint32_t* panel = B + (n0 / kNR * kp_stride + k0) * kNR;
      const int nn = int(std::min<int64_t>(kNR, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        const int mr = int(std::min<int64_t>(kMR, M - m0));
        if (accumulate) prefetch_next_c(C, ldc, M, N, m0, n0);
        if (side) side->step();
        kMicro[mr](a_at(m0, k0), a_row, a_kp, panel, kc, C + m0 * ldc + n0, ldc, nn, accumulate);
      }
    }
  }
}

}  // namespace

int64_t dpbf16_packed_words(int64_t K, int64_t N, int64_t kp_stride) {
  return panels(N) * std::max(kp_stride, k_pairs(K)) * kNR;
}

// op(B) [K, N] (B stored [K, N], or [N, K] when tb, row stride ldb) -> panels P[N/32][kp_stride][32] of k-pairs
// (kp_stride at least ceil(K/2); 0: exactly that). A missing second row of an odd K is zeros, and so are the
// k-pairs past K; columns past N in the last panel are zeros when tb and left unwritten otherwise (each column's
// lane only ever reaches its own column of C, which is not stored).
void dpbf16_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P,
                   int64_t kp_stride) {
  const int64_t KP = k_pairs(K);
  kp_stride = std::max(kp_stride, KP);
  if (!tb) return pack_rows(K, N, B, ldb, P, kp_stride);  // every tile: no fill of the columns past N
  std::fill(P, P + dpbf16_packed_words(K, N, kp_stride), 0u);
  if (K % 2 == 0) {
    // op(B) = B^T with B [N, K] (a weight in the forward): k-pair kp of column n is the 32-bit word kp of B's row n,
    // so a panel is a transpose of 32-bit words (the element-wise loop below took ~25 us per 256 x 256 weight)
    for (int64_t p = 0; p < panels(N); ++p) {
      uint32_t* dst = P + p * kp_stride * kNR;
      const int64_t n0 = p * kNR, nn = std::min<int64_t>(kNR, N - n0);
      for (int64_t j = 0; j < nn; ++j) {
        const c10::BFloat16* row = B + (n0 + j) * ldb;
        for (int64_t kp = 0; kp < KP; ++kp) std::memcpy(dst + kp * kNR + j, row + 2 * kp, sizeof(uint32_t));
      }
    }
    return;
  }
  auto at = [&](int64_t k, int64_t n) -> const c10::BFloat16* { return k < K ? B + n * ldb + k : nullptr; };
  for (int64_t p = 0; p < panels(N); ++p) {
    uint32_t* dst = P + p * kp_stride * kNR;
    const int64_t n0 = p * kNR, nn = std::min<int64_t>(kNR, N - n0);
    for (int64_t kp = 0; kp < KP; ++kp)
      for (int64_t j = 0; j < nn; ++j) dst[kp * kNR + j] = pair(at(2 * kp, n0 + j), at(2 * kp + 1, n0 + j));
  }
}

void gemm_dpbf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                 const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local aligned_vector<uint32_t> bp;
  bp.resize(size_t(dpbf16_packed_words(K, N)));
  dpbf16_pack_b(tb, K, N, B, ldb, bp.data());
  gemm_dpbf16_packed(ta, M, N, K, A, lda, bp.data(), beta, C, ldc);
}

void gemm_dpbf16_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                        const uint32_t* Bp, float beta, float* C, int64_t ldc, Trickle* side) {
  thread_local aligned_vector<uint32_t> ap;
  const int64_t KP = k_pairs(K);
  // op(A) read in place when A is row-major with an even K (the forward and input-gradient GEMMs)
  const char* a = reinterpret_cast<const char*>(A);
  ALayout al{lda * int64_t(sizeof(c10::BFloat16)), 4, lda * int64_t(sizeof(c10::BFloat16)) * kMR};
  if (ta || K % 2) {
    al = pack_a(ta, M, K, A, lda, ap);
    a = reinterpret_cast<const char*>(ap.data());
  }
  run_blocks(M, N, KP, [&](int64_t m0, int64_t k0) { return a + (m0 / kMR) * al.panel + k0 * al.kp; }, al.row, al.kp,
             Bp, KP, beta, C, ldc, side);
}
void gemm_dpbf16_zipped_at(int64_t M, int64_t N, int64_t K, const uint32_t* A_zip, const uint32_t* B_zip, int64_t kps,
                           float beta, float* C, int64_t ldc, Trickle* side) {
  // word (kp, m) of A's panels is op(A) = A^T's row m, k-pair kp: rows 4 bytes apart, k-pairs a panel row (128 bytes)
  auto a_at = [&](int64_t m0, int64_t k0) {
    return reinterpret_cast<const char*>(A_zip + (m0 / kNR * kps + k0) * kNR + m0 % kNR);
  };
  run_blocks(M, N, k_pairs(K), a_at, 4, kNR * 4, B_zip, kps, beta, C, ldc, side);
}
#else
[[noreturn]] static void unavailable() {
  TORCH_CHECK(false, "srn_fast: the 'avx512bf16' bf16 route needs an x86-64 build (GCC or Clang)");
}
int64_t dpbf16_packed_words(int64_t, int64_t, int64_t) { return 0; }
void dpbf16_pack_b(bool, int64_t, int64_t, const c10::BFloat16*, int64_t, uint32_t*, int64_t) { unavailable(); }
void gemm_dpbf16(bool, bool, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
                 int64_t, float, float*, int64_t) {
  unavailable();
}
void gemm_dpbf16_packed(bool, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const uint32_t*, float,
                        float*, int64_t, Trickle*) {
  unavailable();
}
void gemm_dpbf16_zipped_at(int64_t, int64_t, int64_t, const uint32_t*, const uint32_t*, int64_t, float, float*,
                           int64_t, Trickle*) {
  unavailable();
}
#endif

}  // namespace cpu
}  // namespace srn
