#pragma once
// Counter-based randomness for views: every (seed, epoch, sample index, view) has its own
// stream, derived by hashing the four numbers. A view's random choices therefore do not depend
// on which thread made it, in which order, or on how many ranks share the epoch, so runs are
// reproducible bit for bit across worker counts and world sizes.
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace twins::augment {

/// splitmix64's finaliser: a bijective 64-bit mixer with good avalanche.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// A random stream; a plain value, cheap to create and copy.
class Rng {
 public:
  /// The stream of one view of one sample in one epoch.
  Rng(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t view)
      : key_(mix64(mix64(mix64(mix64(seed) ^ epoch) ^ index) ^ view)) {}
  explicit Rng(uint64_t key) : key_(mix64(key)) {}

  /// Next 64 random bits (splitmix64: the n-th output is mix64(key + n * golden gamma)).
  uint64_t next() { return mix64(key_ + (++counter_) * 0x9e3779b97f4a7c15ULL); }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  /// Uniform integer in [lo, hi] (inclusive); hi >= lo.
  int64_t integer(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    return lo + static_cast<int64_t>(next() % span);  // bias < span / 2^64: negligible
  }
  /// true with probability p.
  bool bernoulli(double p) { return uniform() < p; }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

/// A uniformly random permutation of 0 .. n-1 (Fisher-Yates, drawing from `rng`): the one
/// shuffle of twins (the loader's epochs, the linear probe's batches).
inline std::vector<int64_t> permutation(int64_t n, Rng rng) {
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = i;
  for (int64_t i = n - 1; i > 0; --i)
    std::swap(out[static_cast<size_t>(i)], out[static_cast<size_t>(rng.integer(0, i))]);
  return out;
}

}  // namespace twins::augment
