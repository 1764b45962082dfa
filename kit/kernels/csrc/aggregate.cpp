// eqkit: fused dynamic aggregation (E4-Net, Neural ePDO): per-pixel KxK kernels applied depthwise.
//
//   y[b, s, c, g, x] = sum_t k[b, s, g, t, x] * v[b, s, c, g, x + t]      ("same" zero padding)
//
// One task per (b, s, g) plane: its K*K kernel planes and the C channel planes of its slice, copied into
// row-padded buffers that stay in cache while every tap is applied, instead of 25 passes over whole tensors
// (the tap loop in kit/kernels/aggregate.py, kept as the reference). Forward and the two backward products,
// float32 and float64; any strides except a contiguous last (W) axis. Same summation order as the tap loop.
#include <torch/extension.h>
#include "simd.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace {

struct Geo {
  int64_t B, S, C, G, T, H, W, K, P;
  int64_t vb, vs, vc, vg, vh;      // strides of v / gv / y / gy (elements): (B, S, C, G, H, W)
  int64_t kb, ks, kg, kt, kh;      // strides of k / gk: (B, S, G, T, H, W)
};

Geo geometry(const torch::Tensor& v, const torch::Tensor& k) {
  TORCH_CHECK(v.dim() == 6 && k.dim() == 6, "eqkit aggregate: v (B,S,C,G,H,W) and k (B,S,G,T,H,W) expected");
  TORCH_CHECK(v.stride(5) == 1 && k.stride(5) == 1, "eqkit aggregate: the last axis must be contiguous");
  Geo g;
  g.B = v.size(0); g.S = v.size(1); g.C = v.size(2); g.G = v.size(3); g.H = v.size(4); g.W = v.size(5);
  g.T = k.size(3);
  g.K = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(g.T))));
  TORCH_CHECK(g.K * g.K == g.T && g.K % 2 == 1, "eqkit aggregate: T must be an odd square");
  g.P = g.K / 2;
  g.vb = v.stride(0); g.vs = v.stride(1); g.vc = v.stride(2); g.vg = v.stride(3); g.vh = v.stride(4);
  g.kb = k.stride(0); g.ks = k.stride(1); g.kg = k.stride(2); g.kt = k.stride(3); g.kh = k.stride(4);
  return g;
}

// Maps are held "row-padded" inside a task (as in epdo_stencils.cpp): a plane of H x W values at h Wp + w with
// Wp = W + 2P (columns w >= W zero), rounded up to whole chunks (L values); input planes zero-padded (value
// (h, w) at (h + P) Wp + (w + P)). Then tap t of output i reads padded index i + off[t], every tap is one
// contiguous loop, and the sum over the taps (forward) or the channels (kernel gradient) stays in registers,
// NV vectors of 64 bytes at a time (GCC vector extensions). Every output element still adds its terms in the
// tap-loop reference's order (taps ascending for y and gv, channels ascending for gk); an out-of-image tap adds
// k * 0 = +-0 where the reference adds nothing, which changes no value (bit for bit, up to the sign of a zero).
constexpr int NV = 4;
constexpr int64_t kChunkAlign = 64;       // a multiple of every chunk (64 floats, 32 doubles)

using eqkit::Vec;
using eqkit::lanes;
using eqkit::vload;
using eqkit::vstore;

struct Pad {
  int64_t Wp, L, PL;
  std::vector<int64_t> off;               // per tap: (t / K) Wp + t % K
};

