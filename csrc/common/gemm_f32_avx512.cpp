// A register-blocked float32 GEMM in AVX-512 for the march's LSTM products (csrc/march/march_cpu.h): per tile and
// step, [R, F + H] x [F + H, 4H] forward, and backward the weight gradient [4H, R] x [R, F + H] and the input gradient
// [R, 4H] x [4H, F + H] (R = 128 rays, F + H = 272, 4H = 64). MKL's sgemm runs them at 77-83% of the FMA peak (one
// thread on a Zen 4: 46.0 / 44.8 / 46.3 us); these loops at 88-98% (38.7 / 42.2 / 40.6 us), the operands read where
// they lie (the forward's weight transposed once per op call).
//
//   C[M, N] = (accumulate ? C : 0) + sum_k A(m, k) B(k, n),   A(m, k) = A[m * a_row + k * a_k],  B(k, n) = B[k * ldb + n]
//
// so op(A) may be A or A^T in place. Compiled for every x86-64 target through function attributes; called only where
// f32_avx512_available() (the CPU has AVX-512F).
#include "common/cpu_gemm.h"
#include "common/thin_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SRN_HAVE_F32_512 1
#define SRN_F32_512_TARGET __attribute__((target("avx512f,fma")))
#else
#define SRN_HAVE_F32_512 0
#endif

namespace srn {
namespace cpu {

namespace {
std::atomic<bool>& f32_flag() {
  static std::atomic<bool> on(true);
  return on;
}

#if SRN_HAVE_F32_512
// C rows [MR, 16 NV] (+)= the product over K; with kTail the last vector holds only the lanes of `tail`. The loops
// unroll completely (MR, NV and kTail are compile-time), so the MR x NV accumulators stay in registers.
template <int MR, int NV, bool kTail>
SRN_F32_512_TARGET void micro(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb, int64_t K,
                              float* C, int64_t ldc, bool accumulate, __mmask16 tail) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const float* p = b + k * ldb + 16 * j;
      bv[j] = kTail && j == NV - 1 ? _mm512_maskz_loadu_ps(tail, p) : _mm512_loadu_ps(p);
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * a_row + k * a_k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(ai, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* c = C + i * ldc + 16 * j;
      if (kTail && j == NV - 1) {
        if (accumulate) acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_maskz_loadu_ps(tail, c));
        _mm512_mask_storeu_ps(c, tail, acc[i][j]);
      } else {
        if (accumulate) acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_loadu_ps(c));
        _mm512_storeu_ps(c, acc[i][j]);
      }
    }
  }
}

// All M rows against one block of 16 NV columns: MR rows a call (MR x NV accumulators: 24 registers for NV = 4 and
// NV = 2, 12 for NV = 1), then pairs, then one.
template <int NV, bool kTail>
SRN_F32_512_TARGET void row_blocks(int64_t M, const float* A, int64_t a_row, int64_t a_k, const float* B, int64_t ldb,
                                   int64_t K, float* C, int64_t ldc, bool accumulate, __mmask16 tail) {
  constexpr int MR = NV == 4 ? 6 : 12;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    micro<MR, NV, kTail>(A + m * a_row, a_row, a_k, B, ldb, K, C + m * ldc, ldc, accumulate, tail);
  }
  for (; m + 2 <= M; m += 2) micro<2, NV, kTail>(A + m * a_row, a_row, a_k, B, ldb, K, C + m * ldc, ldc, accumulate, tail);
  for (; m < M; ++m) micro<1, NV, kTail>(A + m * a_row, a_row, a_k, B, ldb, K, C + m * ldc, ldc, accumulate, tail);
}

// thin_f32_avx512's input-gradient case: C rows [RB, N] (+)= A rows [RB, K] (row stride lda, K a multiple of 16)
// against op(B)'s N columns packed as rows bt [N][K]; RB x N accumulators, each reduced once.
template <int N, int RB>
SRN_F32_512_TARGET void thin_rows(const float* A, int64_t lda, int64_t K, const float* bt, bool accumulate, float* C,
                                  int64_t ldc) {
  __m512 acc[RB][N];
#pragma GCC unroll 4
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 b[N];
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) b[j] = _mm512_loadu_ps(bt + j * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i) {
      const __m512 a = _mm512_loadu_ps(A + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < N; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
      const float v = _mm512_reduce_add_ps(acc[i][j]);
      C[i * ldc + j] = accumulate ? C[i * ldc + j] + v : v;
    }
}

