#include "common/aligned.h"
#include "common/cpu_gemm.h"
#include "common/thin_gemm.h"

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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
  if (is_thin(M, N, K)) {
    if (thin_f32_avx512(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc)) return;
    return thin_gemm<float>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
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
  if (is_thin(M, N, K)) return thin_gemm<double>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  if (use_blas()) {
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    const double one = 1.0;
    dgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_aten<double, double>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

namespace {

enum Bf16Route { kRouteAuto = 0, kRouteMkl = 1, kRouteOneDnn = 2, kRouteWidened = 3, kRouteDpbf16 = 4, kRouteAmx = 5 };
constexpr const char* kRouteNames[] = {"auto", "mkl", "onednn", "widened", "avx512bf16", "amx"};  // by Bf16Route

int route_from_name(const char* name) {
  for (int r = kRouteMkl; r <= kRouteAmx; ++r)
    if (std::strcmp(name, kRouteNames[r]) == 0) return r;
  return kRouteAuto;
}

std::atomic<int>& bf16_flag() {
  static std::atomic<int> flag([] {
    const char* env = std::getenv("SRN_FAST_BF16_GEMM");
    return env ? route_from_name(env) : int(kRouteAuto);
  }());
  return flag;
}

bool mkl_bf16_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

std::atomic<bool>& amx_weight_grad_mkl() {
  static std::atomic<bool> on(false);
  return on;
}

void gemm_bf16_mkl(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                   const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(M), int(N), int(K), 1.f,
                         reinterpret_cast<const uint16_t*>(A), int(lda), reinterpret_cast<const uint16_t*>(B), int(ldb),
                         beta, C, int(ldc));
}

// op(X) stored as [rows, cols] bf16 with row stride ld -> dense float32 [rows, cols] in w (resized as needed).
// bf16 -> float32 is exact: the bf16 bits are the high half of the float's.
void widen(const c10::BFloat16* X, int64_t rows, int64_t cols, int64_t ld, aligned_vector<float>& w) {
  if (w.size() < size_t(rows * cols)) w.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(X + r * ld);
    uint32_t* d = reinterpret_cast<uint32_t*>(w.data() + r * cols);
    for (int64_t j = 0; j < cols; ++j) d[j] = uint32_t(s[j]) << 16;
  }
}

}  // namespace

void gemm_widened(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                  const float* B_wide, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (trivial(M, N, K, beta, C, ldc)) return;
  thread_local aligned_vector<float> wa;
  const int64_t a_cols = ta ? M : K;
  widen(A, ta ? K : M, a_cols, lda, wa);
  gemm(ta, tb, M, N, K, wa.data(), a_cols, B_wide, ldb, beta, C, ldc);
}

namespace {

// The "widened" route: the bf16 operands widened to float32 and multiplied by the float32 GEMM. A product of two
// bf16 numbers is exact in float32 and the sums accumulate in float32, so this is the arithmetic of a bf16 GEMM
// with float32 accumulation (what MKL itself does on CPUs without bf16 instructions); it wins where the CPU's bf16
// instructions run below its float32 FMA rate (e.g. AVX512-BF16 without AMX at half the rate).
void gemm_bf16_widened(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                       const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  thread_local aligned_vector<float> wb;
  const int64_t b_cols = tb ? K : N;
  widen(B, tb ? N : K, b_cols, ldb, wb);
  gemm_widened(ta, tb, M, N, K, A, lda, wb.data(), b_cols, beta, C, ldc);
}

// GFLOP/s of fn(thread) on a [M, K] x [K, N] product, run as the tile loops run their GEMMs: every thread of an
// at::parallel_for calling it on its own buffers (so each library call is single-threaded inside the parallel
// region, and the threads share the memory system); median of 5 timings.
template <typename F>
double rate(F fn, int64_t M, int64_t N, int64_t K, int64_t threads) {
  constexpr int kReps = 4;
  auto run = [&] {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int j = 0; j < kReps; ++j) fn(t);
    });
  };
  run();  // warm-up (oneDNN creates and caches its primitive here)
  std::vector<double> ts;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(ts.begin(), ts.end());
  return 2.0 * M * N * K * kReps * threads / ts[ts.size() / 2] / 1e9;
}

