// srn_fast.ops.wide_linear's forward and backward on the CPU (srn_fast/ops/wide_linear.py): y = x W^T + b for few
// rows M (the scenes of a batch) and many outputs O (the hypernetwork's last layers: W [65792, 256], 67 MB in
// float32).
//
//   grad_x [M, K] = g [M, O] W [O, K]        grad_W [O, K] = g^T x
//
// Both are bound by memory: reading W once and writing grad_W once (67 MB each). ATen's products ran far below
// that (a 2-core Zen 4, M = 2: mm for grad_W 8.2 ms a layer, the chunked bmm for grad_x 4.8 ms, against ~2.4 ms to
// stream 67 MB out): grad_W's rows were written with ordinary stores (each cold line read first) and W was read
// in a second pass. Here one pass over the rows of W: row o of grad_W (M multiply-adds a value, written with
// non-temporal stores where the rows lie on 64-byte lines: the 67 MB are not read first and do not evict the
// cache) and row o's share of grad_x (per-thread partial sums, added at the end).
#include <ATen/Parallel.h>

#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/aligned.h"
#include "common/checks.h"
#include "common/srn_math.h"
#include "wide_linear/wide_linear.h"

namespace srn {

namespace {

constexpr const char* kOp = "srn_fast.ops.wide_linear";
constexpr int64_t kVecBytes = int64_t(kCacheLine);  // one non-temporal store: a whole cache line

// A cache line from src to the line-aligned dst with non-temporal stores where the target has them.
inline void stream_line(void* dst, const void* src) {
#if defined(__AVX512F__)
  _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_loadu_si512(src));
#elif defined(__AVX__)
  for (int i = 0; i < 2; ++i) {
    _mm256_stream_si256(static_cast<__m256i*>(dst) + i, _mm256_loadu_si256(static_cast<const __m256i*>(src) + i));
  }
#elif defined(__x86_64__)
  for (int i = 0; i < 4; ++i) {
    _mm_stream_si128(static_cast<__m128i*>(dst) + i, _mm_loadu_si128(static_cast<const __m128i*>(src) + i));
  }
#else
  std::memcpy(dst, src, kVecBytes);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// grad_W's row o (K values) from g's column o (M values, stride O) and x [M, K]; streamed when the row and K allow.
template <typename T>
inline void grad_w_row(const T* g, int64_t O, const T* x, int64_t M, int64_t K, int64_t o, T* row, bool stream) {
  constexpr int64_t kL = kVecBytes / int64_t(sizeof(T));
  if (stream) {
    typedef T V __attribute__((vector_size(kVecBytes)));
    for (int64_t k = 0; k < K; k += kL) {
      V acc = {};
      for (int64_t m = 0; m < M; ++m) {
        V xv;
        std::memcpy(&xv, x + m * K + k, sizeof(V));
        acc += g[m * O + o] * xv;
      }
      stream_line(row + k, &acc);
    }
    return;
  }
  SRN_SIMD
  for (int64_t k = 0; k < K; ++k) row[k] = T(0);
  for (int64_t m = 0; m < M; ++m) {
    const T gm = g[m * O + o];
    const T* xm = x + m * K;
    SRN_SIMD
    for (int64_t k = 0; k < K; ++k) row[k] += gm * xm[k];
  }
}

// g [M, O], x [M, K], W [O, K] (or null: no grad_x); grad_x [M, K] (or null), grad_W [O, K] (or null).
template <typename T>
void backward_cpu(const T* g, const T* x, const T* W, int64_t M, int64_t O, int64_t K, T* grad_x, T* grad_W) {
  const int64_t threads = at::get_num_threads();
  // per-thread partial sums of grad_x; a thread's rows come in one or more chunks, all added into its own slot
  std::vector<T> part(grad_x ? size_t(threads * M * K) : 0, T(0));
  const bool stream = grad_W && K % (kVecBytes / int64_t(sizeof(T))) == 0 && is_line_aligned(grad_W);
  at::parallel_for(0, O, 2048, [&](int64_t o0, int64_t o1) {
    T* acc = grad_x ? part.data() + at::get_thread_num() * M * K : nullptr;
    for (int64_t o = o0; o < o1; ++o) {
      if (grad_W) grad_w_row(g, O, x, M, K, o, grad_W + o * K, stream);
      if (acc) {
        const T* w = W + o * K;
        for (int64_t m = 0; m < M; ++m) {
          const T gm = g[m * O + o];
          T* am = acc + m * K;
          SRN_SIMD
          for (int64_t k = 0; k < K; ++k) am[k] += gm * w[k];
        }
      }
    }
  });
  if (stream) stream_fence();
  if (grad_x) {
    std::fill(grad_x, grad_x + M * K, T(0));
    for (int64_t t = 0; t < threads; ++t) {
      const T* p = part.data() + t * M * K;
      SRN_SIMD
      for (int64_t i = 0; i < M * K; ++i) grad_x[i] += p[i];
    }
  }
}

// y [M, O] = x [M, K] W^T + bias (bias null: none), W [O, K]: one pass over the rows of W, each row's M dot
// products while the row is in L1 (ATen's addmm reads W once too, but writes [O, M], which then takes a bias copy
// before and a transpose after it). The sums run in k order within each vector lane, the lanes added at the end:
// the same bits for any thread count.
template <typename T>
void forward_cpu(const T* x, const T* W, const T* bias, int64_t M, int64_t O, int64_t K, T* y) {
  at::parallel_for(0, O, 2048, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* w = W + o * K;
      for (int64_t m = 0; m < M; ++m) {
        const T* xm = x + m * K;
        T acc = T(0);
        SRN_SIMD_SUM(acc)
        for (int64_t k = 0; k < K; ++k) acc += w[k] * xm[k];
        y[m * O + o] = bias ? acc + bias[o] : acc;
      }
    }
  });
}

}  // namespace

