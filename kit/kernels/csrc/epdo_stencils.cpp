// eqkit: the fused per-pixel PDO of a Neural ePDO layer (He et al., ICLR 2023), forward and backward.
//
// For every image b, generated field j (of g), component c (of d) and pixel x the layer builds the 5x5
// stencil k[t] = sum_a S[a, t] coef[b, j, c, a, x] of its order-<=4 operator, normalises it by the L1 norm
// of the field's d x 25 stencil entries, and filters field p g + j of every partition p with it:
//
//   n[b, j, x]       = sum_{c, t} |k[b, j, c, t, x]| + eps
//   y[b, p, j, c, x] = sum_t k[b, j, c, t, x] v[b, p, j, c, x + t] / n[b, j, x]          ("same" zero padding)
//
// What the plain-PyTorch path (kit/kernels/pdo_filter.py, kept as the reference in tests) materialises,
// the stencils k (25/15 times the coefficients), their L1 norm and its sign for the backward, stays here
// in per-task buffers of 25 x H (W + 4) values: one task per (b, j) reads its coefficients and its
// partitions' planes once. Maps are held row-padded, so that each tap is one contiguous loop (see the
// layouts below). S is applied through its non-zero entries only (70 of 375 for the fd stencils, 318 for
// the Gaussian ones). S may also be one bank per component, (d, A, T): component c then builds its stencils
// with S[c] (the layer's generator in the untwisted frame, kit/layers/epdo.py, passes the rotated banks
// S_h = D(h)^T S). float32 / float64; gradients equal the reference's to float64 round-off (tested).
//
// Backward, with gyn = gy / n and R = sum_{p, c} gy y (per b, j, x):
//   dL/dk_t(x)      = sum_p gyn(x) v(x + t) - sign(k_t(x)) R(x) / n(x)
//   dL/dcoef_a(x)   = sum_t S[a, t] dL/dk_t(x)             (after every tap's dL/dk_t, chunk by chunk)
//   dL/dv(x + t)   += k_t(x) gyn(x)
#include <torch/extension.h>
#include "simd.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunkAlign = 64;  // row-padded maps hold a multiple of this many values (see build_stencils)

struct Geo {
  int64_t B, P, J, D, H, W, A, T, K, R, HW;
  int64_t Wp, L, PL;   // padded row width W + 2R; row-padded map H Wp rounded up to kChunkAlign values;
                       // zero-padded plane (H + 2R) Wp + 2R plus the same rounding
};

struct Bank {                       // the non-zero entries of one stencil bank S (A x T), grouped by tap
  std::vector<int64_t> start;       // entries of taps[i]: [start[i], start[i + 1]) (empty where S[:, t] = 0)
  std::vector<int64_t> a;           // operator index of each entry
  std::vector<double> s;            // its value
  std::vector<int64_t> astart;      // the same entries by operator: those of a are [astart[a], astart[a + 1]) of
  std::vector<int64_t> atap;        // atap (tap index i into taps) and as (value), taps ascending
  std::vector<double> as;
};

struct Sparse {                     // one bank shared by every component, or one bank per component
  std::vector<int64_t> taps;        // the taps with a non-zero entry in some bank
  std::vector<int64_t> off;         // their offsets in the padded plane: (di + R) Wp + (dj + R)
  std::vector<Bank> banks;
  const Bank& bank(int64_t c) const { return banks[banks.size() == 1 ? 0 : c]; }
};