const std::vector<std::pair<std::string, double>>& measured_rates() {
  static const std::vector<std::pair<std::string, double>> rates = [] {
    constexpr int64_t M = 128, N = 256, K = 256;  // one tile through one 256-wide layer: C = A B^T
    const int64_t T = std::max(1, at::get_num_threads());
    aligned_vector<float> a(T * M * K), b(N * K), c(T * M * N);
    for (size_t i = 0; i < a.size(); ++i) a[i] = float((i * 7919) % 1000) / 1000.f - 0.5f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = float((i * 104729) % 1000) / 1000.f - 0.5f;
    aligned_vector<c10::BFloat16> ah(a.begin(), a.end()), bh(b.begin(), b.end());
    std::vector<std::pair<std::string, double>> out;
    out.emplace_back("float32", rate([&](int64_t t) {
      gemm(false, true, M, N, K, a.data() + t * M * K, K, b.data(), K, 0.f, c.data() + t * M * N, N);
    }, M, N, K, T));
    if (mkl_bf16_available()) {
      out.emplace_back("mkl", rate([&](int64_t t) {
        gemm_bf16_mkl(false, true, M, N, K, ah.data() + t * M * K, K, bh.data(), K, 0.f, c.data() + t * M * N, N);
      }, M, N, K, T));
    }
    out.emplace_back("onednn", rate([&](int64_t t) {
      gemm_aten<c10::BFloat16, float>(false, true, M, N, K, ah.data() + t * M * K, K, bh.data(), K, 0.f,
                                      c.data() + t * M * N, N);
    }, M, N, K, T));
    // the tile loops hand this route their weights widened once per op call (Layer::weight_wide): time it so
    aligned_vector<float> bw;
    widen(bh.data(), N, K, K, bw);
    out.emplace_back("widened", rate([&](int64_t t) {
      gemm_widened(false, true, M, N, K, ah.data() + t * M * K, K, bw.data(), K, 0.f, c.data() + t * M * N, N);
    }, M, N, K, T));
    if (dpbf16_available()) {  // likewise its weights come packed once per op call (Layer::weight_pk_fwd)
      aligned_vector<uint32_t> bp(dpbf16_packed_words(K, N));
      dpbf16_pack_b(true, K, N, bh.data(), K, bp.data());
      out.emplace_back("avx512bf16", rate([&](int64_t t) {
        gemm_dpbf16_packed(false, M, N, K, ah.data() + t * M * K, K, bp.data(), 0.f, c.data() + t * M * N, N);
      }, M, N, K, T));
    }
    if (amx_available()) {  // the same for the AMX route's packing
      aligned_vector<uint32_t> bp(amx_packed_words(K, N));
      amx_pack_b(true, K, N, bh.data(), K, bp.data());
      out.emplace_back("amx", rate([&](int64_t t) {
        gemm_amx_packed(false, M, N, K, ah.data() + t * M * K, K, bp.data(), 0.f, c.data() + t * M * N, N);
      }, M, N, K, T));
    }
    return out;
  }();
  return rates;
}

// The route by the CPU's instructions alone: AMX, else AVX512-BF16, else MKL's bf16 GEMM, else widened.
int route_by_instructions() {
  if (amx_available()) return kRouteAmx;
  if (dpbf16_available()) return kRouteDpbf16;
  return mkl_bf16_available() ? kRouteMkl : kRouteWidened;
}

int chosen_route() {
  const int f = bf16_flag().load(std::memory_order_relaxed);
  if (f != kRouteAuto) return f;
  // torch.use_deterministic_algorithms(True): never a timed pick. The routes sum their products in different orders,
  // and a timing can pick another route in the next process (routes within ~25% of each other swap places on a
  // shared VM), so the same seed would give other bits.
  if (at::globalContext().deterministicAlgorithms()) return route_by_instructions();
  static const int best = [] {
    double best_rate = -1, amx_rate = -1;
    int route = kRouteWidened;
    for (const auto& [name, r] : measured_rates()) {
      // oneDNN's result is rounded to bf16 (2x autocast's error in the LSTM gradients): only when forced
      if (name == "float32" || name == "onednn") continue;
      if (name == "amx") amx_rate = r;
      if (r > best_rate) best_rate = r, route = route_from_name(name.c_str());
    }
    // The probe times one forward-shaped GEMM. What amx gains in the tile loops does not show there (its weights
    // packed once per op call for the forward and input-gradient GEMMs; MKL packs both operands on every call), and
    // on a shared VM routes within ~25% of each other swap places from one process to the next (AMX Xeon: mkl
    // 1291-1715, amx 1682-2087 GFLOP/s in five processes, while the 64x64 bf16 training step ran 7% faster on amx
    // in every pairing). So amx is kept unless another route measures kAmxMargin times its rate.
    constexpr double kAmxMargin = 1.25;
    if (amx_rate > 0 && best_rate < kAmxMargin * amx_rate) route = kRouteAmx;
    return route;
  }();
  return best;
}

