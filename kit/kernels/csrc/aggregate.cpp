// eqkit: fused dynamic aggregation (E4-Net, Neural ePDO): per-pixel KxK kernels applied depthwise.
//
//   y[b, s, c, g, x] = sum_t k[b, s, g, t, x] * v[b, s, c, g, x + t]      ("same" zero padding)
//
// One task per (b, s, g) plane: its K*K kernel planes and the C channel planes of its slice stay in
// cache while every tap is applied, instead of 25 passes over whole tensors (the tap loop in
// kit/layers/e4.py, kept as the reference). Forward and the two backward products, float32 and
// float64; any strides except a contiguous last (W) axis. Same summation order as the tap loop (bit for bit).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

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

// calls f(b, s, g) for every plane, in parallel
template <typename F>
void planes(const Geo& g, F f) {
  at::parallel_for(0, g.B * g.S * g.G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      int64_t gg = p % g.G, s = (p / g.G) % g.S, b = p / (g.G * g.S);
      f(b, s, gg);
    }
  });
}

// Loop order (tap, row, channel): one kernel row serves every channel of the slice while it is in L1, and the
// slice's planes stay in L1 across the taps; the kernel gradient sums the channels in registers, 8 pixels at a
// time. Every output element still sums its terms in the tap-loop reference's order (taps ascending for y and
// gv, channels ascending for gk; out-of-image taps skipped), so the results are bit for bit the reference's.
constexpr int kBlock = 8;