Geo geometry(const torch::Tensor& v, const torch::Tensor& coef, const torch::Tensor& S) {
  TORCH_CHECK(v.dim() == 6 && coef.dim() == 6 && (S.dim() == 2 || S.dim() == 3),
              "eqkit epdo: v (B,P,g,d,H,W), coef (B,g,d,A,H,W) and S (A,T) or (d,A,T) expected");
  TORCH_CHECK(v.is_contiguous() && coef.is_contiguous(), "eqkit epdo: contiguous v and coef expected");
  Geo g;
  g.B = v.size(0); g.P = v.size(1); g.J = v.size(2); g.D = v.size(3); g.H = v.size(4); g.W = v.size(5);
  g.A = S.size(-2); g.T = S.size(-1); g.HW = g.H * g.W;
  TORCH_CHECK(S.dim() == 2 || S.size(0) == g.D, "eqkit epdo: a bank per component needs S (d, A, T)");
  g.K = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(g.T))));
  TORCH_CHECK(g.K * g.K == g.T && g.K % 2 == 1, "eqkit epdo: T must be an odd square");
  g.R = g.K / 2;
  g.Wp = g.W + 2 * g.R;
  g.L = (g.H * g.Wp + kChunkAlign - 1) / kChunkAlign * kChunkAlign;   // whole chunks (the tail stays zero)
  g.PL = (g.H + 2 * g.R) * g.Wp + 2 * g.R + (g.L - g.H * g.Wp);
  TORCH_CHECK(coef.size(0) == g.B && coef.size(1) == g.J && coef.size(2) == g.D && coef.size(3) == g.A &&
              coef.size(4) == g.H && coef.size(5) == g.W, "eqkit epdo: coef shape does not match v and S");
  return g;
}

Sparse sparse_of(const torch::Tensor& S, const Geo& g) {
  auto Sd = S.to(torch::kDouble).contiguous();
  const double* p = Sd.data_ptr<double>();
  const int64_t nb = S.dim() == 3 ? S.size(0) : 1;
  Sparse sp;
  for (int64_t t = 0; t < g.T; ++t) {
    bool any = false;
    for (int64_t e = 0; e < nb * g.A; ++e) any = any || p[e * g.T + t] != 0.0;
    if (any) {
      sp.taps.push_back(t);
      sp.off.push_back((t / g.K) * g.Wp + (t % g.K));
    }
  }
  for (int64_t c = 0; c < nb; ++c) {
    const double* q = p + c * g.A * g.T;
    Bank bk;
    for (int64_t t : sp.taps) {
      bk.start.push_back(static_cast<int64_t>(bk.a.size()));
      for (int64_t a = 0; a < g.A; ++a)
        if (q[a * g.T + t] != 0.0) { bk.a.push_back(a); bk.s.push_back(q[a * g.T + t]); }
    }
    bk.start.push_back(static_cast<int64_t>(bk.a.size()));
    for (int64_t a = 0; a < g.A; ++a) {
      bk.astart.push_back(static_cast<int64_t>(bk.atap.size()));
      for (size_t i = 0; i < sp.taps.size(); ++i)
        for (int64_t e = bk.start[i]; e < bk.start[i + 1]; ++e)
          if (bk.a[e] == a) { bk.atap.push_back(static_cast<int64_t>(i)); bk.as.push_back(bk.s[e]); }
    }
    bk.astart.push_back(static_cast<int64_t>(bk.atap.size()));
    sp.banks.push_back(std::move(bk));
  }
  return sp;
}

// Layouts inside a task. A map of H x W values is held "row-padded": L = H Wp values, value (h, w) at
// h Wp + w, columns w >= W zero. An input plane is held zero-padded: PL values, value (h, w) at
// (h + R) Wp + (w + R). Then tap t of output i = h Wp + w reads padded index i + off[t], and every tap
// is one contiguous, vectorisable loop over the L values (no per-row bounds).
template <typename scalar_t>
void to_rows(const Geo& g, const scalar_t* src, scalar_t* dst) {            // (H, W) -> row-padded
  for (int64_t h = 0; h < g.H; ++h) std::copy(src + h * g.W, src + (h + 1) * g.W, dst + h * g.Wp);
}
template <typename scalar_t>
void from_rows(const Geo& g, const scalar_t* src, scalar_t* dst) {          // row-padded -> (H, W)
  for (int64_t h = 0; h < g.H; ++h) std::copy(src + h * g.Wp, src + h * g.Wp + g.W, dst + h * g.W);
}
template <typename scalar_t>
void to_padded(const Geo& g, const scalar_t* src, scalar_t* dst) {          // (H, W) -> zero-padded
  for (int64_t h = 0; h < g.H; ++h)
    std::copy(src + h * g.W, src + (h + 1) * g.W, dst + (h + g.R) * g.Wp + g.R);
}
template <typename scalar_t>
void from_padded(const Geo& g, const scalar_t* src, scalar_t* dst) {        // zero-padded interior -> (H, W)
  for (int64_t h = 0; h < g.H; ++h)
    std::copy(src + (h + g.R) * g.Wp + g.R, src + (h + g.R) * g.Wp + g.R + g.W, dst + h * g.W);
}

