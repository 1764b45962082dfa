// eqkit: the basis changes of the isotypic 1x1 maps (kit/kernels/isotypic.py), each fused with its layout change.
//
//   to_slots:   t[s, c, k, i, b, p] = sum_e Q[s Cc + i, e] x[b, c, e, k, p]      x (B, C, d, K, P) -> t (S, C, K, Cc, B, P)
//   from_slots: x[b, c, e, k, p]    = sum_{s, i} Q[s Cc + i, e] t[s, c, k, i, b, p]                     (the adjoint)
//
// The plain-PyTorch path (a batched matmul, then a permuted copy) passes over the tensor four times and
// allocates twice; here each output value is written once, from a chunk of its input that stays in L1.
// Vectors of 64 bytes (GCC vector extensions), eight output rows at a time (eight independent sums); the tail of
// a row (P not a multiple of the vector) as scalars. float32 / float64. Tested against the PyTorch path.
#include <torch/extension.h>
#include "simd.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace {

using eqkit::Vec;
using eqkit::lanes;
using eqkit::vload;
using eqkit::vstore;

// out[r][0:P) = sum_e W[r][e] in[e][0:P) for rows r0 .. r0 + NR - 1 (NR independent sums in registers, each input
// vector loaded once for all of them); row r of out starts at out_ptr[r], row e of in at in_ptr[e] (every row
// contiguous); W (M, E) row-major. The tail of a row (P not a multiple of the vector) as scalars.
template <typename scalar_t, int NR>
inline void rows_block(const std::vector<const scalar_t*>& in_ptr, const std::vector<scalar_t*>& out_ptr,
                       const scalar_t* W, int64_t r0, int64_t E, int64_t P) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  const scalar_t* w0 = W + r0 * E;
  int64_t p0 = 0;
  for (; p0 + VL <= P; p0 += VL) {
    vec acc[NR];
    for (int u = 0; u < NR; ++u) acc[u] = vec{};
    for (int64_t e = 0; e < E; ++e) {
      const vec xv = vload(in_ptr[e] + p0);
      for (int u = 0; u < NR; ++u) acc[u] += w0[u * E + e] * xv;
    }
    for (int u = 0; u < NR; ++u) vstore(out_ptr[r0 + u] + p0, acc[u]);
  }
  for (; p0 < P; ++p0)
    for (int u = 0; u < NR; ++u) {
      scalar_t acc = 0;
      for (int64_t e = 0; e < E; ++e) acc += w0[u * E + e] * in_ptr[e][p0];
      out_ptr[r0 + u][p0] = acc;
    }
}

// all M rows: blocks of 8, then 4, then single rows
template <typename scalar_t>
void small_matmul(const std::vector<const scalar_t*>& in_ptr, const std::vector<scalar_t*>& out_ptr,
                  const scalar_t* W, int64_t M, int64_t E, int64_t P) {
  int64_t r = 0;
  for (; r + 8 <= M; r += 8) rows_block<scalar_t, 8>(in_ptr, out_ptr, W, r, E, P);
  for (; r + 4 <= M; r += 4) rows_block<scalar_t, 4>(in_ptr, out_ptr, W, r, E, P);
  for (; r < M; ++r) rows_block<scalar_t, 1>(in_ptr, out_ptr, W, r, E, P);
}

struct Dims { int64_t B, C, D, K, P, S, Cc; };

// to_slots: rows e of x[b, c, :, k, :] -> rows (s, i) of t[:, c, k, :, b, :]
template <typename scalar_t>
void to_slots_impl(const Dims& n, const scalar_t* x, const scalar_t* Q, scalar_t* t) {
  const int64_t M = n.S * n.Cc;
  at::parallel_for(0, n.B * n.C * n.K, 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(n.D);
    std::vector<scalar_t*> out(M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task % n.K, c = (task / n.K) % n.C, b = task / (n.K * n.C);
      for (int64_t e = 0; e < n.D; ++e) in[e] = x + (((b * n.C + c) * n.D + e) * n.K + k) * n.P;
      for (int64_t s = 0; s < n.S; ++s)
        for (int64_t i = 0; i < n.Cc; ++i)
          out[s * n.Cc + i] = t + ((((s * n.C + c) * n.K + k) * n.Cc + i) * n.B + b) * n.P;
      small_matmul(in, out, Q, M, n.D, n.P);
    }
  });
}

// from_slots: rows (s, i) of t[:, c, k, :, b, :] -> rows e of x[b, c, :, k, :], with Qt = Q^T (D, M)
template <typename scalar_t>
void from_slots_impl(const Dims& n, const scalar_t* t, const scalar_t* Qt, scalar_t* x) {
  const int64_t M = n.S * n.Cc;
  at::parallel_for(0, n.B * n.C * n.K, 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(M);
    std::vector<scalar_t*> out(n.D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task % n.K, c = (task / n.K) % n.C, b = task / (n.K * n.C);
      for (int64_t s = 0; s < n.S; ++s)
        for (int64_t i = 0; i < n.Cc; ++i)
          in[s * n.Cc + i] = t + ((((s * n.C + c) * n.K + k) * n.Cc + i) * n.B + b) * n.P;
      for (int64_t e = 0; e < n.D; ++e) out[e] = x + (((b * n.C + c) * n.D + e) * n.K + k) * n.P;
      small_matmul(in, out, Qt, n.D, M, n.P);
    }
  });
}

}  // namespace

// x (B, C, d, K, P), Q (S, Cc, d) -> t (S, C, K, Cc, B, P)
torch::Tensor to_slots(torch::Tensor x, torch::Tensor Q) {
  TORCH_CHECK(x.dim() == 5 && Q.dim() == 3 && Q.size(2) == x.size(2), "eqkit isotypic: x (B,C,d,K,P), Q (S,Cc,d)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == Q.scalar_type(), "eqkit isotypic: CPU, one dtype");
  x = x.contiguous();
  Q = Q.contiguous();
  Dims n{x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), Q.size(0), Q.size(1)};
  auto t = torch::empty({n.S, n.C, n.K, n.Cc, n.B, n.P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eqkit_to_slots", [&] {
    to_slots_impl<scalar_t>(n, x.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), t.data_ptr<scalar_t>());
  });
  return t;
}

// t (S, C, K, Cc, B, P), Q (S, Cc, d) -> x (B, C, d, K, P)
torch::Tensor from_slots(torch::Tensor t, torch::Tensor Q) {
  TORCH_CHECK(t.dim() == 6 && Q.dim() == 3 && Q.size(0) == t.size(0) && Q.size(1) == t.size(3),
              "eqkit isotypic: t (S,C,K,Cc,B,P), Q (S,Cc,d)");
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == Q.scalar_type(), "eqkit isotypic: CPU, one dtype");
  t = t.contiguous();
  auto Qt = Q.reshape({Q.size(0) * Q.size(1), Q.size(2)}).t().contiguous();          // (d, S Cc)
  Dims n{t.size(4), t.size(1), Q.size(2), t.size(2), t.size(5), t.size(0), t.size(3)};
  auto x = torch::empty({n.B, n.C, n.D, n.K, n.P}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "eqkit_from_slots", [&] {
    from_slots_impl<scalar_t>(n, t.data_ptr<scalar_t>(), Qt.data_ptr<scalar_t>(), x.data_ptr<scalar_t>());
  });
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("to_slots", &to_slots, "isotypic basis change into the slot-major layout");
  m.def("from_slots", &from_slots, "isotypic basis change back from the slot-major layout (adjoint)");
}