// Its weight-gradient case: C[m0 .. m0 + 16 V, N] (+)= A^T op(B) with A stored [K, M] (row stride lda), vectorised
// over m, op(B)(k, j) = B[k * bk + j * bj] broadcast; N x V accumulators, added into C's N-wide rows at the end.
template <int N, int V>
SRN_F32_512_TARGET void thin_cols(int64_t m0, int64_t K, const float* A, int64_t lda, const float* B, int64_t bk,
                                  int64_t bj, bool accumulate, float* C, int64_t ldc) {
  __m512 acc[N][V];
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 a[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) a[v] = _mm512_loadu_ps(A + k * lda + m0 + 16 * v);
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
      const __m512 bkj = _mm512_set1_ps(B[k * bk + j * bj]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_fmadd_ps(a[v], bkj, acc[j][v]);
    }
  }
  alignas(64) float out[N][16 * V];
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) _mm512_store_ps(out[j] + 16 * v, acc[j][v]);
  for (int64_t i = 0; i < 16 * V; ++i) {
    float* c = C + (m0 + i) * ldc;
    for (int j = 0; j < N; ++j) c[j] = accumulate ? c[j] + out[j][i] : out[j][i];
  }
}

// All M rows of C for N columns: four rows of A at a time (then one), or blocks of 64 columns of A^T (then 16).
template <int N>
SRN_F32_512_TARGET void thin_n(bool ta, int64_t M, int64_t K, const float* A, int64_t lda, const float* bt,
                               const float* B, int64_t bk, int64_t bj, bool accumulate, float* C, int64_t ldc) {
  int64_t m = 0;
  if (!ta) {
    for (; m + 4 <= M; m += 4) thin_rows<N, 4>(A + m * lda, lda, K, bt, accumulate, C + m * ldc, ldc);
    for (; m < M; ++m) thin_rows<N, 1>(A + m * lda, lda, K, bt, accumulate, C + m * ldc, ldc);
    return;
  }
  for (; m + 64 <= M; m += 64) thin_cols<N, 4>(m, K, A, lda, B, bk, bj, accumulate, C, ldc);
  for (; m < M; m += 16) thin_cols<N, 1>(m, K, A, lda, B, bk, bj, accumulate, C, ldc);
}
#endif
}  // namespace

bool f32_avx512_available() {
#if SRN_HAVE_F32_512
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

bool lstm_gemm_avx512() { return f32_flag().load(std::memory_order_relaxed) && f32_avx512_available(); }
void set_lstm_gemm_avx512(bool on) { f32_flag() = on; }

void gemm_f32_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_k, const float* B,
                     int64_t ldb, bool accumulate, float* C, int64_t ldc) {
#if SRN_HAVE_F32_512
  if (M <= 0 || N <= 0) return;
  const __mmask16 full = 0xFFFF;
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) row_blocks<4, false>(M, A, a_row, a_k, B + n, ldb, K, C + n, ldc, accumulate, full);
  for (; n + 32 <= N; n += 32) row_blocks<2, false>(M, A, a_row, a_k, B + n, ldb, K, C + n, ldc, accumulate, full);
  for (; n + 16 <= N; n += 16) row_blocks<1, false>(M, A, a_row, a_k, B + n, ldb, K, C + n, ldc, accumulate, full);
  if (n < N) {
    const __mmask16 tail = __mmask16((1u << (N - n)) - 1);
    row_blocks<1, true>(M, A, a_row, a_k, B + n, ldb, K, C + n, ldc, accumulate, tail);
  }
#else
  (void)M, (void)N, (void)K, (void)A, (void)a_row, (void)a_k, (void)B, (void)ldb, (void)accumulate, (void)C, (void)ldc;
  TORCH_CHECK(false, "srn_fast: the AVX-512 float32 GEMM needs an x86-64 build");
#endif
}

bool thin_f32_avx512(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float beta, float* C, int64_t ldc) {
#if SRN_HAVE_F32_512
  // the input gradient of a 3-wide layer, v_x [R, 3] = v_z [R, C] W [C, 3] (K a multiple of 16), or its weight
  // gradient, v_W [C, 3] += v_z^T [C, R] x [R, 3] (M a multiple of 16)
  const bool fits = ta ? M % 16 == 0 && K >= 1 : K >= 16 && K % 16 == 0;
  if (!f32_avx512_available() || N < 1 || N > kThin || M < 1 || !fits) return false;
  thread_local std::vector<float> bt;  // op(B)'s columns as rows [N][K] (the input-gradient case)
  if (!ta) {
    bt.resize(size_t(N * K));
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) bt[j * K + k] = tb ? B[j * ldb + k] : B[k * ldb + j];
  }
  const int64_t bk = tb ? 1 : ldb, bj = tb ? ldb : 1;
  const bool acc = beta != 0.f;
  switch (N) {
    case 1: thin_n<1>(ta, M, K, A, lda, bt.data(), B, bk, bj, acc, C, ldc); break;
    case 2: thin_n<2>(ta, M, K, A, lda, bt.data(), B, bk, bj, acc, C, ldc); break;
    case 3: thin_n<3>(ta, M, K, A, lda, bt.data(), B, bk, bj, acc, C, ldc); break;
    default: thin_n<4>(ta, M, K, A, lda, bt.data(), B, bk, bj, acc, C, ldc); break;
  }
  return true;
#else
  (void)ta, (void)tb, (void)M, (void)N, (void)K, (void)A, (void)lda, (void)B, (void)ldb, (void)beta, (void)C, (void)ldc;
  return false;
#endif
}

}  // namespace cpu
}  // namespace srn
