// The "amx" route of cpu::gemm's bf16 overload (csrc/common/cpu_gemm.h): a GEMM on Intel AMX (TDPBF16PS: a
// 16 x 32 bf16 tile times a 32 x 16 bf16 tile summed into a 16 x 16 float32 tile), for CPUs that have it (Sapphire
// Rapids and later). float32 accumulation and a float32 result, like the other routes, at the tile unit's rate:
// MKL's cblas_gemm_bf16bf16f32 uses AMX too, but packs both operands on every call, which at the tile loops'
// shapes ([128, 256] x [256, 256]) costs more than the products.
//
//   C[M, N] = op(A)[M, K] @ op(B)[K, N] + beta * C     (beta 0 or 1)
//
// Operands as the tiles read them:
//   B: the avx512bf16 route's packing (dpbf16_pack_b: 32-column panels of k-pair words, [kp][32]) with the k-pairs
//      padded to a multiple of 16 (zeros): a B tile (16 k-pairs x 16 columns) is 16 rows of 64 bytes at a 128-byte
//      stride inside a panel. Weights are packed once per op call (MLPWeights::W_pk), like the avx512bf16 route's.
//   A: rows of K bf16 (a tile: 16 rows x 32 k). A row-major op(A) with K a multiple of 32 is read in place (the
//      forward and input-gradient GEMMs); otherwise it is packed: rows padded with zeros to the next 32, or for A^T
//      (the weight gradient's, A stored [K, M]) zipped into k-pair words and transposed 16 x 16 words at a time.
// A block of C is 32 x 32: four accumulator tiles (tmm0-3), two A tiles (tmm4-5), two B tiles (tmm6-7). Blocks
// that stick out of C (M or N not a multiple of 32) go through a 32 x 32 scratch block; A rows past M come from
// zero-padded copies. Compiled for every x86-64 target through function attributes; used only where the CPU
// reports AMX-BF16 and Linux grants the process the tile state (amx_available).
#include "common/aligned.h"
#include "common/cpu_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) && __GNUC__ >= 11 || defined(__clang__))
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SRN_HAVE_AMX 1
#define SRN_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))
#else
#define SRN_HAVE_AMX 0
#endif

namespace srn {
namespace cpu {

bool amx_available() {
#if SRN_HAVE_AMX
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!dpbf16_available()) return false;  // the packing is the avx512bf16 route's
    unsigned eax, ebx, ecx, edx;  // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask for the tile data state
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

int64_t amx_kp_stride(int64_t K) { return ((K + 1) / 2 + 15) / 16 * 16; }

int64_t amx_packed_words(int64_t K, int64_t N) { return dpbf16_packed_words(K, N, amx_kp_stride(K)); }

void amx_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P) {
  dpbf16_pack_b(tb, K, N, B, ldb, P, amx_kp_stride(K));
}

#if SRN_HAVE_AMX
namespace {

constexpr int kBlock = 32;  // rows and columns of a C block (2 x 2 tiles of 16 x 16)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

SRN_AMX_TARGET void configure() {
  // every tile 16 rows of 64 bytes. Static, not a stack copy: GCC 12 does not see _tile_loadconfig read its operand,
  // and in a -march=x86-64 build it dropped the stores that fill a local one (palette 0: SIGILL at the first tile
  // instruction)
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    return c;
  }();
  _tile_loadconfig(&cfg);
}

// _tile_release in a function compiled for AMX (gemm_amx_packed itself is compiled for the build's target).
SRN_AMX_TARGET void release() { _tile_release(); }

// One 32 x 32 block: C (row stride ldc floats; accumulated onto when accumulate) += A (32 rows at a_row bytes apart,
// k-pairs contiguous) times the panel block b ([kp][32] words), kp_count a multiple of 16; next_a (or null): the
// rows of the next block of A to prefetch.
SRN_AMX_TARGET void block(const char* a, int64_t a_row, const uint32_t* b, int64_t kp_count, float* C, int64_t ldc,
                          bool accumulate, const char* next_a) {
  const int64_t c_stride = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, C, c_stride);
    _tile_loadd(1, C + 16, c_stride);
    _tile_loadd(2, C + 16 * ldc, c_stride);
    _tile_loadd(3, C + 16 * ldc + 16, c_stride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kp = 0; kp < kp_count; kp += 16) {  // tiles are not renamed: each load right before its first use
    // the next block's A into L1, one 64-byte line (16 k-pairs) of each of its 32 rows per step: a tile load that
    // misses L1 stalls the products behind it
    if (next_a) {
      for (int r = 0; r < kBlock; ++r) _mm_prefetch(next_a + r * a_row + kp * 4, _MM_HINT_T0);
    }
    _tile_loadd(4, a + kp * 4, a_row);
    _tile_loadd(6, b + kp * 32, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + kp * 32 + 16, 128);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a + 16 * a_row + kp * 4, a_row);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, c_stride);
  _tile_stored(1, C + 16, c_stride);
  _tile_stored(2, C + 16 * ldc, c_stride);
  _tile_stored(3, C + 16 * ldc + 16, c_stride);
}

