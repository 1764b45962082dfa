// eqkit: the one set of SIMD helpers of the fused C++ kernels (aggregate.cpp, epdo_stencils.cpp, isotypic.cpp):
// vectors of 64 bytes (16 floats / 8 doubles) as GCC vector extensions, with unaligned loads and stores.
// The compiler maps them onto the widest units -march=native offers (AVX-512 here; two AVX2 or four SSE halves
// elsewhere). Header only; a change here rebuilds no extension by itself (torch hashes the .cpp sources).
#pragma once
#include <cstdint>

namespace eqkit {

template <typename scalar_t>
struct Vec { typedef scalar_t type __attribute__((vector_size(64))); };

template <typename scalar_t>
constexpr int64_t lanes() { return 64 / sizeof(scalar_t); }

template <typename scalar_t>
inline typename Vec<scalar_t>::type vload(const scalar_t* p) {
  typename Vec<scalar_t>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
inline void vstore(scalar_t* p, typename Vec<scalar_t>::type v) { __builtin_memcpy(p, &v, sizeof(v)); }

}  // namespace eqkit
