// Row-major matrix products on raw pointers for the CPU tile loops (csrc/common/mlp_tile.h).
//
//   C[M, N] = op(A)[M, K] @ op(B)[K, N] + beta * C        (beta 0 or 1; op = transpose when ta / tb)
//
// A is stored [M, K] (or [K, M] when ta) with row stride lda; likewise B and C. Called from inside
// at::parallel_for, so each call runs on the calling thread only.
//
// Backends (chosen once, overridable with SRN_FAST_GEMM=aten|blas or set_gemm_backend):
//   "blas": the BLAS that torch itself links (MKL's sgemm_/dgemm_ and cblas_gemm_bf16bf16f32, which uses
//           AMX on CPUs that have it), resolved as weak symbols: no per-call tensor or dispatcher overhead.
//   "aten": at::mm_out on from_blob views (portable; used when torch exports no BLAS symbols).
#pragma once

#include <c10/util/BFloat16.h>

#include "common/aligned.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace srn {
namespace cpu {

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double beta, double* C, int64_t ldc);
// bf16 inputs, float32 accumulation and output.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
          const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc);
// The "widened" bf16 route with B given already widened to float32 (exactly: B_wide = float(bf16 B)): only A is
// widened per call. Same arithmetic as the bf16 overload.
void gemm_widened(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                  const float* B_wide, int64_t ldb, float beta, float* C, int64_t ldc);

// The "avx512bf16" route (csrc/common/cpu_gemm_dpbf16.cpp): VDPBF16PS, float32 accumulation and result. Call only
// where dpbf16_available() (the CPU has AVX512-BF16 and this is an x86-64 build).
bool dpbf16_available();
void gemm_dpbf16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                 const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc);
// The same with op(B) packed beforehand (a weight: once per op call). P: dpbf16_packed_words(K, N) 32-bit words,
// panels of 32 columns, each [kp_stride][32] k-pair words (kp_stride >= ceil(K/2), 0: exactly that; k-pairs past K
// are zeros: the "amx" route pads K to its tiles' 32).
int64_t dpbf16_packed_words(int64_t K, int64_t N, int64_t kp_stride = 0);
void dpbf16_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P,
                   int64_t kp_stride = 0);
// side (or null): lines asked for into L2 across the call's micro-kernel calls (Trickle, common/aligned.h).
void gemm_dpbf16_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                        const uint32_t* P, float beta, float* C, int64_t ldc, Trickle* side = nullptr);
// The weight gradient C[M, N] (+)= A^T B from k-pair panels as gemm_amx_zipped_at takes them (below; kp stride kps,
// amx_kp_stride(K) there): read in place, nothing packed per call. One thread, [256, 128] x [128, 256] on a Zen 4:
// 77.8 us against 82.9 for gemm_dpbf16 with op(A) = A^T (which zips A and packs B first).
void gemm_dpbf16_zipped_at(int64_t M, int64_t N, int64_t K, const uint32_t* A_zip, const uint32_t* B_zip, int64_t kps,
                           float beta, float* C, int64_t ldc, Trickle* side = nullptr);

// The "amx" route (csrc/common/cpu_gemm_amx.cpp): Intel AMX tiles (TDPBF16PS), float32 accumulation and result.
// Call only where amx_available() (the CPU has AMX-BF16, Linux granted the tile state, x86-64 Linux build). op(B)
// packed as the avx512bf16 route packs it, with the k-pairs padded to a multiple of 16 (amx_packed_words words).
bool amx_available();
int64_t amx_kp_stride(int64_t K);  // k-pairs of a packed K: ceil(K / 2) rounded up to the tiles' 16
void gemm_amx(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
              const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc);
int64_t amx_packed_words(int64_t K, int64_t N);
void amx_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P);
void gemm_amx_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                     const uint32_t* P, float beta, float* C, int64_t ldc);

// The weight gradient C[M, N] (+)= A^T B of the tile loops from operands the AVX-512 VJP rows wrote zipped: A [K, M]
// and B [K, N] (K the tile's rows) each as k-pair panels, amx_pack_b's layout (word (kp, n) = (X[2kp][n], X[2kp+1][n])
// in panel n / 32 at kp stride amx_kp_stride(K); k-pairs past K zeros): A's panels are only transposed, nothing is
// zipped or packed per call. Only where weight_grad_zipped().
void gemm_amx_zipped_at(int64_t M, int64_t N, int64_t K, const uint32_t* A_zip, const uint32_t* B_zip, float beta,
                        float* C, int64_t ldc);
