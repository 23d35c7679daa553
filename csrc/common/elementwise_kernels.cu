// CUDA kernels of the fused element-wise stages (no torch headers). Index arithmetic only: the math is the
// srn_math.h functions that the CPU loops call too.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/elementwise_cuda.h"
#include "common/srn_math.h"

namespace srn {

namespace {

constexpr float kEps = 1e-5f;
constexpr int kRowsPerBlock = 16;

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("srn_fast ") + what + ": " + cudaGetErrorString(err));
}

// Block-wide sum; every thread gets the result. `buf` holds blockDim.x / 32 floats.
__device__ float block_sum(float v, float* buf) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < nwarps; ++w) t += buf[w];
  return t;
}

// One thread per channel (blockDim.x >= C, a multiple of 32), kRowsPerBlock rows per block.
__global__ void ln_relu_forward_kernel(const float* __restrict__ z, const float* __restrict__ gamma,
                                       const float* __restrict__ beta, float* __restrict__ y, int64_t M, int C) {
  __shared__ float buf[32];
  const int k = threadIdx.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
       r < M && r < (static_cast<int64_t>(blockIdx.x) + 1) * kRowsPerBlock; ++r) {
    const float v = k < C ? z[r * C + k] : 0.f;
    const float mean = block_sum(v, buf) / C;
    const float d = k < C ? v - mean : 0.f;
    const float var = block_sum(d * d, buf) / C;
    const float rstd = rsqrtf(var + kEps);
    if (k < C) y[r * C + k] = ln_relu_elem<float>(v, mean, rstd, gamma ? gamma[k] : 1.f, beta ? beta[k] : 0.f);
  }
}

// Same layout; per-thread partial sums of v_gamma / v_beta, one atomicAdd per channel per block.
__global__ void ln_relu_backward_kernel(const float* __restrict__ z, const float* __restrict__ v_y,
                                        const float* __restrict__ gamma, const float* __restrict__ beta,
                                        float* __restrict__ v_z, float* v_gamma, float* v_beta, int64_t M, int C) {
  __shared__ float buf[32];
  const int k = threadIdx.x;
  float acc_g = 0.f, acc_b = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
       r < M && r < (static_cast<int64_t>(blockIdx.x) + 1) * kRowsPerBlock; ++r) {
    const float v = k < C ? z[r * C + k] : 0.f;
    const float mean = block_sum(v, buf) / C;
    const float d = k < C ? v - mean : 0.f;
    const float rstd = rsqrtf(block_sum(d * d, buf) / C + kEps);
    const float xhat = d * rstd;
    const float gk = gamma && k < C ? gamma[k] : 1.f;
    const float a = xhat * gk + (beta && k < C ? beta[k] : 0.f);
    const float vy = (k < C && a > 0.f) ? v_y[r * C + k] : 0.f;
    acc_g += vy * xhat;
    acc_b += vy;
    const float g = vy * gk;
    const float sum_g = block_sum(g, buf);
    const float sum_gx = block_sum(g * xhat, buf);
    if (k < C) v_z[r * C + k] = rstd * (g - sum_g / C - xhat * sum_gx / C);
  }
  if (k < C) {
    if (v_gamma) atomicAdd(v_gamma + k, acc_g);
    if (v_beta) atomicAdd(v_beta + k, acc_b);
  }
}

__global__ void lstm_step_forward_kernel(float* __restrict__ pre, const float* __restrict__ c_prev,
                                         const float* __restrict__ x, const float* __restrict__ dirs,
                                         const float* __restrict__ w_out, const float* __restrict__ b_out,
                                         float* __restrict__ c, float* __restrict__ h, float* __restrict__ x_new,
                                         int64_t M, int H) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= M) return;
  float* g = pre + r * 4 * H;
  float s = b_out[0];
  for (int k = 0; k < H; ++k) {
    float gi, gf, gg, go, cn, hn;
    lstm_cell<float>(g[k], g[H + k], g[2 * H + k], g[3 * H + k], c_prev[r * H + k], gi, gf, gg, go, cn, hn);
    g[k] = gi;
    g[H + k] = gf;
    g[2 * H + k] = gg;
    g[3 * H + k] = go;
    c[r * H + k] = cn;
    h[r * H + k] = hn;
    s += hn * w_out[k];
  }
  for (int j = 0; j < 3; ++j) x_new[r * 3 + j] = x[r * 3 + j] + dirs[r * 3 + j] * s;
}

