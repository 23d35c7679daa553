// srn::pooled_empty and the pool behind it (see scratch_pool.h).
#include "common/scratch_pool.h"

#include <atomic>
#include <mutex>
#include <vector>

namespace srn {
namespace {

constexpr int64_t kMinPoolBytes = 64 << 10;  // smaller blocks come from malloc's heap without fresh pages
constexpr uint64_t kMaxIdle = 512;           // requests an idle block waits before it is freed

struct Entry {
  at::Tensor block;  // the pool's own reference: a 1-d tensor over the whole storage
  uint64_t last_use;
};

struct Pool {
  std::mutex mu;
  std::vector<Entry> entries;
  uint64_t clock = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: blocks may still be handed back while the process exits
  return *p;
}

std::atomic<bool> g_enabled{true};

// Nothing but the pool refers to the block's storage (views handed out hold it too).
bool idle(const Entry& e) { return e.block.storage().use_count() == 1; }

// Frees the idle blocks last used more than max_idle requests ago (all idle ones for max_idle < 0); mu held.
int64_t drop_idle(Pool& p, int64_t max_idle) {
  int64_t freed = 0;
  std::vector<Entry> kept;
  kept.reserve(p.entries.size());
  for (Entry& e : p.entries) {
    if (idle(e) && (max_idle < 0 || p.clock - e.last_use > uint64_t(max_idle))) {
      freed += int64_t(e.block.nbytes());
    } else {
      kept.push_back(std::move(e));
    }
  }
  p.entries.swap(kept);
  return freed;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t nbytes = numel * int64_t(c10::elementSize(dtype));
  if (!g_enabled.load() || !options.device().is_cpu() || nbytes < kMinPoolBytes) return at::empty(shape, options);
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);  // two threads calling the ops at once must not take one idle block
  ++p.clock;
  for (Entry& e : p.entries) {
    if (e.block.numel() == numel && e.block.scalar_type() == dtype && idle(e)) {
      e.last_use = p.clock;
      return e.block.view(shape);
    }
  }
  drop_idle(p, int64_t(kMaxIdle));
  at::Tensor block = at::empty({numel}, options);
  p.entries.push_back({block, p.clock});
  return block.view(shape);
}

at::Tensor pooled_zeros(at::IntArrayRef shape, const at::TensorOptions& options) {
  return pooled_empty(shape, options).zero_();
}

int64_t release_scratch_pool() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return drop_idle(p, -1);
}

int64_t scratch_pool_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  int64_t bytes = 0;
  for (const Entry& e : p.entries) bytes += int64_t(e.block.nbytes());
  return bytes;
}

void set_scratch_pool_enabled(bool enabled) {
  g_enabled.store(enabled);
  if (!enabled) release_scratch_pool();
}

bool scratch_pool_enabled() { return g_enabled.load(); }

}  // namespace srn