// Pixel chunks: the stencil build (k = S^T c) and the coefficient gradient (dc = S dk) are small dense
// products per pixel. Run chunk by chunk (CHUNK values of every operand stay in L1 while all taps / all
// operators are summed in a local accumulator, written once) rather than one pass over the map per non-zero
// entry of S, which re-reads and re-writes a 25 x L buffer from L2 (318 passes for the Gaussian stencils).
// Same terms, same order per output value as the per-entry passes.
// NV vectors of 64 bytes (16 floats / 8 doubles) per chunk, held in registers (GCC vector extensions);
// kChunkAlign is a multiple of every chunk (64 floats, 32 doubles), so maps hold whole chunks.
constexpr int NV = 4;
using eqkit::Vec;
using eqkit::lanes;
using eqkit::vload;
using eqkit::vstore;

// out[r][x0 + x] = sum_e val[e] in[idx[e]][x0 + x] over the entries [e0, e1) (in the given order), for
// x < lanes * NV: one row of the products k = S^T c (rows taps) or dc = S dk (rows operators)
template <typename scalar_t>
inline void combine_chunk(const int64_t* idx, const double* val, int64_t e0, int64_t e1, const scalar_t* in,
                          int64_t L, int64_t x0, scalar_t* out) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  vec acc[NV];
  if (e0 == e1) {
    for (int u = 0; u < NV; ++u) acc[u] = vec{} ;
  } else {
    const scalar_t s = static_cast<scalar_t>(val[e0]);
    const scalar_t* p = in + idx[e0] * L + x0;
    for (int u = 0; u < NV; ++u) acc[u] = s * vload(p + u * VL);
    for (int64_t e = e0 + 1; e < e1; ++e) {
      const scalar_t s2 = static_cast<scalar_t>(val[e]);
      const scalar_t* q = in + idx[e] * L + x0;
      for (int u = 0; u < NV; ++u) acc[u] += s2 * vload(q + u * VL);
    }
  }
  for (int u = 0; u < NV; ++u) vstore(out + x0 + u * VL, acc[u]);
}
// the active taps' stencils of one (b, j, c), row-padded: kbuf (T, L) from the row-padded coefficients
template <typename scalar_t>
void build_stencils(const Geo& g, const Sparse& sp, const Bank& bk, const scalar_t* cpad, scalar_t* kbuf) {
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * lanes<scalar_t>())        // g.L: whole chunks
    for (size_t i = 0; i < sp.taps.size(); ++i)
      combine_chunk(bk.a.data(), bk.s.data(), bk.start[i], bk.start[i + 1], cpad, g.L, x0, kbuf + sp.taps[i] * g.L);
}

// dcoef_a = sum_t S[a, t] dk_t for every operator, row-padded: gcpad (A, L) from dkbuf (taps, L)
template <typename scalar_t>
void coefficient_gradient(const Geo& g, const Bank& bk, const scalar_t* dkbuf, scalar_t* gcpad) {
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * lanes<scalar_t>())
    for (int64_t a = 0; a < g.A; ++a)
      combine_chunk(bk.atap.data(), bk.as.data(), bk.astart[a], bk.astart[a + 1], dkbuf, g.L, x0, gcpad + a * g.L);
}