// 16 x 16 32-bit words: rows r[0..15] in, columns out (r[i] becomes column i).
SRN_AMX_TARGET inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4q + j] holds, in 128-bit lane l, words of rows 4q..4q+3 at column 4l + j
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88);        // lanes 0, 2 of rows 0-3 | of rows 4-7
    t[4 + i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xDD);    // lanes 1, 3
    t[8 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);          // columns i (lane 0)
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);      // columns 8 + i (lane 2)
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88); // columns 4 + i (lane 1)
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);// columns 12 + i (lane 3)
  }
}

// The zipped panels of A [K, M] (dpbf16_pack_b's layout with kp stride kps: word (kp, m) = (A[2kp][m], A[2kp+1][m])
// in panel m / 32) -> Q [Mp][kps] k-pair words (row m: op(A) = A^T's row m), Mp = M rounded up to 32, transposed
// 16 x 16 words at a time; rows past M hold whatever the panels' columns past M held (they only reach rows of C that
// are not stored).
SRN_AMX_TARGET void transpose_zipped(int64_t M, int64_t kps, const uint32_t* zipped, aligned_vector<uint32_t>& Q) {
  const int64_t Mp = (M + kBlock - 1) / kBlock * kBlock;
  Q.resize(size_t(Mp * kps));
  for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
    const uint32_t* panel = zipped + (m0 / 32) * kps * 32 + (m0 % 32);
    for (int64_t kp0 = 0; kp0 < kps; kp0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(panel + (kp0 + i) * 32);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(Q.data() + (m0 + i) * kps + kp0, r[i]);
    }
  }
}

// A^T (A stored [K, M], row stride lda) -> Q [Mp][kps] k-pair words: zipped, then transposed.
SRN_AMX_TARGET void pack_a_transposed(int64_t M, int64_t K, const c10::BFloat16* A, int64_t lda,
                                      aligned_vector<uint32_t>& zipped, aligned_vector<uint32_t>& Q) {
  const int64_t kps = amx_kp_stride(K);
  zipped.resize(size_t(dpbf16_packed_words(K, M, kps)));
  dpbf16_pack_b(false, K, M, A, lda, zipped.data(), kps);
  transpose_zipped(M, kps, zipped.data(), Q);
}

// Row-major op(A) [M, K] -> Q [Mp][kps] words: rows padded with zeros to 2 kps bf16, rows past M zeros.
void pack_a_rows(int64_t M, int64_t K, const c10::BFloat16* A, int64_t lda, int64_t Mp, aligned_vector<uint32_t>& Q) {
  const int64_t kps = amx_kp_stride(K);
  Q.assign(size_t(Mp * kps), 0u);
  for (int64_t m = 0; m < M; ++m) std::memcpy(Q.data() + m * kps, A + m * lda, size_t(K) * 2);
}