// The same on the route in use: gemm_amx_zipped_at, or on "avx512bf16" gemm_dpbf16_zipped_at (the panels read in
// place: its micro-kernel takes A^T's k-pair words as they lie). Only where weight_grad_zipped(). side: as for
// gemm_dpbf16_packed (the "amx" route, whose GEMMs leave less time to hide anything behind, does not ask for it).
void gemm_bf16_zipped_at(int64_t M, int64_t N, int64_t K, const uint32_t* A_zip, const uint32_t* B_zip, float beta,
                         float* C, int64_t ldc, Trickle* side = nullptr);
// Whether the tile loops' weight gradients take that path: the "amx" route (its weight gradients not sent to MKL) or
// the "avx512bf16" route, and not turned off (set_weight_grad_zipped(false): the rows write plain bf16 rows, packed
// per GEMM; for the tests).
bool weight_grad_zipped();
void set_weight_grad_zipped(bool on);

// A row's place in k-pair panels (gemm_amx_zipped_at's operands): row `row` of a [K, n] matrix is half row % 2 of the
// words of k-pair row / 2; kp_stride = amx_kp_stride(K).
struct RowZip {
  uint32_t* v_z = nullptr;  // v_z's panels, or null
  uint32_t* y = nullptr;    // the layer output's panels (in place of a row-major y_mm), or null
  int64_t kp_stride = 0, row = 0;
};

// The routes that take a weight packed once per op call ("avx512bf16", "amx"): whether the route in use is one,
// and its packing and packed GEMM (a weight packed under one route is read only under that route).
bool bf16_route_packs_b();
int64_t bf16_packed_words(int64_t K, int64_t N);
void bf16_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P);
void gemm_bf16_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                      const uint32_t* P, float beta, float* C, int64_t ldc, Trickle* side = nullptr);

// The tile loops' LayerNorm(+affine)+ReLU rows for float rows of a multiple of 16 on CPUs with AVX512-BF16
// (csrc/common/layernorm_avx512.cpp): srn_math.h's layernorm_relu_row<float, Y> over R rows, the output written as
// float to y and / or as bf16 to y_mm (either may be null). z [R, n] (row stride ldz; read only, unless y is z), xhat
// [R, n] (ldx) kept as float in xhat or as bf16 in xhat_mm (a bf16 layer's store mode: half the bytes), or neither;
// y / y_mm [R, n] (ldy); the rows' rstd into rstd_out [R] (or null). stream_xhat: xhat is written with
// non-temporal stores (where its rows are 64-byte aligned): for saved activations read much later.
bool ln_row_avx512_available();
// Whether the tile loops use these rows: available and not turned off (set_avx512_rows(false), for the tests).
bool avx512_rows();
void set_avx512_rows(bool on);
void layernorm_relu_rows_avx512(float* z, int64_t R, int64_t ldz, int64_t n, const float* bias, const float* gamma,
                                const float* beta, float eps, float* xhat, c10::BFloat16* xhat_mm, int64_t ldx,
                                float* y, c10::BFloat16* y_mm, int64_t ldy, float* rstd_out, bool stream_xhat = false);
// The same rows for a thin layer (cin <= 4, phi's 3-wide input layer): z = x W^T (+ bias) computed from x [R, cin]
// (row stride ldxi) and W [n, cin] where the rows read it, never stored.
void layernorm_relu_rows_thin_avx512(const float* x, int64_t ldxi, int64_t cin, const float* W, int64_t R, int64_t n,
                                     const float* bias, const float* gamma, const float* beta, float eps, float* xhat,
                                     c10::BFloat16* xhat_mm, int64_t ldx, float* y, c10::BFloat16* y_mm, int64_t ldy,
                                     float* rstd_out, bool stream_xhat = false);
// Its VJP (srn_math.h's layernorm_relu_row_vjp, or for a bf16 layer mlp_tile.h's detail::vjp_row_to_bf16): xhat [n]
// (float, or bf16 in xhat_mm when that is given), v_y [n]; g [n]: the gradient of z as float when v_z is null, else
// scratch and v_z [n] gets it as bf16; v_gamma / v_beta / v_bias [n] accumulated (or null). y_mm [n] (or null): the
// layer's output ReLU(xhat * gamma + beta) as bf16 (mlp_tile.h's detail::act_row_to_bf16), written on the way.
// zip (or null): v_z (when written as bf16) and / or that output also written into k-pair panels (RowZip).
void layernorm_relu_row_vjp_avx512(const float* xhat, const c10::BFloat16* xhat_mm, const float* v_y, int64_t n,
                                   float rstd, const float* gamma, const float* beta, float* g, float* v_gamma,
                                   float* v_beta, c10::BFloat16* v_z, float* v_bias, c10::BFloat16* y_mm = nullptr,
                                   const RowZip* zip = nullptr);
