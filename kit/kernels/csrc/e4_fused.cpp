// eqkit: E4's dynamic aggregation with its kernel generator fused in (He et al., "Efficient Equivariant
// Network", NeurIPS 2021):
//
//   k[b, s, g, t, x] = bias[g, t S + s] + sum_j w[g, t S + s, j] relu(z[b, j, g, x])   (the generator's last map)
//   y[b, s, c, g, x] = sum_t k[b, s, g, t, x] v[b, s, c, g, x + t]                     ("same" zero padding)
//
// One task per (image b, orientation g): that plane's hidden features (z, the generator's normalised hidden
// fields, with their ReLU applied here), all S K^2 kernel planes generated from them, the encoder's channel planes
// and (backward) the output gradient stay in one thread's buffers (a few hundred KB: L2) while every product is
// formed. The kernels never reach memory; the backward regenerates them. The backward gives the gradients of v,
// z (through the ReLU), w and bias; the steering of w stays autograd's (kit/kernels/aggregate.py). Reference:
// the kernels generated whole (torch.baddbmm) and the tap loop (tests, float64 to 1e-12). Built with fused
// multiply-adds (-ffp-contract=fast): it rounds unlike aten term by term.
//
// Not here: the generic aggregation with given kernels (aggregate.cpp), GPU tensors (the plain-PyTorch path).
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

constexpr int64_t kAlign = 64;   // L is a multiple of every vector chunk below (64 floats, 32 doubles)

// "Pad layout" of a plane: length PL = L + 2D, pixel (r, c) at D + r Wp + c with Wp = W + 2P, D = P Wp + P,
// zeros everywhere else (the zero padding, and the columns c >= W, are never written). Output i = r Wp + c then
// reads tap t at pad index i + off[t], every tap is one contiguous loop, and the sums stay in registers.
struct Geo {
  int64_t B, S, C, G, H, W, K, T, P, Ch, R, HW;
  int64_t Wp, L, D, PL;
  std::vector<int64_t> off;      // per tap: (t / K) Wp + t % K
};

Geo geometry(const torch::Tensor& v, const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& bias,
             int64_t K) {
  TORCH_CHECK(v.dim() == 6 && v.is_contiguous(), "eqkit e4: v must be a contiguous (B, S, C, G, H, W) tensor");
  TORCH_CHECK(h.dim() == 5 && w.dim() == 3 && bias.dim() == 3 && h.is_contiguous() && w.is_contiguous() &&
                  bias.is_contiguous(),
              "eqkit e4: z (B, Ch, G, H, W), w (G, K*K*S, Ch) and bias (G, K*K*S, 1) must be contiguous");
  TORCH_CHECK(h.scalar_type() == v.scalar_type() && w.scalar_type() == v.scalar_type() &&
                  bias.scalar_type() == v.scalar_type(), "eqkit e4: dtypes differ");
  TORCH_CHECK(v.device().is_cpu() && h.device().is_cpu() && w.device().is_cpu() && bias.device().is_cpu(),
              "eqkit e4: CPU tensors only");
  Geo g;
  g.B = v.size(0); g.S = v.size(1); g.C = v.size(2); g.G = v.size(3); g.H = v.size(4); g.W = v.size(5);
  g.K = K; g.T = K * K; g.P = K / 2; g.Ch = h.size(1); g.R = w.size(1); g.HW = g.H * g.W;
  TORCH_CHECK(K >= 1 && K % 2 == 1 && g.R == g.T * g.S && h.size(0) == g.B && h.size(2) == g.G &&
                  h.size(3) == g.H && h.size(4) == g.W && w.size(0) == g.G && w.size(2) == g.Ch &&
                  bias.size(0) == g.G && bias.size(1) == g.R && bias.size(2) == 1,
              "eqkit e4: shapes do not fit v (B, S, C, G, H, W), z (B, Ch, G, H, W), w (G, K*K*S, Ch), "
              "bias (G, K*K*S, 1)");
  g.Wp = g.W + 2 * g.P;
  g.L = (g.H * g.Wp + kAlign - 1) / kAlign * kAlign;
  g.D = g.P * g.Wp + g.P;
  g.PL = g.L + 2 * g.D;
  for (int64_t t = 0; t < g.T; ++t) g.off.push_back((t / g.K) * g.Wp + t % g.K);
  return g;
}

