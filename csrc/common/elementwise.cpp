// CPU loops (and CUDA dispatch) of the fused element-wise stages; the math is in srn_math.h.
#include "common/elementwise.h"

#include <ATen/Parallel.h>

#include <limits>
#include <mutex>
#include <vector>

#include "common/checks.h"
#include "common/srn_math.h"

namespace srn {

namespace {

constexpr double kEps = 1e-5;

// The batched path's LayerNorm + ReLU rows through srn_math.h's layernorm_relu_row / _vjp (the CPU tiles' and the
// CUDA kernels' row functions); z is the pre-norm row with the bias already added.
template <typename T>
void ln_relu_forward_cpu(const T* z, const T* gamma, const T* beta, T* y, int64_t M, int64_t C) {
  at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      // no bias: the row is only read
      layernorm_relu_row<T, T>(const_cast<T*>(z + r * C), int(C), nullptr, gamma, beta, T(kEps), nullptr, y + r * C);
    }
  });
}

template <typename T>
void ln_relu_backward_cpu(const T* z, const T* v_y, const T* gamma, const T* beta, T* v_z, T* v_gamma, T* v_beta,
                          int64_t M, int64_t C) {
  std::mutex mu;
  at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
    std::vector<T> xhat(C), y(C), vg(v_gamma ? C : 0, T(0)), vb(v_beta ? C : 0, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T rstd = layernorm_relu_row<T, T>(const_cast<T*>(z + r * C), int(C), nullptr, gamma, beta, T(kEps),
                                              xhat.data(), y.data());
      layernorm_relu_row_vjp<T>(xhat.data(), v_y + r * C, int(C), rstd, gamma, beta, v_z + r * C,
                                v_gamma ? vg.data() : nullptr, v_beta ? vb.data() : nullptr);
    }
    if (v_gamma || v_beta) {
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t k = 0; k < C; ++k) {
        if (v_gamma) v_gamma[k] += vg[k];
        if (v_beta) v_beta[k] += vb[k];
      }
    }
  });
}

template <typename T>
void lstm_step_forward_cpu(T* pre, const T* bias, const T* c_prev, const T* x, const T* dirs, const T* w_out,
                           const T* b_out, T* c, T* h, T* x_new, int64_t M, int64_t H) {
  at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      lstm_step_row<T>(int(H), pre + r * 4 * H, bias, c_prev + r * H, w_out, b_out[0], x + r * 3, dirs + r * 3,
                       pre + r * 4 * H, c + r * H, h + r * H, x_new + r * 3);
    }
  });
}

template <typename T>
void lstm_step_backward_cpu(const T* gates, const T* c_prev, const T* c, const T* h, const T* dirs, const T* v_x,
                            const T* v_h, T* v_c, const T* w_out, const T* b_out, T clamp_v, T* v_pre, T* v_s,
                            T* v_dirs, int64_t M, int64_t H) {
  const T lo = clamp_v >= T(0) ? -clamp_v : -std::numeric_limits<T>::infinity();
  const T hi = clamp_v >= T(0) ? clamp_v : std::numeric_limits<T>::infinity();
  at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      v_s[r] = lstm_step_row_vjp<T>(int(H), gates + r * 4 * H, c_prev + r * H, c + r * H, h + r * H, w_out, b_out[0],
                                    dirs + r * 3, v_x + r * 3, v_h + r * H, v_c + r * H, lo, hi, v_pre + r * 4 * H,
                                    v_dirs + r * 3, static_cast<T*>(nullptr));
    }
  });
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
T* opt_mut_ptr(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

#ifndef SRN_WITH_CUDA
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "srn_fast was built without CUDA kernels; reinstall with a CUDA torch and nvcc");
}
#endif

}  // namespace

at::Tensor ln_relu_forward(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta) {
  const int64_t C = z.size(-1), M = z.numel() / std::max<int64_t>(C, 1);
  auto y = at::empty_like(z);
  if (z.numel() == 0) return y;
  if (z.is_cuda()) {
#ifdef SRN_WITH_CUDA
    ln_relu_forward_cuda(z.data_ptr<float>(), opt_ptr<float>(gamma), opt_ptr<float>(beta), y.data_ptr<float>(), M,
                         C, current_cuda_stream(z.device()));
#else
    no_cuda();
#endif
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_relu_forward", [&] {
    ln_relu_forward_cpu<scalar_t>(z.data_ptr<scalar_t>(), opt_ptr<scalar_t>(gamma), opt_ptr<scalar_t>(beta),
                                  y.data_ptr<scalar_t>(), M, C);
  });
  return y;
}