// The route a bf16 GEMM takes now: the chosen one, except that SRN_FAST_GEMM=aten (or a torch without BLAS
// symbols) leaves only ATen's, "mkl" needs cblas_gemm_bf16bf16f32 and "avx512bf16" / "amx" the CPU's instructions.
int route_in_use() {
  if (!use_blas()) return kRouteOneDnn;
  const int r = chosen_route();
  if (r == kRouteMkl && !mkl_bf16_available()) return kRouteOneDnn;
  if (r == kRouteAmx && !amx_available()) return kRouteWidened;
  return r == kRouteDpbf16 && !dpbf16_available() ? kRouteWidened : r;
}

}  // namespace

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
          const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (trivial(M, N, K, beta, C, ldc)) return;
  switch (route_in_use()) {
    case kRouteMkl:
      return gemm_bf16_mkl(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
    case kRouteWidened:
      return gemm_bf16_widened(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
    case kRouteDpbf16:
      return gemm_dpbf16(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
    case kRouteAmx:
      // the weight gradients (op(A) = A^T: the tile's rows are K) too, by default: with its packed operands on cache
      // lines (aligned.h) gemm_amx beats MKL's bf16 GEMM there (one thread, [256, 128] x [128, 256] four times:
      // 79 against 94 us; the 64x64 bf16 step 1.3-1.8% faster, paired). set_amx_weight_grad_mkl(true): MKL's.
      if (ta && amx_weight_grad_mkl().load(std::memory_order_relaxed) && mkl_bf16_available()) {
        return gemm_bf16_mkl(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
      }
      return gemm_amx(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
    default:
      return gemm_aten<c10::BFloat16, float>(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
}

const char* bf16_route() { return kRouteNames[route_in_use()]; }

bool bf16_route_packs_b() {
  const int r = route_in_use();
  return r == kRouteDpbf16 || r == kRouteAmx;
}

int64_t bf16_packed_words(int64_t K, int64_t N) {
  return route_in_use() == kRouteAmx ? amx_packed_words(K, N) : dpbf16_packed_words(K, N);
}

void bf16_pack_b(bool tb, int64_t K, int64_t N, const c10::BFloat16* B, int64_t ldb, uint32_t* P) {
  if (route_in_use() == kRouteAmx) return amx_pack_b(tb, K, N, B, ldb, P);
  dpbf16_pack_b(tb, K, N, B, ldb, P);
}

void gemm_bf16_packed(bool ta, int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                      const uint32_t* P, float beta, float* C, int64_t ldc, Trickle* side) {
  if (route_in_use() == kRouteAmx) return gemm_amx_packed(ta, M, N, K, A, lda, P, beta, C, ldc);
  gemm_dpbf16_packed(ta, M, N, K, A, lda, P, beta, C, ldc, side);
}

void set_amx_weight_grad_mkl(bool on) { amx_weight_grad_mkl() = on; }

namespace {
std::atomic<bool>& zipped_flag() {
  static std::atomic<bool> on(true);
  return on;
}
}  // namespace

bool weight_grad_zipped() {
  if (!zipped_flag().load(std::memory_order_relaxed)) return false;
  const int r = route_in_use();
  return r == kRouteDpbf16 ||
         (r == kRouteAmx && !(amx_weight_grad_mkl().load(std::memory_order_relaxed) && mkl_bf16_available()));
}

void gemm_bf16_zipped_at(int64_t M, int64_t N, int64_t K, const uint32_t* A_zip, const uint32_t* B_zip, float beta,
                         float* C, int64_t ldc, Trickle* side) {
  if (route_in_use() == kRouteAmx) return gemm_amx_zipped_at(M, N, K, A_zip, B_zip, beta, C, ldc);
  gemm_dpbf16_zipped_at(M, N, K, A_zip, B_zip, amx_kp_stride(K), beta, C, ldc, side);
}

void set_weight_grad_zipped(bool on) { zipped_flag() = on; }

void set_bf16_route(const std::string& name) {
  if (name == "auto") {
    bf16_flag() = kRouteAuto;
  } else if (name == "mkl") {
    TORCH_CHECK(mkl_bf16_available(), "srn_fast: bf16 route 'mkl' is unavailable: this torch build exports no "
                "cblas_gemm_bf16bf16f32");
    bf16_flag() = kRouteMkl;
  } else if (name == "avx512bf16") {
    TORCH_CHECK(dpbf16_available(), "srn_fast: bf16 route 'avx512bf16' is unavailable: this CPU lacks AVX512-BF16 "
                "(or this is not an x86-64 build)");
    bf16_flag() = kRouteDpbf16;
  } else if (name == "amx") {
    TORCH_CHECK(amx_available(), "srn_fast: bf16 route 'amx' is unavailable: this CPU lacks AMX-BF16 (or Linux did "
                "not grant the tile state, or this is not an x86-64 Linux build)");
    bf16_flag() = kRouteAmx;
  } else if (name == "onednn" || name == "widened") {
    bf16_flag() = route_from_name(name.c_str());
  } else {
    TORCH_CHECK(false, "srn_fast: bf16 route must be 'auto', 'mkl', 'onednn', 'widened', 'avx512bf16' or 'amx', got '",
                name, "'");
  }
}

std::vector<std::pair<std::string, double>> tile_gemm_rates() { return measured_rates(); }

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