// (plain loops: for rows of a few dozen values they beat a call to memmove per row)
template <typename T, bool RELU = false>
void load(const Geo& g, const T* src, T* dst) {          // an H x W plane into a pad-layout plane
  for (int64_t r = 0; r < g.H; ++r) {
    const T* __restrict__ a = src + r * g.W;
    T* __restrict__ z = dst + g.D + r * g.Wp;
    for (int64_t c = 0; c < g.W; ++c) z[c] = RELU ? std::max(a[c], T(0)) : a[c];
  }
}

template <typename T>
void store(const Geo& g, const T* src, T* dst) {         // the pixels of an L-plane (i = r Wp + c) out to H x W
  for (int64_t r = 0; r < g.H; ++r) {
    const T* __restrict__ a = src + r * g.Wp;
    T* __restrict__ z = dst + r * g.W;
    for (int64_t c = 0; c < g.W; ++c) z[c] = a[c];
  }
}

template <typename T>
void store_relu_grad(const Geo& g, const T* src, const T* hpad, T* dst) {   // the same through the ReLU's gradient
  for (int64_t r = 0; r < g.H; ++r) {
    const T* __restrict__ a = src + r * g.Wp;
    const T* __restrict__ m = hpad + g.D + r * g.Wp;
    T* __restrict__ z = dst + r * g.W;
    for (int64_t c = 0; c < g.W; ++c) z[c] = m[c] > T(0) ? a[c] : T(0);
  }
}

// kbuf[r] (pad layout) = bias[r] + sum_j w[r, j] hbuf[j], rows r0 .. r0 + RB, NV vectors of pixels at a time
template <typename T, int RB, int NV>
void generate_rows(const Geo& g, const T* w, const T* bias, const T* hbuf, T* kbuf, int64_t r0, int64_t x0) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t VL = lanes<T>();
  vec acc[RB][NV];
  for (int q = 0; q < RB; ++q)
    for (int u = 0; u < NV; ++u) acc[q][u] = vec{} + bias[r0 + q];
  for (int64_t j = 0; j < g.Ch; ++j) {
    vec hv[NV];
    for (int u = 0; u < NV; ++u) hv[u] = vload(hbuf + j * g.PL + g.D + x0 + u * VL);
    for (int q = 0; q < RB; ++q) {
      const T wq = w[(r0 + q) * g.Ch + j];
      for (int u = 0; u < NV; ++u) acc[q][u] += wq * hv[u];
    }
  }
  for (int q = 0; q < RB; ++q)
    for (int u = 0; u < NV; ++u) vstore(kbuf + (r0 + q) * g.PL + g.D + x0 + u * VL, acc[q][u]);
}

template <typename T>
void generate(const Geo& g, const T* w, const T* bias, const T* hbuf, T* kbuf) {
  constexpr int NV = 2;
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * lanes<T>()) {
    int64_t r = 0;
    for (; r + 8 <= g.R; r += 8) generate_rows<T, 8, NV>(g, w, bias, hbuf, kbuf, r, x0);
    for (; r < g.R; ++r) generate_rows<T, 1, NV>(g, w, bias, hbuf, kbuf, r, x0);
  }
}

