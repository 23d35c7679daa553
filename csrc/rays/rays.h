// Lifting pixels to world-space rays (forward only; see srn_fast/ops/rays.py).
#pragma once

#include <cstdint>

namespace srn {

struct RaysParams {
  int64_t B;            // scenes
  int64_t N;            // rays per scene
  const float* uv;      // [B, N, 2]  pixel coordinates (column, row)
  const float* K;       // [B, 4]     fx, fy, cx, cy
  const float* c2w;     // [B, 3, 4]  camera-to-world, row-major
  const float* depth0;  // [B, N]     initial depth along the optical axis
  float* x0;            // [B, N, 3]  out: world point at depth0
  float* dir;           // [B, N, 3]  out: unit ray direction
};

#ifdef SRN_WITH_CUDA
// Defined in rays_kernel.cu. `stream` is a cudaStream_t.
void lift_rays_cuda(const RaysParams& p, void* stream);
#endif

}  // namespace srn