void wide_linear_forward(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_, at::Tensor out) {
  check_float(kOp, "x", x_);
  TORCH_CHECK(x_.device().is_cpu(), kOp, ": the fused forward runs on the CPU, got x on ", x_.device());
  check_shape(kOp, "x", x_, {-1, -1}, "[M, K]");
  const int64_t M = x_.size(0), K = x_.size(1);
  check_shape(kOp, "weight", weight_, {-1, K}, "[O, K] with x's K");
  const int64_t O = weight_.size(0);
  check_same(kOp, "weight", weight_, x_, "x");
  const bool has_bias = !is_placeholder(bias_);
  if (has_bias) {
    check_shape(kOp, "bias", bias_, {O}, "[O] with weight's O");
    check_same(kOp, "bias", bias_, x_, "x");
  }
  check_out(kOp, "out", out, {M, O}, x_);
  const at::Tensor x = x_.contiguous(), W = weight_.contiguous(), b = has_bias ? bias_.contiguous() : bias_;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "wide_linear_forward", [&] {
    forward_cpu<scalar_t>(x.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), has_bias ? b.data_ptr<scalar_t>() : nullptr,
                          M, O, K, out.data_ptr<scalar_t>());
  });
}

void wide_linear_backward(const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& weight_, at::Tensor grad_x,
                          at::Tensor grad_weight) {
  check_float(kOp, "grad", grad_);
  TORCH_CHECK(grad_.device().is_cpu(), kOp, ": the fused backward runs on the CPU, got grad on ", grad_.device());
  check_shape(kOp, "grad", grad_, {-1, -1}, "[M, O]");
  const int64_t M = grad_.size(0), O = grad_.size(1);
  check_shape(kOp, "x", x_, {M, -1}, "[M, K] with grad's M");
  const int64_t K = x_.size(1);
  check_shape(kOp, "weight", weight_, {O, K}, "[O, K] with grad's O and x's K");
  check_same(kOp, "x", x_, grad_, "grad");
  check_same(kOp, "weight", weight_, grad_, "grad");
  const bool want_x = !is_placeholder(grad_x), want_w = !is_placeholder(grad_weight);
  if (want_x) check_out(kOp, "grad_x", grad_x, {M, K}, grad_);
  if (want_w) check_out(kOp, "grad_weight", grad_weight, {O, K}, grad_);
  const at::Tensor g = grad_.contiguous(), x = x_.contiguous(), W = weight_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "wide_linear_backward", [&] {
    backward_cpu<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), want_x ? W.data_ptr<scalar_t>() : nullptr,
                           M, O, K, want_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                           want_w ? grad_weight.data_ptr<scalar_t>() : nullptr);
  });
}

void register_wide_linear(pybind11::module& m) {
  namespace py = pybind11;
  m.def("wide_linear_forward", &wide_linear_forward,
        "CPU forward of wide_linear: out = x weight^T + bias in one pass over the weight's rows (see wide_linear.cpp)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"));
  m.def("wide_linear_backward", &wide_linear_backward,
        "CPU backward of wide_linear: grad_x = grad W and grad_weight = grad^T x in one pass over W (see wide_linear.cpp)",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("grad_x"), py::arg("grad_weight"));
}

}  // namespace srn