__global__ void lstm_step_backward_kernel(const float* __restrict__ gates, const float* __restrict__ c_prev,
                                          const float* __restrict__ c, const float* __restrict__ h,
                                          const float* __restrict__ dirs, const float* __restrict__ v_x,
                                          const float* __restrict__ v_h, float* __restrict__ v_c,
                                          const float* __restrict__ w_out, const float* __restrict__ b_out,
                                          float clamp_v, float* __restrict__ v_pre, float* __restrict__ v_s,
                                          float* __restrict__ v_dirs, int64_t M, int H) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= M) return;
  float s = b_out[0];
  for (int k = 0; k < H; ++k) s += h[r * H + k] * w_out[k];
  float vs = 0.f;
  for (int j = 0; j < 3; ++j) {
    vs += v_x[r * 3 + j] * dirs[r * 3 + j];
    v_dirs[r * 3 + j] += v_x[r * 3 + j] * s;
  }
  v_s[r] = vs;
  const float* g = gates + r * 4 * H;
  float* vp = v_pre + r * 4 * H;
  for (int k = 0; k < H; ++k) {
    float vh = v_h[r * H + k] + vs * w_out[k];
    if (clamp_v >= 0.f) vh = clamp<float>(vh, -clamp_v, clamp_v);
    float vcp;
    lstm_cell_vjp<float>(g[k], g[H + k], g[2 * H + k], g[3 * H + k], c_prev[r * H + k], c[r * H + k], vh,
                         v_c[r * H + k], vp[k], vp[H + k], vp[2 * H + k], vp[3 * H + k], vcp);
    v_c[r * H + k] = vcp;
  }
}

int channel_threads(int64_t C) {
  if (C > 1024) throw std::runtime_error("srn_fast CUDA LayerNorm supports at most 1024 channels");
  return static_cast<int>((C + 31) / 32 * 32);
}

unsigned row_blocks(int64_t M) { return static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

void ln_relu_forward_cuda(const float* z, const float* gamma, const float* beta, float* y, int64_t M, int64_t C,
                          void* stream) {
  if (M == 0) return;
  ln_relu_forward_kernel<<<row_blocks(M), channel_threads(C), 0, static_cast<cudaStream_t>(stream)>>>(
      z, gamma, beta, y, M, static_cast<int>(C));
  check_launch("ln_relu_forward kernel");
}

void ln_relu_backward_cuda(const float* z, const float* v_y, const float* gamma, const float* beta, float* v_z,
                           float* v_gamma, float* v_beta, int64_t M, int64_t C, void* stream) {
  if (M == 0) return;
  ln_relu_backward_kernel<<<row_blocks(M), channel_threads(C), 0, static_cast<cudaStream_t>(stream)>>>(
      z, v_y, gamma, beta, v_z, v_gamma, v_beta, M, static_cast<int>(C));
  check_launch("ln_relu_backward kernel");
}

void lstm_step_forward_cuda(float* pre, const float* c_prev, const float* x, const float* dirs, const float* w_out,
                            const float* b_out, float* c, float* h, float* x_new, int64_t M, int64_t H,
                            void* stream) {
  if (M == 0) return;
  const int threads = 128;
  lstm_step_forward_kernel<<<static_cast<unsigned>((M + threads - 1) / threads), threads, 0,
                             static_cast<cudaStream_t>(stream)>>>(pre, c_prev, x, dirs, w_out, b_out, c, h, x_new, M,
                                                                  static_cast<int>(H));
  check_launch("lstm_step_forward kernel");
}

void lstm_step_backward_cuda(const float* gates, const float* c_prev, const float* c, const float* h,
                             const float* dirs, const float* v_x, const float* v_h, float* v_c, const float* w_out,
                             const float* b_out, float clamp_v, float* v_pre, float* v_s, float* v_dirs, int64_t M,
                             int64_t H, void* stream) {
  if (M == 0) return;
  const int threads = 128;
  lstm_step_backward_kernel<<<static_cast<unsigned>((M + threads - 1) / threads), threads, 0,
                              static_cast<cudaStream_t>(stream)>>>(gates, c_prev, c, h, dirs, v_x, v_h, v_c, w_out,
                                                                   b_out, clamp_v, v_pre, v_s, v_dirs, M,
                                                                   static_cast<int>(H));
  check_launch("lstm_step_backward kernel");
}

}  // namespace srn