template <typename scalar_t>
void forward_impl(const Geo& g, const scalar_t* v, const scalar_t* k, scalar_t* y, int64_t yh) {
  planes(g, [&](int64_t b, int64_t s, int64_t gg) {
    const scalar_t* kp = k + b * g.kb + s * g.ks + gg * g.kg;
    const scalar_t* v0 = v + b * g.vb + s * g.vs + gg * g.vg;
    scalar_t* y0 = y + ((((b * g.S + s) * g.C) * g.G + gg) * g.H) * yh;
    const int64_t ycs = g.G * g.H * yh;                  // channel stride of y (contiguous)
    for (int64_t t = 0; t < g.T; ++t) {
      const int64_t di = t / g.K - g.P, dj = t % g.K - g.P;
      const int64_t h0 = std::max<int64_t>(0, -di), h1 = std::min<int64_t>(g.H, g.H - di);
      const int64_t w0 = std::max<int64_t>(0, -dj), w1 = std::min<int64_t>(g.W, g.W - dj);
      const scalar_t* kt = kp + t * g.kt;
      for (int64_t h = h0; h < h1; ++h) {
        const scalar_t* __restrict__ kr = kt + h * g.kh;
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* __restrict__ vr = v0 + c * g.vc + (h + di) * g.vh + dj;
          scalar_t* __restrict__ yr = y0 + c * ycs + h * yh;
          for (int64_t w = w0; w < w1; ++w) yr[w] += kr[w] * vr[w];
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const Geo& g, const scalar_t* v, const scalar_t* k, const scalar_t* gy, int64_t gyh,
                   scalar_t* gv, scalar_t* gk) {
  planes(g, [&](int64_t b, int64_t s, int64_t gg) {
    const scalar_t* kp = k + b * g.kb + s * g.ks + gg * g.kg;
    scalar_t* gkp = gk ? gk + b * g.kb + s * g.ks + gg * g.kg : nullptr;
    const scalar_t* v0 = v + b * g.vb + s * g.vs + gg * g.vg;
    const int64_t base = ((((b * g.S + s) * g.C) * g.G + gg) * g.H);
    const scalar_t* gy0 = gy + base * gyh;
    scalar_t* gv0 = gv ? gv + base * g.W : nullptr;
    const int64_t gycs = g.G * g.H * gyh, gvcs = g.G * g.H * g.W;   // channel strides (contiguous)
    for (int64_t t = 0; t < g.T; ++t) {
      const int64_t di = t / g.K - g.P, dj = t % g.K - g.P;
      const int64_t h0 = std::max<int64_t>(0, -di), h1 = std::min<int64_t>(g.H, g.H - di);
      const int64_t w0 = std::max<int64_t>(0, -dj), w1 = std::min<int64_t>(g.W, g.W - dj);
      for (int64_t h = h0; h < h1; ++h) {
        const scalar_t* __restrict__ kr = kp + t * g.kt + h * g.kh;
        if (gv0) {
          for (int64_t c = 0; c < g.C; ++c) {   // grad_v(x + t) += k_t(x) gy(x)
            const scalar_t* __restrict__ gr = gy0 + c * gycs + h * gyh;
            scalar_t* __restrict__ gvr = gv0 + c * gvcs + (h + di) * g.W + dj;
            for (int64_t w = w0; w < w1; ++w) gvr[w] += kr[w] * gr[w];
          }
        }
        if (gkp) {                   // grad_k_t(x) += sum over the slice's channels of gy(x) v(x + t)
          scalar_t* __restrict__ gkr = gkp + t * g.kt + h * g.kh;
          const scalar_t* __restrict__ gr0 = gy0 + h * gyh;
          const scalar_t* __restrict__ vr0 = v0 + (h + di) * g.vh + dj;
          int64_t w = w0;
          for (; w + kBlock <= w1; w += kBlock) {
            scalar_t acc[kBlock];
            for (int i = 0; i < kBlock; ++i) acc[i] = gkr[w + i];
            for (int64_t c = 0; c < g.C; ++c) {
              const scalar_t* __restrict__ gr = gr0 + c * gycs + w;
              const scalar_t* __restrict__ vr = vr0 + c * g.vc + w;
              for (int i = 0; i < kBlock; ++i) acc[i] += gr[i] * vr[i];
            }
            for (int i = 0; i < kBlock; ++i) gkr[w + i] = acc[i];
          }
          for (; w < w1; ++w) {
            scalar_t acc = gkr[w];
            for (int64_t c = 0; c < g.C; ++c) acc += gr0[c * gycs + w] * vr0[c * g.vc + w];
            gkr[w] = acc;
          }
        }
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

// Out variants (kit/kernels/aggregate.py, E4's chunked generator): accumulate into caller-given zeroed
// tensors (y / gv: contiguous (B, S, C, G, H, W) blocks, e.g. a chunk of images of a larger buffer; gk: the
// kernels' own strides), so nothing is allocated, zeroed or copied per chunk.
void aggregate_forward_out(torch::Tensor v, torch::Tensor k, torch::Tensor y) {
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && y.scalar_type() == v.scalar_type(), "eqkit aggregate: dtypes differ");
  Geo g = geometry(v, k);
  TORCH_CHECK(y.is_contiguous() && y.sizes() == v.sizes(), "eqkit aggregate: y must be contiguous, shaped like v");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_aggregate_forward_out", [&] {
    forward_impl<scalar_t>(g, v.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g.W);
  });
}

void aggregate_backward_out(torch::Tensor v, torch::Tensor k, torch::Tensor gy, c10::optional<torch::Tensor> gv,
                            c10::optional<torch::Tensor> gk) {
  Geo g = geometry(v, k);
  TORCH_CHECK(gy.is_contiguous() && gy.sizes() == v.sizes(), "eqkit aggregate: gy must be contiguous, shaped like v");
  TORCH_CHECK(!gv || (gv->is_contiguous() && gv->sizes() == v.sizes()), "eqkit aggregate: gv must be contiguous, shaped like v");
  TORCH_CHECK(!gk || (gk->strides() == k.strides() && gk->sizes() == k.sizes()), "eqkit aggregate: gk must have k's layout");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "eqkit_aggregate_backward_out", [&] {
    backward_impl<scalar_t>(g, v.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), g.W,
                            gv ? gv->data_ptr<scalar_t>() : nullptr, gk ? gk->data_ptr<scalar_t>() : nullptr);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &aggregate_forward, "fused dynamic aggregation (forward)");
  m.def("backward", &aggregate_backward, "fused dynamic aggregation (backward)");
  m.def("forward_out", &aggregate_forward_out, "fused dynamic aggregation (forward, accumulates into y)");
  m.def("backward_out", &aggregate_backward_out, "fused dynamic aggregation (backward, accumulates into gv / gk)");
}