// out[q][i] = sum_t kp[t][ko[t] + i] vp[q][vo[t] + i] for CB channel planes, i in [0, L). The forward takes
// ko = D, vo = off (kernels at the output, values shifted); the gradient of v gathers both at 2D - off.
template <typename T, int CB, int NV>
void aggregate_block(const Geo& g, const T* const* kp, const int64_t* ko, const T* vp, const int64_t* vo, T* out) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t VL = lanes<T>();
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * VL) {
    vec acc[CB][NV];
    for (int q = 0; q < CB; ++q)
      for (int u = 0; u < NV; ++u) acc[q][u] = vec{};
    for (int64_t t = 0; t < g.T; ++t) {
      vec kv[NV];
      for (int u = 0; u < NV; ++u) kv[u] = vload(kp[t] + ko[t] + x0 + u * VL);
      for (int q = 0; q < CB; ++q) {
        const T* vq = vp + q * g.PL + vo[t] + x0;
        for (int u = 0; u < NV; ++u) acc[q][u] += kv[u] * vload(vq + u * VL);
      }
    }
    for (int q = 0; q < CB; ++q)
      for (int u = 0; u < NV; ++u) vstore(out + q * g.L + x0 + u * VL, acc[q][u]);
  }
}

template <typename T>
void aggregate(const Geo& g, const T* const* kp, const int64_t* ko, const T* vp, const int64_t* vo, T* out) {
  int64_t c = 0;
  for (; c + 8 <= g.C; c += 8) aggregate_block<T, 8, 2>(g, kp, ko, vp + c * g.PL, vo, out + c * g.L);
  for (; c + 4 <= g.C; c += 4) aggregate_block<T, 4, 2>(g, kp, ko, vp + c * g.PL, vo, out + c * g.L);
  for (; c + 2 <= g.C; c += 2) aggregate_block<T, 2, 4>(g, kp, ko, vp + c * g.PL, vo, out + c * g.L);
  for (; c < g.C; ++c) aggregate_block<T, 1, 4>(g, kp, ko, vp + c * g.PL, vo, out + c * g.L);
}

// gk[t S + s][i] = sum_c gyp[c][D + i] vp[c][off[t] + i] over the slice's channels, taps t0 .. t0 + TB (L-planes)
template <typename T, int TB, int NV>
void kernel_grad_block(const Geo& g, const T* gyp, const T* vp, int64_t s, int64_t t0, T* gk) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t VL = lanes<T>();
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * VL) {
    vec acc[TB][NV];
    for (int q = 0; q < TB; ++q)
      for (int u = 0; u < NV; ++u) acc[q][u] = vec{};
    for (int64_t c = 0; c < g.C; ++c) {
      vec gv[NV];
      for (int u = 0; u < NV; ++u) gv[u] = vload(gyp + c * g.PL + g.D + x0 + u * VL);
      for (int q = 0; q < TB; ++q) {
        const T* vq = vp + c * g.PL + g.off[t0 + q] + x0;
        for (int u = 0; u < NV; ++u) acc[q][u] += gv[u] * vload(vq + u * VL);
      }
    }
    for (int q = 0; q < TB; ++q)
      for (int u = 0; u < NV; ++u) vstore(gk + ((t0 + q) * g.S + s) * g.L + x0 + u * VL, acc[q][u]);
  }
}

template <typename T>
void kernel_grad(const Geo& g, const T* gyp, const T* vp, int64_t s, T* gk) {
  int64_t t = 0;
  for (; t + 4 <= g.T; t += 4) kernel_grad_block<T, 4, 2>(g, gyp, vp, s, t, gk);
  for (; t < g.T; ++t) kernel_grad_block<T, 1, 4>(g, gyp, vp, s, t, gk);
}