// y = sum_t k_t v(x + t) of one partition plane (row-padded out), chunk by chunk: the sum over the taps stays
// in registers (same order as a tap-by-tap accumulation: from zero, taps ascending)
template <typename scalar_t>
void filter_taps(const Geo& g, const Sparse& sp, const scalar_t* kbuf, const scalar_t* vpad, scalar_t* out) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * VL) {
    vec acc[NV];
    for (int u = 0; u < NV; ++u) acc[u] = vec{};
    for (size_t i = 0; i < sp.taps.size(); ++i) {
      const scalar_t* kt = kbuf + sp.taps[i] * g.L + x0;
      const scalar_t* vt = vpad + sp.off[i] + x0;
      for (int u = 0; u < NV; ++u) acc[u] += vload(kt + u * VL) * vload(vt + u * VL);
    }
    for (int u = 0; u < NV; ++u) vstore(out + x0 + u * VL, acc[u]);
  }
}

// per tap t, chunk by chunk: dk_t = -sign(k_t) R / n + sum_p gyn v(x + t) (into dkbuf, the sum over the
// partitions in registers) and dv(x + t) += k_t(x) gyn(x) (into gvpad), the tap's k chunk loaded once
template <typename scalar_t, bool GC, bool GV>
void backward_taps(const Geo& g, const Sparse& sp, const scalar_t* kbuf, const scalar_t* rnp, const scalar_t* gyn,
                   const scalar_t* vpad, scalar_t* gvpad, scalar_t* dkbuf) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  for (size_t i = 0; i < sp.taps.size(); ++i) {
    const int64_t off = sp.off[i];
    for (int64_t x0 = 0; x0 < g.L; x0 += NV * VL) {
      vec k[NV], d[NV];
      for (int u = 0; u < NV; ++u) k[u] = vload(kbuf + sp.taps[i] * g.L + x0 + u * VL);
      if constexpr (GC)
        for (int u = 0; u < NV; ++u)       // (k < 0) - (k > 0), with vector masks (true = -1)
          d[u] = (__builtin_convertvector(k[u] > 0, vec) - __builtin_convertvector(k[u] < 0, vec))
                 * vload(rnp + x0 + u * VL);
      for (int64_t p = 0; p < g.P; ++p) {
        const scalar_t* q = gyn + p * g.L + x0;
        if constexpr (GC) {
          const scalar_t* vt = vpad + p * g.PL + off + x0;
          for (int u = 0; u < NV; ++u) d[u] += vload(q + u * VL) * vload(vt + u * VL);
        }
        if constexpr (GV) {
          scalar_t* gt = gvpad + p * g.PL + off + x0;
          for (int u = 0; u < NV; ++u) vstore(gt + u * VL, vload(gt + u * VL) + k[u] * vload(q + u * VL));
        }
      }
      if constexpr (GC)
        for (int u = 0; u < NV; ++u) vstore(dkbuf + i * g.L + x0 + u * VL, d[u]);
    }
  }
}

template <typename scalar_t>
void load_coefficients(const Geo& g, const scalar_t* cf, scalar_t* cpad) {   // (A, H, W) -> (A, L)
  for (int64_t a = 0; a < g.A; ++a) to_rows(g, cf + a * g.HW, cpad + a * g.L);
}

