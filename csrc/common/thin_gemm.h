// Row-major products with one side of at most kThin: phi's 3-wide first layer (points in: K = 3 forward, N = 3
// for the input gradient and the weight gradient) and the pixel generator's 3-wide rgb layer. MKL packs the long
// operand for those few columns and ran them at 4-24 GFLOP/s (8-73 us a call at a 128-ray tile, ~2,300 calls
// per 64x64 training step); these loops, vectorised over the long dimension with the short one padded to kThin
// (independent accumulators instead of one dependent chain), take a few microseconds.
// Same contract as cpu::gemm (csrc/common/cpu_gemm.h): C[M, N] = op(A) op(B) + beta * C, beta 0 or 1 (0: C is
// not read).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/srn_math.h"

namespace srn {
namespace cpu {

constexpr int64_t kThin = 4;

inline bool is_thin(int64_t M, int64_t N, int64_t K) { return std::min({M, N, K}) <= kThin; }

template <typename T>
void thin_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T beta, T* C, int64_t ldc) {
  auto a = [&](int64_t i, int64_t k) { return ta ? A[k * lda + i] : A[i * lda + k]; };
  auto b = [&](int64_t k, int64_t j) { return tb ? B[j * ldb + k] : B[k * ldb + j]; };
  auto store = [&](int64_t i, int64_t j, T v) { C[i * ldc + j] = beta == T(0) ? v : C[i * ldc + j] + v; };
  if (N <= kThin && !ta) {
    // rows of A are contiguous: per row, kThin dot products over k at once against op(B)'s columns, packed
    // (zero columns beyond N)
    std::vector<T> bt(kThin * K, T(0));
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) bt[j * K + k] = b(k, j);
    const T *b0 = bt.data(), *b1 = b0 + K, *b2 = b1 + K, *b3 = b2 + K;
    for (int64_t i = 0; i < M; ++i) {
      const T* ai = A + i * lda;
      T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
      SRN_SIMD_SUM(s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k) {
        const T v = ai[k];
        s0 += v * b0[k];
        s1 += v * b1[k];
        s2 += v * b2[k];
        s3 += v * b3[k];
      }
      const T s[kThin] = {s0, s1, s2, s3};
      for (int64_t j = 0; j < N; ++j) store(i, j, s[j]);
    }
    return;
  }
  if (N <= kThin) {  // A stored [K, M]: the columns of C accumulated as rows, vectorised over i
    std::vector<T> acc(kThin * M, T(0));
    T* c0 = acc.data();
    T *c1 = c0 + M, *c2 = c1 + M, *c3 = c2 + M;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {  // four rows of A a pass: the accumulators' load and store once per four
      T bk[4][kThin] = {};
      for (int q = 0; q < 4; ++q)
        for (int64_t j = 0; j < N; ++j) bk[q][j] = b(k + q, j);
      const T *a0 = A + k * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
      SRN_SIMD
      for (int64_t i = 0; i < M; ++i) {
        const T v0 = a0[i], v1 = a1[i], v2 = a2[i], v3 = a3[i];
        c0[i] += (v0 * bk[0][0] + v1 * bk[1][0]) + (v2 * bk[2][0] + v3 * bk[3][0]);
        c1[i] += (v0 * bk[0][1] + v1 * bk[1][1]) + (v2 * bk[2][1] + v3 * bk[3][1]);
        c2[i] += (v0 * bk[0][2] + v1 * bk[1][2]) + (v2 * bk[2][2] + v3 * bk[3][2]);
        c3[i] += (v0 * bk[0][3] + v1 * bk[1][3]) + (v2 * bk[2][3] + v3 * bk[3][3]);
      }
    }
    for (; k < K; ++k) {
      const T* ak = A + k * lda;
      T bk[kThin] = {T(0), T(0), T(0), T(0)};
      for (int64_t j = 0; j < N; ++j) bk[j] = b(k, j);
      SRN_SIMD
      for (int64_t i = 0; i < M; ++i) {
        const T v = ak[i];
        c0[i] += v * bk[0];
        c1[i] += v * bk[1];
        c2[i] += v * bk[2];
        c3[i] += v * bk[3];
      }
    }
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) store(i, j, acc[j * M + i]);
    return;
  }
  if (K <= kThin) {  // each row of C in one pass: kThin rows of op(B), packed (zero rows beyond K)
    std::vector<T> rows(kThin * N, T(0));
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) rows[k * N + j] = b(k, j);
    const T *r0 = rows.data(), *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
    for (int64_t i = 0; i < M; ++i) {
      T ak[kThin] = {T(0), T(0), T(0), T(0)};
      for (int64_t k = 0; k < K; ++k) ak[k] = a(i, k);
      T* ci = C + i * ldc;
      if (beta == T(0)) {  // C is overwritten, never read
        SRN_SIMD
        for (int64_t j = 0; j < N; ++j) ci[j] = ak[0] * r0[j] + ak[1] * r1[j] + ak[2] * r2[j] + ak[3] * r3[j];
      } else {
        SRN_SIMD
        for (int64_t j = 0; j < N; ++j) ci[j] += ak[0] * r0[j] + ak[1] * r1[j] + ak[2] * r2[j] + ak[3] * r3[j];
      }
    }
    return;
  }
  // M small, N and K long: rows of C as sums of rows of op(B) (packed when B is stored transposed)
  std::vector<T> packed;
  const T* rows = B;
  int64_t ld = ldb;
  if (tb) {
    packed.resize(K * N);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) packed[k * N + j] = B[j * ldb + k];
    rows = packed.data(), ld = N;
  }
  for (int64_t i = 0; i < M; ++i) {
    T* ci = C + i * ldc;
    if (beta == T(0)) std::fill(ci, ci + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T aik = a(i, k);
      const T* bk = rows + k * ld;
      SRN_SIMD
      for (int64_t j = 0; j < N; ++j) ci[j] += aik * bk[j];
    }
  }
}

}  // namespace cpu
}  // namespace srn
