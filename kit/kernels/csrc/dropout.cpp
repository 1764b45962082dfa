// eqkit: element-wise dropout with a counter-based random stream (kit/kernels/dropout.py).
//
//   keep[i] = (fmix64(seed + i * 0x9E3779B97F4A7C15) >> 40) >= threshold,  threshold = ceil(p 2^24)
//   y[i] = keep[i] ? x[i] * scale : 0,  scale = 1 / (1 - p);   dx[i] = keep[i] ? dy[i] * scale : 0
//
// i is the element's index in the contiguous tensor and fmix64 MurmurHash3's 64-bit finaliser, so an element
// keeps its draw wherever a thread computes it, and the backward recomputes the mask from (seed, i) instead of
// reading one: one read and one write each way, vectorised (64-bit multiplies), no mask in memory. The seed is
// drawn from torch's generator by the caller. Not aten's bernoulli_ stream: other draws, the same distribution
// (P(keep) = 1 - threshold / 2^24, within 6e-8 of 1 - p).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>

namespace {

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

template <typename T>
void apply_range(const T* __restrict__ x, T* __restrict__ y, int64_t begin, int64_t end, uint64_t seed,
                 uint64_t threshold, T scale) {
  for (int64_t i = begin; i < end; ++i) {                 // vectorised: 64-bit lanes (AVX-512 vpmullq here)
    const uint64_t r = fmix64(seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ULL) >> 40;
    y[i] = r >= threshold ? x[i] * scale : T(0);
  }
}

template <typename T>
void apply(const T* x, T* y, int64_t n, uint64_t seed, uint64_t threshold, T scale) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    apply_range(x, y, begin, end, seed, threshold, scale);
  });
}

}  // namespace

torch::Tensor dropout_apply(torch::Tensor x, int64_t seed, double p) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "eqkit dropout: a contiguous CPU tensor expected");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "eqkit dropout: p must be in [0, 1), got ", p);
  auto y = torch::empty_like(x);
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(p * 16777216.0));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eqkit_dropout", [&] {
    apply<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel(), static_cast<uint64_t>(seed),
                    threshold, static_cast<scalar_t>(1.0 / (1.0 - p)));
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &dropout_apply, "x * keep(seed, index) / (1 - p): the forward, and the backward on the gradient");
}
