// Raw-pointer launchers of the element-wise CUDA kernels (elementwise_kernels.cu). No torch headers: the .cu
// files include this. See elementwise.h for what each stage computes.
#pragma once

#include <cstdint>

namespace srn {

#ifdef SRN_WITH_CUDA
// Raw-pointer launchers (elementwise_kernels.cu); float32 only; `stream` is a cudaStream_t.
void ln_relu_forward_cuda(const float* z, const float* gamma, const float* beta, float* y, int64_t M, int64_t C,
                          void* stream);
void ln_relu_backward_cuda(const float* z, const float* v_y, const float* gamma, const float* beta, float* v_z,
                           float* v_gamma, float* v_beta, int64_t M, int64_t C, void* stream);
void lstm_step_forward_cuda(float* pre, const float* bias, const float* c_prev, const float* x, const float* dirs,
                            const float* w_out, const float* b_out, float* c, float* h, float* x_new, int64_t M,
                            int64_t H, void* stream);
void lstm_step_backward_cuda(const float* gates, const float* c_prev, const float* c, const float* h,
                             const float* dirs, const float* v_x, const float* v_h, float* v_c, const float* w_out,
                             const float* b_out, float clamp, float* v_pre, float* v_s, float* v_dirs, int64_t M,
                             int64_t H, void* stream);
#endif

}  // namespace srn