// The blocks of C (accumulated onto when beta != 0) += op(A) B: op(A) rows a_row bytes apart (rows Mfull.. from
// a_tail when given: a zero-padded block), B packed (Bp), K padded to kps k-pairs.
void run_blocks(const char* a, int64_t a_row, const char* a_tail, int64_t M, int64_t N, int64_t kps, const uint32_t* Bp,
                float beta, float* C, int64_t ldc) {
  const int64_t Mfull = M / kBlock * kBlock;
  configure();
  alignas(64) float scratch[kBlock * kBlock];
  const bool accumulate = beta != 0.f;
  // m-blocks outside, n-panels inside: the block's 32 rows of A stay in L1 while the panels of B stream past them
  // (13.2 against 14.8 us for [128, 256] x [256, 256] with n outside, one core of the AMX Xeon); the next m-block's A
  // is prefetched during the last panel
  for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
    const int64_t mm = std::min<int64_t>(kBlock, M - m0);
    const char* ab = a_tail && m0 == Mfull ? a_tail : a + m0 * a_row;
    const int64_t ab_row = a_tail && m0 == Mfull ? kps * 4 : a_row;
    const int64_t m_next = m0 + kBlock;
    const char* next_a = m_next < (a_tail ? Mfull : M) ? a + m_next * a_row : nullptr;
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      const uint32_t* panel = Bp + (n0 / kBlock) * kps * 32;
      const int64_t nn = std::min<int64_t>(kBlock, N - n0);
      const char* pf = n0 + kBlock >= N ? next_a : nullptr;
      float* c = C + m0 * ldc + n0;
      if (mm == kBlock && nn == kBlock) {
        block(ab, ab_row, panel, kps, c, ldc, accumulate, pf);
        continue;
      }
      if (accumulate) {  // a block sticking out of C: through the scratch block
        std::fill(scratch, scratch + kBlock * kBlock, 0.f);
        for (int64_t i = 0; i < mm; ++i) std::memcpy(scratch + i * kBlock, c + i * ldc, size_t(nn) * 4);
      }
      block(ab, ab_row, panel, kps, scratch, kBlock, accumulate, pf);
      for (int64_t i = 0; i < mm; ++i) std::memcpy(c + i * ldc, scratch + i * kBlock, size_t(nn) * 4);
    }
  }
  release();
}

}  // namespace

void gemm_amx_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                     const uint32_t* Bp, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  thread_local aligned_vector<uint32_t> zipped, qa, tail;
  const int64_t kps = amx_kp_stride(K), Mfull = M / kBlock * kBlock;
  const char* a = reinterpret_cast<const char*>(A);
  int64_t a_row = lda * 2;
  const char* a_tail = nullptr;  // rows Mfull.. of op(A), zero-padded to a block (in-place reads only)
  if (ta) {
    pack_a_transposed(M, K, A, lda, zipped, qa);
    a = reinterpret_cast<const char*>(qa.data()), a_row = kps * 4;
  } else if (K != 2 * kps) {
    pack_a_rows(M, K, A, lda, (M + kBlock - 1) / kBlock * kBlock, qa);
    a = reinterpret_cast<const char*>(qa.data()), a_row = kps * 4;
  } else if (Mfull < M) {
    pack_a_rows(M - Mfull, K, A + Mfull * lda, lda, kBlock, tail);
    a_tail = reinterpret_cast<const char*>(tail.data());
  }
  run_blocks(a, a_row, a_tail, M, N, kps, Bp, beta, C, ldc);
}

void gemm_amx_zipped_at(int64_t M, int64_t N, int64_t K, const uint32_t* A_zip, const uint32_t* B_zip, float beta,
                        float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  thread_local aligned_vector<uint32_t> qa;
  const int64_t kps = amx_kp_stride(K);
  transpose_zipped(M, kps, A_zip, qa);
  run_blocks(reinterpret_cast<const char*>(qa.data()), kps * 4, nullptr, M, N, kps, B_zip, beta, C, ldc);
}

void gemm_amx(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
              const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local aligned_vector<uint32_t> bp;
  bp.resize(size_t(amx_packed_words(K, N)));
  amx_pack_b(tb, K, N, B, ldb, bp.data());
  gemm_amx_packed(ta, M, N, K, A, lda, bp.data(), beta, C, ldc);
}
#else
[[noreturn]] static void amx_unavailable() {
  TORCH_CHECK(false, "srn_fast: the 'amx' bf16 route needs an x86-64 Linux build (GCC 11+ or Clang)");
}
void gemm_amx_packed(bool, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const uint32_t*, float, float*,
                     int64_t) {
  amx_unavailable();
}
void gemm_amx(bool, bool, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t,
              float, float*, int64_t) {
  amx_unavailable();
}
void gemm_amx_zipped_at(int64_t, int64_t, int64_t, const uint32_t*, const uint32_t*, float, float*, int64_t) {
  amx_unavailable();
}
#endif

}  // namespace cpu
}  // namespace srn