at::Tensor ln_relu_backward(const at::Tensor& z, const at::Tensor& v_y, const at::Tensor& gamma,
                            const at::Tensor& beta, at::Tensor v_gamma, at::Tensor v_beta) {
  const int64_t C = z.size(-1), M = z.numel() / std::max<int64_t>(C, 1);
  auto v_z = at::empty_like(z);
  if (z.numel() == 0) return v_z;
  if (z.is_cuda()) {
#ifdef SRN_WITH_CUDA
    ln_relu_backward_cuda(z.data_ptr<float>(), v_y.data_ptr<float>(), opt_ptr<float>(gamma), opt_ptr<float>(beta),
                          v_z.data_ptr<float>(), opt_mut_ptr<float>(v_gamma), opt_mut_ptr<float>(v_beta), M, C,
                          current_cuda_stream(z.device()));
#else
    no_cuda();
#endif
    return v_z;
  }
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ln_relu_backward", [&] {
    ln_relu_backward_cpu<scalar_t>(z.data_ptr<scalar_t>(), v_y.data_ptr<scalar_t>(), opt_ptr<scalar_t>(gamma),
                                   opt_ptr<scalar_t>(beta), v_z.data_ptr<scalar_t>(), opt_mut_ptr<scalar_t>(v_gamma),
                                   opt_mut_ptr<scalar_t>(v_beta), M, C);
  });
  return v_z;
}

void lstm_step_forward(at::Tensor& pre, const at::Tensor& bias, const at::Tensor& c_prev, const at::Tensor& x,
                       const at::Tensor& dirs, const at::Tensor& w_out, const at::Tensor& b_out, at::Tensor& c,
                       at::Tensor& h, at::Tensor& x_new) {
  const int64_t H = c_prev.size(-1), M = c_prev.numel() / std::max<int64_t>(H, 1);
  if (M == 0) return;
  if (pre.is_cuda()) {
#ifdef SRN_WITH_CUDA
    lstm_step_forward_cuda(pre.data_ptr<float>(), bias.data_ptr<float>(), c_prev.data_ptr<float>(), x.data_ptr<float>(),
                           dirs.data_ptr<float>(), w_out.data_ptr<float>(), b_out.data_ptr<float>(),
                           c.data_ptr<float>(), h.data_ptr<float>(), x_new.data_ptr<float>(), M, H,
                           current_cuda_stream(pre.device()));
#else
    no_cuda();
#endif
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "lstm_step_forward", [&] {
    lstm_step_forward_cpu<scalar_t>(pre.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(),
                                    x.data_ptr<scalar_t>(),
                                    dirs.data_ptr<scalar_t>(), w_out.data_ptr<scalar_t>(), b_out.data_ptr<scalar_t>(),
                                    c.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), x_new.data_ptr<scalar_t>(), M, H);
  });
}

void lstm_step_backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& h,
                        const at::Tensor& dirs, const at::Tensor& v_x, const at::Tensor& v_h, at::Tensor& v_c,
                        const at::Tensor& w_out, const at::Tensor& b_out, double clamp_v, at::Tensor& v_pre,
                        at::Tensor& v_s, at::Tensor& v_dirs) {
  const int64_t H = c.size(-1), M = c.numel() / std::max<int64_t>(H, 1);
  if (M == 0) return;
  if (gates.is_cuda()) {
#ifdef SRN_WITH_CUDA
    lstm_step_backward_cuda(gates.data_ptr<float>(), c_prev.data_ptr<float>(), c.data_ptr<float>(),
                            h.data_ptr<float>(), dirs.data_ptr<float>(), v_x.data_ptr<float>(), v_h.data_ptr<float>(),
                            v_c.data_ptr<float>(), w_out.data_ptr<float>(), b_out.data_ptr<float>(),
                            static_cast<float>(clamp_v), v_pre.data_ptr<float>(), v_s.data_ptr<float>(),
                            v_dirs.data_ptr<float>(), M, H, current_cuda_stream(gates.device()));
#else
    no_cuda();
#endif
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_step_backward", [&] {
    lstm_step_backward_cpu<scalar_t>(
        gates.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        dirs.data_ptr<scalar_t>(), v_x.data_ptr<scalar_t>(), v_h.data_ptr<scalar_t>(), v_c.data_ptr<scalar_t>(),
        w_out.data_ptr<scalar_t>(), b_out.data_ptr<scalar_t>(), static_cast<scalar_t>(clamp_v),
        v_pre.data_ptr<scalar_t>(), v_s.data_ptr<scalar_t>(), v_dirs.data_ptr<scalar_t>(), M, H);
  });
}

}  // namespace srn