// ghb[j][i] = sum_r w[r, j] gk[r][i], hidden channels j0 .. j0 + JB (L-planes)
template <typename T, int JB, int NV>
void hidden_grad_block(const Geo& g, const T* w, const T* gk, int64_t j0, T* ghb) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t VL = lanes<T>();
  for (int64_t x0 = 0; x0 < g.L; x0 += NV * VL) {
    vec acc[JB][NV];
    for (int q = 0; q < JB; ++q)
      for (int u = 0; u < NV; ++u) acc[q][u] = vec{};
    for (int64_t r = 0; r < g.R; ++r) {
      vec kv[NV];
      for (int u = 0; u < NV; ++u) kv[u] = vload(gk + r * g.L + x0 + u * VL);
      for (int q = 0; q < JB; ++q) {
        const T wq = w[r * g.Ch + j0 + q];
        for (int u = 0; u < NV; ++u) acc[q][u] += wq * kv[u];
      }
    }
    for (int q = 0; q < JB; ++q)
      for (int u = 0; u < NV; ++u) vstore(ghb + (j0 + q) * g.L + x0 + u * VL, acc[q][u]);
  }
}

template <typename T>
void hidden_grad(const Geo& g, const T* w, const T* gk, T* ghb) {
  int64_t j = 0;
  for (; j + 8 <= g.Ch; j += 8) hidden_grad_block<T, 8, 2>(g, w, gk, j, ghb);
  for (; j + 4 <= g.Ch; j += 4) hidden_grad_block<T, 4, 2>(g, w, gk, j, ghb);
  for (; j < g.Ch; ++j) hidden_grad_block<T, 1, 4>(g, w, gk, j, ghb);
}

// gw[r, j] += sum_i gk[r][i] hbuf[j][D + i], rows r0 .. r0 + RB, hidden channels j0 .. j0 + JB; gw holds one vector
// of partial sums per (r, j) (its lanes are added once, at the end of the backward)
template <typename T, int RB, int JB>
void weight_grad_block(const Geo& g, const T* gk, const T* hbuf, int64_t r0, int64_t j0, T* gw) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t VL = lanes<T>();
  vec acc[RB][JB];
  for (int q = 0; q < RB; ++q)
    for (int j = 0; j < JB; ++j) acc[q][j] = vec{};
  for (int64_t x0 = 0; x0 < g.L; x0 += VL) {
    vec hv[JB];
    for (int j = 0; j < JB; ++j) hv[j] = vload(hbuf + (j0 + j) * g.PL + g.D + x0);
    for (int q = 0; q < RB; ++q) {
      const vec kv = vload(gk + (r0 + q) * g.L + x0);
      for (int j = 0; j < JB; ++j) acc[q][j] += kv * hv[j];
    }
  }
  for (int q = 0; q < RB; ++q)
    for (int j = 0; j < JB; ++j) {
      T* dst = gw + ((r0 + q) * g.Ch + j0 + j) * VL;
      vstore(dst, vload(dst) + acc[q][j]);
    }
}

template <typename T, int RB>
void weight_grad_rows(const Geo& g, const T* gk, const T* hbuf, int64_t r0, T* gw) {
  int64_t j = 0;
  for (; j + 4 <= g.Ch; j += 4) weight_grad_block<T, RB, 4>(g, gk, hbuf, r0, j, gw);
  for (; j < g.Ch; ++j) weight_grad_block<T, RB, 1>(g, gk, hbuf, r0, j, gw);
}

template <typename T>
void weight_grad(const Geo& g, const T* gk, const T* hbuf, T* gw, T* gb) {
  typedef typename Vec<T>::type vec;
  constexpr int64_t VL = lanes<T>();
  if (gw) {
    int64_t r = 0;
    for (; r + 4 <= g.R; r += 4) weight_grad_rows<T, 4>(g, gk, hbuf, r, gw);
    for (; r < g.R; ++r) weight_grad_rows<T, 1>(g, gk, hbuf, r, gw);
  }
  if (gb)
    for (int64_t r = 0; r < g.R; ++r) {          // the pixels' columns c >= W hold gk = 0 (gy is zero there)
      vec acc = vec{};
      for (int64_t x0 = 0; x0 < g.L; x0 += VL) acc += vload(gk + r * g.L + x0);
      vstore(gb + r * VL, vload(gb + r * VL) + acc);
    }
}

