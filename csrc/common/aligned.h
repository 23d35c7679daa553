// std::vector storage on 64-byte (cache-line) boundaries, for the CPU scratch that AMX tiles and AVX-512 rows read
// and write: the tile loops' workspaces, the march's per-thread buffers, packed GEMM operands. malloc's 16-byte
// alignment put every 64-byte row access across two cache lines; an AMX [128, 256] x [256, 256] bf16 GEMM took
// 21.3 us with A and C 16 bytes past a line and 12.3 us on line boundaries (one core of the AMX Xeon).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <emmintrin.h>
#endif

namespace srn {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

// n rounded up so that consecutive blocks of n elements of T each start on a cache line.
template <typename T>
constexpr long long line_multiple(long long n) {
  constexpr long long per = kCacheLine / sizeof(T) > 0 ? kCacheLine / sizeof(T) : 1;
  return (n + per - 1) / per * per;
}

inline bool is_line_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kCacheLine == 0; }

// The addresses of the first and the last cache line that [p, p + bytes) touches (bytes > 0).
struct LineRange {
  std::uintptr_t first, last;
};
inline LineRange line_range(const void* p, std::int64_t bytes) {
  const std::uintptr_t mask = ~std::uintptr_t(kCacheLine - 1), start = reinterpret_cast<std::uintptr_t>(p);
  return {start & mask, (start + std::uintptr_t(bytes) - 1) & mask};
}

// Ask for the cache lines of [p, p + bytes) ahead of their use (a hint: no fault, no effect on results). The tile
// loops' backward reads the forward's saved rows from memory once each, row after row; the hardware prefetcher left
// ~45% of an AVX-512 LayerNorm VJP row waiting on them (one thread, 128 rows of 256 bf16 xhat: 40 kcycles cold, 23 hot,
// 25 with the rows 4 to 8 ahead asked for).
// Every line the span touches, the first and last included where p is not on a line boundary. for_write: lines
// about to be written (PREFETCHW: fetched for ownership at once, not read shared and then upgraded).
inline void prefetch_span(const void* p, std::int64_t bytes, bool for_write = false) {
#if defined(__GNUC__) || defined(__clang__)
  if (bytes <= 0) return;
  const LineRange lr = line_range(p, bytes);
  for (std::uintptr_t line = lr.first; line <= lr.last; line += kCacheLine) {
    if (for_write) {
      __builtin_prefetch(reinterpret_cast<const void*>(line), 1);
    } else {
      __builtin_prefetch(reinterpret_cast<const void*>(line));
    }
  }
#else
  (void)for_write;
  (void)p, (void)bytes;
#endif
}

// memcpy with non-temporal stores where dst and src are 16-byte aligned and bytes a multiple of 16 (x86-64), else
// memcpy: for rows written now and read back much later (the march's saved LSTM state), which a plain store first
// reads from memory.
inline void stream_copy(void* dst, const void* src, std::int64_t bytes) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (bytes > 0 && (reinterpret_cast<std::uintptr_t>(dst) | reinterpret_cast<std::uintptr_t>(src) |
                    std::uintptr_t(bytes)) % 16 == 0) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* q = static_cast<const __m128i*>(src);
    for (std::int64_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_load_si128(q + i));
    _mm_sfence();
    return;
  }
#endif
  if (bytes > 0) std::memcpy(dst, src, std::size_t(bytes));
}

// Lines to bring into L2 a few at a time while a compute-bound loop (a bf16 GEMM) leaves the memory bus idle: what
// a later memory-bound pass will read (in the tile loops' backward, the next layer's saved rows). The loop calls
// pace(n) once with its number of steps, then step() once a step; whatever is left after them is simply not asked
// for (a hint: no fault, no effect on results). Up to kSpans spans, in order.
class Trickle {
 public:
  static constexpr int kSpans = 8;
  void add(const void* p, std::int64_t bytes) {
    if (!p || bytes <= 0 || n_ == kSpans) return;
    spans_[n_++] = line_range(p, bytes);
  }
  std::int64_t lines() const {
    std::int64_t n = 0;
    for (int i = cur_; i < n_; ++i) n += std::int64_t((spans_[i].last - spans_[i].first) / kCacheLine) + 1;
    return n;
  }
  void pace(std::int64_t steps) { per_ = steps > 0 ? (lines() + steps - 1) / steps : lines(); }
  void step() {
    for (std::int64_t k = 0; k < per_ && cur_ < n_; ++k) {
      LineRange& s = spans_[cur_];  // first: the next line to ask for
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(reinterpret_cast<const void*>(s.first), 0, 2);
#endif
      if (s.first == s.last) {
        ++cur_;
      } else {
        s.first += kCacheLine;
      }
    }
  }

 private:
  LineRange spans_[kSpans] = {};
  int n_ = 0, cur_ = 0;
  std::int64_t per_ = 0;
};

}  // namespace srn