// The same for two rows side by side (two independent reduction chains), v_z written as bf16: xhat / xhat_mm and v_y
// two rows at strides ldx / ldv, rstd [2], g [2, n] scratch, v_z and y_mm [2, n]; zip->row even (the rows share their
// k-pair words: one full store for both).
void layernorm_relu_rows2_vjp_avx512(const float* xhat, const c10::BFloat16* xhat_mm, int64_t ldx, const float* v_y,
                                     int64_t ldv, int64_t n, const float* rstd, const float* gamma, const float* beta,
                                     float* g, float* v_gamma, float* v_beta, c10::BFloat16* v_z, float* v_bias,
                                     c10::BFloat16* y_mm, const RowZip* zip);

// A norm layer's output rebuilt from its saved xhat for a float product: y [n] = ReLU(xhat gamma + beta) (gamma
// null: ReLU(xhat)), xhat a float row (xhat) or a bf16 row (xhat_mm); n a multiple of 16. One pass, where widening
// the bf16 row and then the generic affine loop took two.
void layernorm_relu_act_row_avx512(const float* xhat, const c10::BFloat16* xhat_mm, int64_t n, const float* gamma,
                                   const float* beta, float* y);

// The march's float32 LSTM products in AVX-512 (csrc/common/gemm_f32_avx512.cpp), where the CPU has AVX-512F:
//   C[M, N] = (accumulate ? C : 0) + sum_k A(m, k) B(k, n),  A(m, k) = A[m * a_row + k * a_k],  B(k, n) = B[k * ldb + n]
// (op(A) = A or A^T in place; B row-major, any N). lstm_gemm_avx512(): available and not turned off
// (set_lstm_gemm_avx512(false): MKL's sgemm, for the tests).
bool f32_avx512_available();
bool lstm_gemm_avx512();
void set_lstm_gemm_avx512(bool on);
void gemm_f32_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_k, const float* B,
                     int64_t ldb, bool accumulate, float* C, int64_t ldc);
// cpu::gemm's float products with N <= 4 columns of C (phi's 3-wide first layer: its input gradient [R, C] x [C, 3],
// K a multiple of 16; its weight gradient [R, C]^T x [R, 3], M a multiple of 16) in AVX-512 where the CPU has it:
// true when done, false for a shape or CPU it does not take (thin_gemm's generic loops then).
bool thin_f32_avx512(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float beta, float* C, int64_t ldc);

// "blas" or "aten": the backend in use.
const char* gemm_backend();
// Selects "blas" (error if unavailable), "aten", or "auto" (blas when available).
void set_gemm_backend(const std::string& name);

// The bf16 GEMM route (bf16 inputs, float32 accumulation and output), chosen separately because the fastest one
// depends on the CPU and its vendor: "mkl" (cblas_gemm_bf16bf16f32: AMX / AVX512-BF16 on Intel, emulated
// elsewhere), "amx" (srn_fast's own AMX kernel, on CPUs with AMX-BF16), "avx512bf16" (srn_fast's own VDPBF16PS
// kernel, on CPUs with AVX512-BF16), "widened" (the operands
// widened to float32, exactly, and the float32 GEMM: the same arithmetic, faster where bf16 instructions run below
// the float32 FMA rate) or "onednn" (ATen's bf16 matmul, i.e. oneDNN's, the route of torch.bmm in bf16: it rounds
// each result to bf16, so it is used only when forced). "auto" (the default; SRN_FAST_BF16_GEMM=<route> forces one)
// measures each available route once, as the tile loops call it (every thread on its own tile), and keeps the
// fastest of those with a float32 result (amx unless another route measures 1.25x its rate: see chosen_route).
// Under "amx" every GEMM, the weight gradients (op(A) = A^T) included, runs on srn_fast's AMX kernel;
// set_amx_weight_grad_mkl(true) sends the weight gradients to MKL's bf16 GEMM where torch exports it (for the tests).
const char* bf16_route();
void set_bf16_route(const std::string& name);
void set_amx_weight_grad_mkl(bool on);
// GFLOP/s (all threads) of each route and of the float32 GEMM at a tile's shape ([128, 256] x [256, 256]),
// measured once per process (cached): {"float32", "mkl", "onednn", "widened", "avx512bf16", "amx"} (a route this torch
// build or CPU lacks is absent).
std::vector<std::pair<std::string, double>> tile_gemm_rates();

}  // namespace cpu
}  // namespace srn