template <typename scalar_t>
void forward_impl(const Geo& g, const Sparse& sp, const scalar_t* v, const scalar_t* coef, double eps,
                  scalar_t* y, scalar_t* norm) {
  at::parallel_for(0, g.B * g.J, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> kbuf(g.T * g.L, 0), cpad(g.A * g.L, 0), vpad(g.PL, 0), acc(g.L), nrm(g.L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.J, j = task % g.J;
      std::fill(nrm.begin(), nrm.end(), scalar_t(0));
      for (int64_t c = 0; c < g.D; ++c) {
        load_coefficients(g, coef + ((task * g.D + c) * g.A) * g.HW, cpad.data());
        build_stencils(g, sp, sp.bank(c), cpad.data(), kbuf.data());
        for (int64_t t : sp.taps) {
          const scalar_t* __restrict__ kt = kbuf.data() + t * g.L;
          scalar_t* __restrict__ n = nrm.data();
          for (int64_t x = 0; x < g.L; ++x) n[x] += std::abs(kt[x]);
        }
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t plane = (((b * g.P + p) * g.J + j) * g.D + c) * g.HW;
          to_padded(g, v + plane, vpad.data());
          filter_taps(g, sp, kbuf.data(), vpad.data(), acc.data());
          from_rows(g, acc.data(), y + plane);
        }
      }
      scalar_t* __restrict__ nout = norm + task * g.HW;                      // (B, g, H, W)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w = 0; w < g.W; ++w) nout[h * g.W + w] = nrm[h * g.Wp + w] + static_cast<scalar_t>(eps);
      for (int64_t p = 0; p < g.P; ++p)
        for (int64_t c = 0; c < g.D; ++c) {
          scalar_t* __restrict__ yp = y + (((b * g.P + p) * g.J + j) * g.D + c) * g.HW;
          for (int64_t x = 0; x < g.HW; ++x) yp[x] /= nout[x];
        }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Geo& g, const Sparse& sp, const scalar_t* v, const scalar_t* coef,
                   const scalar_t* norm, const scalar_t* y, const scalar_t* gy, scalar_t* gv, scalar_t* gc) {
  at::parallel_for(0, g.B * g.J, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> kbuf(g.T * g.L, 0), cpad(g.A * g.L, 0), gcpad(g.A * g.L, 0),
        dkbuf(sp.taps.size() * g.L, 0);
    std::vector<scalar_t> vpad(g.P * g.PL, 0), gvpad(g.P * g.PL, 0), gyn(g.P * g.L, 0), rn(g.HW), rnp(g.L, 0),
        ninv(g.HW);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / g.J, j = task % g.J;
      const scalar_t* __restrict__ nrm = norm + task * g.HW;
      for (int64_t x = 0; x < g.HW; ++x) ninv[x] = scalar_t(1) / nrm[x];
      if (gc) {                                  // rn = R / n = sum_{p, c} gy y / n
        std::fill(rn.begin(), rn.end(), scalar_t(0));
        for (int64_t p = 0; p < g.P; ++p)
          for (int64_t c = 0; c < g.D; ++c) {
            const int64_t plane = (((b * g.P + p) * g.J + j) * g.D + c) * g.HW;
            const scalar_t* __restrict__ gr = gy + plane;
            const scalar_t* __restrict__ yr = y + plane;
            for (int64_t x = 0; x < g.HW; ++x) rn[x] += gr[x] * yr[x];
          }
        for (int64_t x = 0; x < g.HW; ++x) rn[x] *= ninv[x];
        to_rows(g, rn.data(), rnp.data());
      }
      for (int64_t c = 0; c < g.D; ++c) {
        load_coefficients(g, coef + ((task * g.D + c) * g.A) * g.HW, cpad.data());
        build_stencils(g, sp, sp.bank(c), cpad.data(), kbuf.data());
        for (int64_t p = 0; p < g.P; ++p) {      // gyn = gy / n (row-padded), the planes of v (zero-padded)
          const int64_t plane = (((b * g.P + p) * g.J + j) * g.D + c) * g.HW;
          scalar_t* __restrict__ q = gyn.data() + p * g.L;
          const scalar_t* __restrict__ gr = gy + plane;
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) q[h * g.Wp + w] = gr[h * g.W + w] * ninv[h * g.W + w];
          if (gc) to_padded(g, v + plane, vpad.data() + p * g.PL);
        }
        if (gv) std::fill(gvpad.begin(), gvpad.end(), scalar_t(0));
        if (gc && gv) backward_taps<scalar_t, true, true>(g, sp, kbuf.data(), rnp.data(), gyn.data(), vpad.data(),
                                                          gvpad.data(), dkbuf.data());
        else if (gc) backward_taps<scalar_t, true, false>(g, sp, kbuf.data(), rnp.data(), gyn.data(), vpad.data(),
                                                          gvpad.data(), dkbuf.data());
        else backward_taps<scalar_t, false, true>(g, sp, kbuf.data(), rnp.data(), gyn.data(), vpad.data(),
                                                  gvpad.data(), dkbuf.data());
        if (gc) {                                  // dcoef_a = sum_t S[a, t] dk_t
          coefficient_gradient(g, sp.bank(c), dkbuf.data(), gcpad.data());
          for (int64_t a = 0; a < g.A; ++a)
            from_rows(g, gcpad.data() + a * g.L, gc + ((task * g.D + c) * g.A + a) * g.HW);
        }
        if (gv)
          for (int64_t p = 0; p < g.P; ++p)
            from_padded(g, gvpad.data() + p * g.PL, gv + (((b * g.P + p) * g.J + j) * g.D + c) * g.HW);
      }
    }
  });
}