Pad padding(const Geo& g) {
  Pad pd;
  pd.Wp = g.W + 2 * g.P;
  pd.L = (g.H * pd.Wp + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  pd.PL = (g.H + 2 * g.P) * pd.Wp + 2 * g.P + (pd.L - g.H * pd.Wp);
  for (int64_t t = 0; t < g.T; ++t) pd.off.push_back((t / g.K) * pd.Wp + t % g.K);
  return pd;
}

template <typename scalar_t>
void load_plane(const Geo& g, const Pad& pd, const scalar_t* src, int64_t row_stride, scalar_t* dst, int64_t at) {
  for (int64_t h = 0; h < g.H; ++h) std::copy(src + h * row_stride, src + h * row_stride + g.W, dst + at + h * pd.Wp);
}

template <typename scalar_t>
void forward_impl(const Geo& g, const scalar_t* v, const scalar_t* k, scalar_t* y, int64_t yh) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  const Pad pd = padding(g);
  at::parallel_for(0, g.B * g.S * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> kbuf(g.T * pd.L, 0), vpad(g.C * pd.PL, 0), out(pd.L, 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t gg = p % g.G, s = (p / g.G) % g.S, b = p / (g.G * g.S);
      const scalar_t* kp = k + b * g.kb + s * g.ks + gg * g.kg;
      const scalar_t* v0 = v + b * g.vb + s * g.vs + gg * g.vg;
      scalar_t* y0 = y + ((((b * g.S + s) * g.C) * g.G + gg) * g.H) * yh;
      const int64_t ycs = g.G * g.H * yh;                  // channel stride of y (contiguous)
      for (int64_t t = 0; t < g.T; ++t) load_plane(g, pd, kp + t * g.kt, g.kh, kbuf.data(), t * pd.L);
      for (int64_t c = 0; c < g.C; ++c) load_plane(g, pd, v0 + c * g.vc, g.vh, vpad.data(), c * pd.PL + g.P * pd.Wp + g.P);
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* vc = vpad.data() + c * pd.PL;
        for (int64_t x0 = 0; x0 < pd.L; x0 += NV * VL) {
          vec acc[NV];
          for (int u = 0; u < NV; ++u) acc[u] = vec{};
          for (int64_t t = 0; t < g.T; ++t) {
            const scalar_t* kt = kbuf.data() + t * pd.L + x0;
            const scalar_t* vt = vc + pd.off[t] + x0;
            for (int u = 0; u < NV; ++u) acc[u] += vload(kt + u * VL) * vload(vt + u * VL);
          }
          for (int u = 0; u < NV; ++u) vstore(out.data() + x0 + u * VL, acc[u]);
        }
        scalar_t* yc = y0 + c * ycs;
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) yc[h * yh + w] += out[h * pd.Wp + w];
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Geo& g, const scalar_t* v, const scalar_t* k, const scalar_t* gy, int64_t gyh,
                   scalar_t* gv, scalar_t* gk) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  const Pad pd = padding(g);
  at::parallel_for(0, g.B * g.S * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> kbuf(g.T * pd.L, 0), vpad(g.C * pd.PL, 0), gyp(g.C * pd.L, 0), gvpad(g.C * pd.PL, 0),
        dk(pd.L, 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t gg = p % g.G, s = (p / g.G) % g.S, b = p / (g.G * g.S);
      const scalar_t* kp = k + b * g.kb + s * g.ks + gg * g.kg;
      scalar_t* gkp = gk ? gk + b * g.kb + s * g.ks + gg * g.kg : nullptr;
      const scalar_t* v0 = v + b * g.vb + s * g.vs + gg * g.vg;
      const int64_t base = ((((b * g.S + s) * g.C) * g.G + gg) * g.H);
      const scalar_t* gy0 = gy + base * gyh;
      scalar_t* gv0 = gv ? gv + base * g.W : nullptr;
      const int64_t gycs = g.G * g.H * gyh, gvcs = g.G * g.H * g.W;   // channel strides (contiguous)
      if (gv0) {
        for (int64_t t = 0; t < g.T; ++t) load_plane(g, pd, kp + t * g.kt, g.kh, kbuf.data(), t * pd.L);
        std::fill(gvpad.begin(), gvpad.end(), scalar_t(0));
      }
      if (gkp)
        for (int64_t c = 0; c < g.C; ++c)
          load_plane(g, pd, v0 + c * g.vc, g.vh, vpad.data(), c * pd.PL + g.P * pd.Wp + g.P);
      for (int64_t c = 0; c < g.C; ++c) load_plane(g, pd, gy0 + c * gycs, gyh, gyp.data(), c * pd.L);
      for (int64_t t = 0; t < g.T; ++t) {
        const int64_t off = pd.off[t];
        for (int64_t x0 = 0; x0 < pd.L; x0 += NV * VL) {
          vec kv[NV], d[NV];
          if (gv0)
            for (int u = 0; u < NV; ++u) kv[u] = vload(kbuf.data() + t * pd.L + x0 + u * VL);
          for (int u = 0; u < NV; ++u) d[u] = vec{};
          for (int64_t c = 0; c < g.C; ++c) {
            const scalar_t* q = gyp.data() + c * pd.L + x0;
            if (gkp) {                        // grad_k_t(x) = sum over the slice's channels of gy(x) v(x + t)
              const scalar_t* vt = vpad.data() + c * pd.PL + off + x0;
              for (int u = 0; u < NV; ++u) d[u] += vload(q + u * VL) * vload(vt + u * VL);
            }
            if (gv0) {                        // grad_v(x + t) += k_t(x) gy(x)
              scalar_t* gt = gvpad.data() + c * pd.PL + off + x0;
              for (int u = 0; u < NV; ++u) vstore(gt + u * VL, vload(gt + u * VL) + kv[u] * vload(q + u * VL));
            }
          }
          if (gkp)
            for (int u = 0; u < NV; ++u) vstore(dk.data() + x0 + u * VL, d[u]);
        }
        if (gkp) {
          scalar_t* gkt = gkp + t * g.kt;
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) gkt[h * g.kh + w] += dk[h * pd.Wp + w];
        }
      }
      if (gv0)
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* src = gvpad.data() + c * pd.PL + g.P * pd.Wp + g.P;
          scalar_t* dst = gv0 + c * gvcs;
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) dst[h * g.W + w] += src[h * pd.Wp + w];
        }
    }
  });
}

}  // namespace

torch::Tensor aggregate_forward(torch::Tensor v, torch::Tensor k) {
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "eqkit aggregate: v and k dtypes differ");
  TORCH_CHECK(v.device().is_cpu() && k.device().is_cpu(), "eqkit aggregate: CPU tensors only");
  Geo g = geometry(v, k);
  auto y = torch::zeros({g.B, g.S, g.C, g.G, g.H, g.W}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_aggregate_forward", [&] {
    forward_impl<scalar_t>(g, v.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g.W);
  });
  return y;
}

std::vector<torch::Tensor> aggregate_backward(torch::Tensor v, torch::Tensor k, torch::Tensor gy, bool need_v,
                                              bool need_k) {
  Geo g = geometry(v, k);
  gy = gy.contiguous();
  torch::Tensor gv, gk;
  if (need_v) gv = torch::zeros({g.B, g.S, g.C, g.G, g.H, g.W}, v.options());
  if (need_k) gk = torch::zeros_like(k);           // the kernels' own layout (strides preserved)
  TORCH_CHECK(!need_k || (gk.strides() == k.strides()), "eqkit aggregate: kernel layout not preserved");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_aggregate_backward", [&] {
    backward_impl<scalar_t>(g, v.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), g.W,
                            need_v ? gv.data_ptr<scalar_t>() : nullptr, need_k ? gk.data_ptr<scalar_t>() : nullptr);
  });
  return {gv, gk};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &aggregate_forward, "fused dynamic aggregation (forward)");
  m.def("backward", &aggregate_backward, "fused dynamic aggregation (backward)");
}