// Offsets of plane (b, s, c, g) of a contiguous (B, S, C, G, H, W) tensor, and of (b, j, g) of a (B, Ch, G, H, W) one.
inline int64_t vplane(const Geo& g, int64_t b, int64_t s, int64_t c, int64_t gg) {
  return (((b * g.S + s) * g.C + c) * g.G + gg) * g.HW;
}
inline int64_t hplane(const Geo& g, int64_t b, int64_t j, int64_t gg) { return ((b * g.Ch + j) * g.G + gg) * g.HW; }

template <typename T>
void forward_impl(const Geo& g, const T* v, const T* h, const T* w, const T* bias, T* y) {
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> hbuf(g.Ch * g.PL, 0), kbuf(g.R * g.PL, 0), vpad(g.C * g.PL, 0), out(g.C * g.L, 0);
    std::vector<const T*> kp(g.T);
    const std::vector<int64_t> ko(g.T, g.D);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / g.G, gg = p % g.G;
      for (int64_t j = 0; j < g.Ch; ++j) load<T, true>(g, h + hplane(g, b, j, gg), hbuf.data() + j * g.PL);
      generate(g, w + gg * g.R * g.Ch, bias + gg * g.R, hbuf.data(), kbuf.data());
      for (int64_t s = 0; s < g.S; ++s) {
        for (int64_t c = 0; c < g.C; ++c) load(g, v + vplane(g, b, s, c, gg), vpad.data() + c * g.PL);
        for (int64_t t = 0; t < g.T; ++t) kp[t] = kbuf.data() + (t * g.S + s) * g.PL;
        aggregate(g, kp.data(), ko.data(), vpad.data(), g.off.data(), out.data());
        for (int64_t c = 0; c < g.C; ++c) store(g, out.data() + c * g.L, y + vplane(g, b, s, c, gg));
      }
    }
  });
}

