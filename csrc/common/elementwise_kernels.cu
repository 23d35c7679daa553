// CUDA kernels of the fused element-wise stages (no torch headers). Index arithmetic only: the math is the row
// functions of srn_math.h that the CPU tiles and the CPU batched path call too, run here with lanes that spread a
// row's channels over threads:
//   BlockLanes: one block per row, thread k owns channel k (LayerNorm + ReLU rows, C <= 1024);
//   WarpLanes:  one warp per row, lane k owns channels k, k + 32, ... (the LSTM step rows): neighbouring lanes read
//               neighbouring gate channels, so the loads are coalesced (a thread per row walked rows 4H apart).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/elementwise_cuda.h"
#include "common/srn_math.h"

namespace srn {

namespace {

constexpr float kEps = 1e-5f;
constexpr int kRowsPerBlock = 16;   // LayerNorm: rows walked by one block
constexpr int kWarpsPerBlock = 4;   // LSTM: rows (one per warp) per block

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("srn_fast ") + what + ": " + cudaGetErrorString(err));
}

struct BlockLanes {
  static __device__ int first() { return threadIdx.x; }
  static __device__ int step() { return blockDim.x; }
  // Block-wide sum; every thread gets the result (blockDim.x a multiple of 32).
  template <typename T>
  static __device__ T sum(T v) {
    __shared__ T buf[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    T t = T(0);
    for (int w = 0; w < nwarps; ++w) t += buf[w];
    return t;
  }
};

struct WarpLanes {
  static __device__ int first() { return threadIdx.x % 32; }
  static __device__ int step() { return 32; }
  template <typename T>
  static __device__ T sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
};

// A block per kRowsPerBlock rows, thread k = channel k (blockDim.x >= C, a multiple of 32). z: pre-norm rows with
// the bias added (only read: no bias is passed to the row function).
__global__ void ln_relu_forward_kernel(const float* __restrict__ z, const float* __restrict__ gamma,
                                       const float* __restrict__ beta, float* __restrict__ y, int64_t M, int C) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
       r < M && r < (static_cast<int64_t>(blockIdx.x) + 1) * kRowsPerBlock; ++r) {
    layernorm_relu_row<float, float, BlockLanes>(const_cast<float*>(z + r * C), C, nullptr, gamma, beta, kEps,
                                                 nullptr, y + r * C);
  }
}

// Same layout. The forward row is recomputed into shared memory (xhat; the activation goes to v_z's row, which the
// VJP then overwrites: each channel is only touched by its own thread); v_gamma / v_beta accumulate per block in
// shared memory, then one atomicAdd per channel.
__global__ void ln_relu_backward_kernel(const float* __restrict__ z, const float* __restrict__ v_y,
                                        const float* __restrict__ gamma, const float* __restrict__ beta,
                                        float* __restrict__ v_z, float* v_gamma, float* v_beta, int64_t M, int C) {
  extern __shared__ float smem[];  // xhat [C], acc_gamma [C], acc_beta [C]
  float* xhat = smem;
  float* acc_g = smem + C;
  float* acc_b = smem + 2 * C;
  for (int k = threadIdx.x; k < C; k += blockDim.x) acc_g[k] = acc_b[k] = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
       r < M && r < (static_cast<int64_t>(blockIdx.x) + 1) * kRowsPerBlock; ++r) {
    const float rstd = layernorm_relu_row<float, float, BlockLanes>(const_cast<float*>(z + r * C), C, nullptr, gamma,
                                                                    beta, kEps, xhat, v_z + r * C);
    layernorm_relu_row_vjp<float, BlockLanes>(xhat, v_y + r * C, C, rstd, gamma, beta, v_z + r * C,
                                              v_gamma ? acc_g : nullptr, v_beta ? acc_b : nullptr);
  }
  for (int k = threadIdx.x; k < C; k += blockDim.x) {
    if (v_gamma) atomicAdd(v_gamma + k, acc_g[k]);
    if (v_beta) atomicAdd(v_beta + k, acc_b[k]);
  }
}

