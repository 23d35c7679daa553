// Reused CPU scratch tensors for the ops' internal accumulators (the per-thread / per-chunk weight-gradient slots of
// the MLP and march backward passes), the C++ side of srn_fast/ops/buffer_cache.py.
//
// A backward pass allocates its accumulator slots (B x C_l x C_{l-1} floats per layer and thread, ~3 MB for phi at
// width 256) and frees them when it returns. glibc serves such blocks with fresh pages whenever it has handed the
// previous ones back to the kernel, so every call faulted them in and zero-filled them again: at N = 64 rays the
// MLP op's backward took 1.1-1.4 ms with 540-640 page faults per call, and 335 us with none when the slots were reused.
// pooled_empty hands out an idle block of the same dtype and size instead; a block still referenced by anything but
// the pool is never handed out, so calls from several threads at once get blocks of their own. Blocks idle for more
// than kMaxIdle requests are freed when the pool grows; release_scratch_pool frees every idle block now, and
// set_scratch_pool_enabled(false) turns the pool off (buffer_cache.set_enabled and release reach it too).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace srn {

// An uninitialised tensor of `shape` with `options` (as at::empty): a CPU block of at least kMinPoolBytes comes from
// the pool while it is on; anything else from at::empty.
at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& options);
// The same, zero-filled (as at::zeros).
at::Tensor pooled_zeros(at::IntArrayRef shape, const at::TensorOptions& options);

// Frees every block that nothing but the pool refers to; returns the bytes freed.
int64_t release_scratch_pool();
// Bytes the pool holds, in use or idle.
int64_t scratch_pool_bytes();
// On (the default) or off; off also frees every idle block.
void set_scratch_pool_enabled(bool enabled);
bool scratch_pool_enabled();

}  // namespace srn
