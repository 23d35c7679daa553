#include "common/cpu_gemm.h"

#include <ATen/ATen.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

// BLAS entry points exported by libtorch_cpu when torch is built with MKL (LP64 interface). Weak: null when
// the torch build does not export them, and then the ATen backend is used.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace srn {
namespace cpu {

namespace {

enum Backend { kAuto = 0, kBlas = 1, kAten = 2 };

bool blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

std::atomic<int>& backend_flag() {
  static std::atomic<int> flag([] {
    const char* env = std::getenv("SRN_FAST_GEMM");
    if (env && std::strcmp(env, "aten") == 0) return int(kAten);
    return int(kAuto);
  }());
  return flag;
}

bool use_blas() { return backend_flag().load(std::memory_order_relaxed) != kAten && blas_available(); }

// Row-major [rows, cols] view with row stride ld of a (possibly transposed) operand.
template <typename T>
at::Tensor view(const T* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  T* q = const_cast<T*>(p);  // read only
  if (!trans) return at::from_blob(q, {rows, cols}, {ld, 1}, opts);
  return at::from_blob(q, {cols, rows}, {ld, 1}, opts).t();
}

template <typename T, typename Acc>
void gemm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               Acc beta, Acc* C, int64_t ldc) {
  at::Tensor c = view<Acc>(C, false, M, N, ldc);
  at::Tensor a = view<T>(A, ta, M, K, lda), b = view<T>(B, tb, K, N, ldb);
  if (std::is_same<T, Acc>::value) {
    if (beta == Acc(0)) {
      at::mm_out(c, a, b);
    } else {
      c.addmm_(a, b);
    }
  } else {
    at::Tensor p = at::mm(a, b).to(c.scalar_type());
    if (beta == Acc(0)) {
      c.copy_(p);
    } else {
      c.add_(p);
    }
  }
}

template <typename T>
bool trivial(int64_t M, int64_t N, int64_t K, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : C[i * ldc + j];
    return true;
  }
  return false;
}

}  // namespace

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float beta, float* C, int64_t ldc) {
  if (trivial(M, N, K, beta, C, ldc)) return;
  if (use_blas()) {
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    const float one = 1.f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_aten<float, float>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
          int64_t ldb, double beta, double* C, int64_t ldc) {
  if (trivial(M, N, K, beta, C, ldc)) return;
  if (use_blas()) {
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    const double one = 1.0;
    dgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_aten<double, double>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
          const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (trivial(M, N, K, beta, C, ldc)) return;
  if (use_blas() && cblas_gemm_bf16bf16f32 != nullptr) {
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(M), int(N), int(K), 1.f,
                           reinterpret_cast<const uint16_t*>(A), int(lda), reinterpret_cast<const uint16_t*>(B),
                           int(ldb), beta, C, int(ldc));
    return;
  }
  gemm_aten<c10::BFloat16, float>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

const char* gemm_backend() { return use_blas() ? "blas" : "aten"; }

void set_gemm_backend(const std::string& name) {
  if (name == "aten") {
    backend_flag() = kAten;
  } else if (name == "blas" || name == "auto") {
    TORCH_CHECK(name == "auto" || blas_available(),
                "srn_fast: gemm backend 'blas' is unavailable: this torch build exports no sgemm_/dgemm_");
    backend_flag() = name == "blas" ? kBlas : kAuto;
  } else {
    TORCH_CHECK(false, "srn_fast: gemm backend must be 'auto', 'blas' or 'aten', got '", name, "'");
  }
}

}  // namespace cpu
}  // namespace srn