// A warp per row (kWarpsPerBlock rows per block).
__global__ void lstm_step_forward_kernel(float* __restrict__ pre, const float* __restrict__ bias,
                                         const float* __restrict__ c_prev, const float* __restrict__ x,
                                         const float* __restrict__ dirs, const float* __restrict__ w_out,
                                         const float* __restrict__ b_out, float* __restrict__ c,
                                         float* __restrict__ h, float* __restrict__ x_new, int64_t M, int H) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= M) return;  // whole warps leave together: the warp sums stay complete
  lstm_step_row<float, StdMath<float>, WarpLanes>(H, pre + r * 4 * H, bias, c_prev + r * H, w_out, b_out[0],
                                                  x + r * 3, dirs + r * 3, pre + r * 4 * H, c + r * H, h + r * H,
                                                  x_new + r * 3);
}

__global__ void lstm_step_backward_kernel(const float* __restrict__ gates, const float* __restrict__ c_prev,
                                          const float* __restrict__ c, const float* __restrict__ h,
                                          const float* __restrict__ dirs, const float* __restrict__ v_x,
                                          const float* __restrict__ v_h, float* __restrict__ v_c,
                                          const float* __restrict__ w_out, const float* __restrict__ b_out, float lo,
                                          float hi, float* __restrict__ v_pre, float* __restrict__ v_s,
                                          float* __restrict__ v_dirs, int64_t M, int H) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= M) return;
  const float vs = lstm_step_row_vjp<float, StdMath<float>, WarpLanes>(
      H, gates + r * 4 * H, c_prev + r * H, c + r * H, h + r * H, w_out, b_out[0], dirs + r * 3, v_x + r * 3,
      v_h + r * H, v_c + r * H, lo, hi, v_pre + r * 4 * H, v_dirs + r * 3, static_cast<float*>(nullptr));
  if (threadIdx.x % 32 == 0) v_s[r] = vs;
}

int channel_threads(int64_t C) {
  if (C > 1024) throw std::runtime_error("srn_fast CUDA LayerNorm supports at most 1024 channels");
  return static_cast<int>((C + 31) / 32 * 32);
}

unsigned row_blocks(int64_t M) { return static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock); }
unsigned warp_blocks(int64_t M) { return static_cast<unsigned>((M + kWarpsPerBlock - 1) / kWarpsPerBlock); }

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
  const size_t smem = 3 * static_cast<size_t>(C) * sizeof(float);
  ln_relu_backward_kernel<<<row_blocks(M), channel_threads(C), smem, static_cast<cudaStream_t>(stream)>>>(
      z, v_y, gamma, beta, v_z, v_gamma, v_beta, M, static_cast<int>(C));
  check_launch("ln_relu_backward kernel");
}

void lstm_step_forward_cuda(float* pre, const float* bias, const float* c_prev, const float* x, const float* dirs,
                            const float* w_out, const float* b_out, float* c, float* h, float* x_new, int64_t M,
                            int64_t H, void* stream) {
  if (M == 0) return;
  lstm_step_forward_kernel<<<warp_blocks(M), 32 * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      pre, bias, c_prev, x, dirs, w_out, b_out, c, h, x_new, M, static_cast<int>(H));
  check_launch("lstm_step_forward kernel");
}

void lstm_step_backward_cuda(const float* gates, const float* c_prev, const float* c, const float* h,
                             const float* dirs, const float* v_x, const float* v_h, float* v_c, const float* w_out,
                             const float* b_out, float clamp_v, float* v_pre, float* v_s, float* v_dirs, int64_t M,
                             int64_t H, void* stream) {
  if (M == 0) return;
  const float lo = clamp_v >= 0.f ? -clamp_v : -INFINITY, hi = clamp_v >= 0.f ? clamp_v : INFINITY;
  lstm_step_backward_kernel<<<warp_blocks(M), 32 * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      gates, c_prev, c, h, dirs, v_x, v_h, v_c, w_out, b_out, lo, hi, v_pre, v_s, v_dirs, M, static_cast<int>(H));
  check_launch("lstm_step_backward kernel");
}

}  // namespace srn