template <typename T>
void backward_impl(const Geo& g, const T* v, const T* h, const T* w, const T* bias, const T* gy, T* gv, T* gh,
                   T* gw, T* gb) {
  const bool need_k = gh || gw || gb;
  // the weight / bias gradients sum over images: one partial sum per part of the images, added in a fixed
  // order afterwards (the same result for a given thread count, whichever thread ran which part)
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.B * g.G));
  constexpr int64_t VL = lanes<T>();               // partial sums kept as vectors: lanes added at the end
  const int64_t nw = g.G * g.R * g.Ch * VL, nb = g.G * g.R * VL;
  std::vector<T> gw_part(gw ? parts * nw : 0, 0), gb_part(gb ? parts * nb : 0, 0);
  at::parallel_for(0, parts, 1, [&](int64_t part0, int64_t part1) {
    std::vector<T> hbuf(g.Ch * g.PL, 0), kbuf(gv ? g.R * g.PL : 0, 0), vpad(need_k ? g.C * g.PL : 0, 0),
        gyp(g.C * g.PL, 0), gk(need_k ? g.R * g.L : 0, 0), ghb(gh ? g.Ch * g.L : 0, 0), out(gv ? g.C * g.L : 0, 0);
    std::vector<const T*> kp(g.T);
    std::vector<int64_t> back(g.T);
    for (int64_t t = 0; t < g.T; ++t) back[t] = 2 * g.D - g.off[t];
    for (int64_t part = part0; part < part1; ++part) {
      T* gwp = gw ? gw_part.data() + part * nw : nullptr;
      T* gbp = gb ? gb_part.data() + part * nb : nullptr;
      for (int64_t p = part * g.B * g.G / parts; p < (part + 1) * g.B * g.G / parts; ++p) {
        const int64_t b = p / g.G, gg = p % g.G;
        const T* wg = w + gg * g.R * g.Ch;
        for (int64_t j = 0; j < g.Ch; ++j) load<T, true>(g, h + hplane(g, b, j, gg), hbuf.data() + j * g.PL);
        if (gv) generate(g, wg, bias + gg * g.R, hbuf.data(), kbuf.data());
        for (int64_t s = 0; s < g.S; ++s) {
          for (int64_t c = 0; c < g.C; ++c) load(g, gy + vplane(g, b, s, c, gg), gyp.data() + c * g.PL);
          if (need_k) {
            for (int64_t c = 0; c < g.C; ++c) load(g, v + vplane(g, b, s, c, gg), vpad.data() + c * g.PL);
            kernel_grad(g, gyp.data(), vpad.data(), s, gk.data());
          }
          if (gv) {                                   // gv(x) = sum_t k_t(x - t) gy(x - t)
            for (int64_t t = 0; t < g.T; ++t) kp[t] = kbuf.data() + (t * g.S + s) * g.PL;
            aggregate(g, kp.data(), back.data(), gyp.data(), back.data(), out.data());
            for (int64_t c = 0; c < g.C; ++c) store(g, out.data() + c * g.L, gv + vplane(g, b, s, c, gg));
          }
        }
        if (gh) {
          hidden_grad(g, wg, gk.data(), ghb.data());
          for (int64_t j = 0; j < g.Ch; ++j)
            store_relu_grad(g, ghb.data() + j * g.L, hbuf.data() + j * g.PL, gh + hplane(g, b, j, gg));
        }
        if (gw || gb)
          weight_grad(g, gk.data(), hbuf.data(), gwp ? gwp + gg * g.R * g.Ch * VL : nullptr,
                      gbp ? gbp + gg * g.R * VL : nullptr);
      }
    }
  });
  for (int64_t part = 0; part < parts; ++part) {
    for (int64_t i = 0; gw && i < g.G * g.R * g.Ch; ++i)
      for (int64_t l = 0; l < VL; ++l) gw[i] += gw_part[part * nw + i * VL + l];
    for (int64_t i = 0; gb && i < g.G * g.R; ++i)
      for (int64_t l = 0; l < VL; ++l) gb[i] += gb_part[part * nb + i * VL + l];
  }
}

}  // namespace

torch::Tensor e4_forward(torch::Tensor v, torch::Tensor h, torch::Tensor w, torch::Tensor bias, int64_t K) {
  const Geo g = geometry(v, h, w, bias, K);
  auto y = torch::empty_like(v);                   // every pixel is written
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_e4_forward", [&] {
    forward_impl<scalar_t>(g, v.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                           bias.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
  });
  return y;
}

std::vector<torch::Tensor> e4_backward(torch::Tensor v, torch::Tensor h, torch::Tensor w, torch::Tensor bias,
                                       torch::Tensor gy, int64_t K, bool need_v, bool need_h, bool need_w,
                                       bool need_b) {
  const Geo g = geometry(v, h, w, bias, K);
  TORCH_CHECK(gy.sizes() == v.sizes() && gy.scalar_type() == v.scalar_type(), "eqkit e4: gy must be shaped like v");
  gy = gy.contiguous();
  torch::Tensor gv, gh, gw, gb;
  if (need_v) gv = torch::empty_like(v);
  if (need_h) gh = torch::empty_like(h);
  if (need_w) gw = torch::zeros_like(w);
  if (need_b) gb = torch::zeros_like(bias);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_e4_backward", [&] {
    backward_impl<scalar_t>(g, v.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                            bias.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(),
                            need_v ? gv.data_ptr<scalar_t>() : nullptr, need_h ? gh.data_ptr<scalar_t>() : nullptr,
                            need_w ? gw.data_ptr<scalar_t>() : nullptr, need_b ? gb.data_ptr<scalar_t>() : nullptr);
  });
  return {gv, gh, gw, gb};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &e4_forward, "E4: generated kernels applied to v (forward)");
  m.def("backward", &e4_backward, "E4: gradients of v, z, w and bias");
}
