// CUDA side of lift_rays: indices only, the math lives in common/srn_math.h.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/srn_math.h"
#include "rays/rays.h"

namespace srn {

__global__ void lift_rays_kernel(RaysParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * p.N) return;
  const int64_t b = i / p.N;
  const float* K = p.K + 4 * b;
  lift_ray<float>(p.uv[2 * i], p.uv[2 * i + 1], K[0], K[1], K[2], K[3], p.c2w + 12 * b, p.depth0[i],
                  p.x0 + 3 * i, p.dir + 3 * i);
}

void lift_rays_cuda(const RaysParams& p, void* stream) {
  const int64_t total = p.B * p.N;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  lift_rays_kernel<<<static_cast<unsigned>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("srn_fast lift_rays kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace srn