void check_inputs(const torch::Tensor& v, const torch::Tensor& coef) {
  TORCH_CHECK(v.scalar_type() == coef.scalar_type(), "eqkit epdo: v and coef dtypes differ");
  TORCH_CHECK(v.device().is_cpu() && coef.device().is_cpu(), "eqkit epdo: CPU tensors only");
}

}  // namespace

void check_out(const torch::Tensor& out, const torch::Tensor& like, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == like.scalar_type() && out.sizes() == shape,
              "eqkit epdo: ", what, " must be a contiguous tensor of shape ", shape, " and the inputs' dtype");
}

void epdo_forward_out(torch::Tensor v, torch::Tensor coef, torch::Tensor S, double eps, torch::Tensor y,
                      torch::Tensor norm) {
  check_inputs(v, coef);
  Geo g = geometry(v, coef, S);
  Sparse sp = sparse_of(S, g);
  check_out(y, v, v.sizes(), "y");
  check_out(norm, v, {g.B, g.J, g.H, g.W}, "norm");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_epdo_forward", [&] {
    forward_impl<scalar_t>(g, sp, v.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(), eps, y.data_ptr<scalar_t>(),
                           norm.data_ptr<scalar_t>());
  });
}

// Writes the gradients into gv / gc where given (either may be None: not needed); every element written once.
void epdo_backward_out(torch::Tensor v, torch::Tensor coef, torch::Tensor S, torch::Tensor norm, torch::Tensor y,
                       torch::Tensor gy, c10::optional<torch::Tensor> gv, c10::optional<torch::Tensor> gc) {
  check_inputs(v, coef);
  Geo g = geometry(v, coef, S);
  Sparse sp = sparse_of(S, g);
  gy = gy.contiguous();
  y = y.contiguous();
  norm = norm.contiguous();
  if (gv) check_out(*gv, v, v.sizes(), "gv");
  if (gc) check_out(*gc, coef, coef.sizes(), "gc");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_epdo_backward", [&] {
    backward_impl<scalar_t>(g, sp, v.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(),
                            y.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
                            gv ? gv->data_ptr<scalar_t>() : nullptr, gc ? gc->data_ptr<scalar_t>() : nullptr);
  });
}

std::vector<torch::Tensor> epdo_forward(torch::Tensor v, torch::Tensor coef, torch::Tensor S, double eps) {
  auto y = torch::empty_like(v, at::MemoryFormat::Contiguous);
  auto norm = torch::empty({v.size(0), v.size(2), v.size(4), v.size(5)}, v.options());
  epdo_forward_out(v, coef, S, eps, y, norm);
  return {y, norm};
}

std::vector<torch::Tensor> epdo_backward(torch::Tensor v, torch::Tensor coef, torch::Tensor S, torch::Tensor norm,
                                         torch::Tensor y, torch::Tensor gy, bool need_v, bool need_coef) {
  torch::Tensor gv, gc;
  if (need_v) gv = torch::empty_like(v, at::MemoryFormat::Contiguous);
  if (need_coef) gc = torch::empty_like(coef, at::MemoryFormat::Contiguous);
  epdo_backward_out(v, coef, S, norm, y, gy, need_v ? c10::optional<torch::Tensor>(gv) : c10::nullopt,
                    need_coef ? c10::optional<torch::Tensor>(gc) : c10::nullopt);
  return {gv, gc};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &epdo_forward, "fused Neural ePDO stencils: build, L1-normalise, filter (forward)");
  m.def("backward", &epdo_backward, "fused Neural ePDO stencils (backward)");
  m.def("forward_out", &epdo_forward_out, "forward into given y (B,P,g,d,H,W) and norm (B,g,H,W)");
  m.def("backward_out", &epdo_backward_out, "backward into given gv / gc (either may be None)");
}
