// eqkit: batch norm (training statistics) -> ReLU -> optional per-(image, field) dropout scale, as one operator
// with its backward, for the field batch norms of the kit's models (kit/kernels/bn_relu.py; the three-module
// chain BatchNorm3d, ReLU, dropout3d is its reference in tests).
//
// x (B, C, N) contiguous (C fields, N = |G| H W values per field and image), per field c over its M = B N values:
//   mean_c, var_c = biased variance (two passes, double accumulators), invstd_c = 1 / sqrt(var_c + eps)
//   alpha_c = w_c invstd_c, beta_c = b_c - mean_c alpha_c              (aten's transform: z = x alpha + beta)
//   y = max(z, 0) s[b, c]                                               (s: dropout scale, 0 or 1/(1-p); 1 if none)
// Backward, with g = gy s [z > 0] (z recomputed from x, the same expression, so the same mask):
//   db_c = sum g, dw_c = sum g xhat (xhat = (x - mean) invstd)
//   dx = w_c invstd_c (g - db_c / M - xhat dw_c / M)
// Three reads and one write forward, four reads and one write backward, where the chain makes three fresh
// outputs forward and three backward. One task per field (parallel over fields).
#include <torch/extension.h>
#include "simd.h"
#include <algorithm>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

using eqkit::Vec;
using eqkit::lanes;
using eqkit::vload;
using eqkit::vstore;
constexpr int NV = 4;     // independent vector accumulators per reduction (the adds' latency hidden)

// sum over one segment of f(i) for i < n, in vectors of the scalar type (NV accumulators), the tail scalar;
// returned as double (segments are summed in double)
template <typename scalar_t, typename F>
inline double segment_sum(int64_t n, F f) {
  typedef typename Vec<scalar_t>::type vec;
  constexpr int64_t VL = lanes<scalar_t>();
  vec acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = vec{};
  int64_t i = 0;
  for (; i + NV * VL <= n; i += NV * VL)
    for (int u = 0; u < NV; ++u) acc[u] += f(i + u * VL);
  double total = 0;
  for (int u = 0; u < NV; ++u)
    for (int64_t l = 0; l < VL; ++l) total += acc[u][l];
  return total + f.tail(i, n);
}

template <typename scalar_t>
struct Sum {                                                  // x
  const scalar_t* p;
  typename Vec<scalar_t>::type operator()(int64_t i) const { return vload(p + i); }
  double tail(int64_t i, int64_t n) const { double t = 0; for (; i < n; ++i) t += p[i]; return t; }
};
template <typename scalar_t>
struct SumSq {                                                // (x - m)^2
  const scalar_t* p; scalar_t m;
  typename Vec<scalar_t>::type operator()(int64_t i) const { auto d = vload(p + i) - m; return d * d; }
  double tail(int64_t i, int64_t n) const { double t = 0; for (; i < n; ++i) { double d = p[i] - m; t += d * d; } return t; }
};
template <typename scalar_t>
struct Grad {                                                 // g = gy s [x alpha + beta > 0]; g or g (x - m)
  const scalar_t* p; const scalar_t* gp; scalar_t alpha, beta, sc, m; bool centred;
  typename Vec<scalar_t>::type operator()(int64_t i) const {
    typedef typename Vec<scalar_t>::type vec;
    const vec x = vload(p + i);
    const vec z = x * alpha + beta;
    const vec g = (z > scalar_t(0)) ? vload(gp + i) * sc : vec{};
    return centred ? g * (x - m) : g;
  }
  double tail(int64_t i, int64_t n) const {
    double t = 0;
    for (; i < n; ++i) {
      const scalar_t z = p[i] * alpha + beta;
      const scalar_t g = z > scalar_t(0) ? gp[i] * sc : scalar_t(0);
      t += centred ? g * (p[i] - m) : g;
    }
    return t;
  }
};

// channel c's batch mean and 1 / sqrt(biased variance + eps): two passes over its B segments of N values
template <typename scalar_t>
void channel_stats(const scalar_t* x, int64_t B, int64_t C, int64_t N, int64_t c, double eps, double* mean_out,
                   double* invstd_out) {
  const double M = static_cast<double>(B * N);
  double sum = 0;
  for (int64_t b = 0; b < B; ++b) sum += segment_sum<scalar_t>(N, Sum<scalar_t>{x + (b * C + c) * N});
  const double mean = sum / M;
  double sq = 0;
  for (int64_t b = 0; b < B; ++b)
    sq += segment_sum<scalar_t>(N, SumSq<scalar_t>{x + (b * C + c) * N, static_cast<scalar_t>(mean)});
  // the centred sum about the rounded mean, corrected for the rounding (exact in exact arithmetic)
  const double dm = static_cast<double>(static_cast<scalar_t>(mean)) - mean;
  mean_out[c] = mean;
  invstd_out[c] = 1.0 / std::sqrt(std::max(sq / M - dm * dm, 0.0) + eps);
}

// aten's transform z = x alpha + beta: alpha = w invstd, beta = b - mean alpha (rounded to the scalar type)
template <typename scalar_t>
inline void transform(scalar_t w, scalar_t b, double mean, double invstd, scalar_t* alpha, scalar_t* beta) {
  *alpha = static_cast<scalar_t>(invstd * static_cast<double>(w));
  *beta = static_cast<scalar_t>(static_cast<double>(b) - mean * static_cast<double>(*alpha));
}

// From sum g and sum g (x - mean) of channel c: dw_c, db_c (where asked) and the input gradient's coefficients,
// dx = k (g - sg / M - (x - mean) invstd dw_c / M) = kk g + cx x + cc
template <typename scalar_t>
inline void input_gradient(double sg, double sgx, scalar_t w, double mean, double invstd, double M, int64_t c,
                           scalar_t* dw, scalar_t* db, scalar_t* kk, scalar_t* cx, scalar_t* cc) {
  const double dwc = sgx * invstd;                                 // sum g xhat
  if (dw) dw[c] = static_cast<scalar_t>(dwc);
  if (db) db[c] = static_cast<scalar_t>(sg);
  const double k = static_cast<double>(w) * invstd, m2 = dwc * invstd / M;
  *kk = static_cast<scalar_t>(k);
  *cx = static_cast<scalar_t>(-k * m2);
  *cc = static_cast<scalar_t>(-k * sg / M + k * m2 * mean);
}

template <typename scalar_t>
void forward_impl(const scalar_t* x, const scalar_t* w, const scalar_t* bias, const scalar_t* s, double eps,
                  int64_t B, int64_t C, int64_t N, scalar_t* y, double* mean_out, double* invstd_out) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      channel_stats(x, B, C, N, c, eps, mean_out, invstd_out);
      scalar_t alpha, beta;
      transform(w[c], bias[c], mean_out[c], invstd_out[c], &alpha, &beta);
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* __restrict__ p = x + (b * C + c) * N;
        scalar_t* __restrict__ q = y + (b * C + c) * N;
        const scalar_t sc = s ? s[b * C + c] : scalar_t(1);
        for (int64_t i = 0; i < N; ++i) {
          const scalar_t z = p[i] * alpha + beta;
          q[i] = (z > scalar_t(0) ? z : scalar_t(0)) * sc;
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const scalar_t* gy, const scalar_t* x, const scalar_t* w, const scalar_t* bias, const scalar_t* s,
                   const double* mean, const double* invstd, int64_t B, int64_t C, int64_t N, scalar_t* dx,
                   scalar_t* dw, scalar_t* db) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const double M = static_cast<double>(B * N);
      scalar_t alpha, beta;
      transform(w[c], bias[c], mean[c], invstd[c], &alpha, &beta);
      const double is = invstd[c];
      const scalar_t mu = static_cast<scalar_t>(mean[c]);
      const double dmu = static_cast<double>(mu) - mean[c];            // rounding of the mean
      double sg = 0, sgx = 0;                                         // sum g, sum g (x - mean)
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t sc = s ? s[b * C + c] : scalar_t(1);
        if (sc == scalar_t(0)) continue;
        const scalar_t* p = x + (b * C + c) * N;
        const scalar_t* gp = gy + (b * C + c) * N;
        sg += segment_sum<scalar_t>(N, Grad<scalar_t>{p, gp, alpha, beta, sc, mu, false});
        sgx += segment_sum<scalar_t>(N, Grad<scalar_t>{p, gp, alpha, beta, sc, mu, true});
      }
      sgx += dmu * sg;                                                // sum g (x - mu) + (mu - mean) sum g
      scalar_t kk, cx, cc;
      input_gradient(sg, sgx, w[c], mean[c], is, M, c, dw, db, &kk, &cx, &cc);
      if (!dx) continue;
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t sc = s ? s[b * C + c] : scalar_t(1);
        const scalar_t* __restrict__ p = x + (b * C + c) * N;
        const scalar_t* __restrict__ gp = gy + (b * C + c) * N;
        scalar_t* __restrict__ q = dx + (b * C + c) * N;
        for (int64_t i = 0; i < N; ++i) {
          const scalar_t z = p[i] * alpha + beta;
          const scalar_t g = z > scalar_t(0) ? gp[i] * sc : scalar_t(0);
          q[i] = kk * g + cx * p[i] + cc;
        }
      }
    }
  });
}

// The same with a 2 x 2 max pool (stride 2) after the dropout: x (B, C, P, H, W), H and W even, y (B, C, P, H/2,
// W/2). Pooling after ReLU and a positive per-plane scale is pooling z: y = max(max_i z_i, 0) s. The backward
// routes g to the window's first maximum of max(z_i, 0) (F.max_pool2d's choice: the first of equal values in
// row-major order), through the ReLU mask of that value: the chain's gradient, without the full-size ReLU output,
// pooled input or pooled gradient scatter it writes and reads.
constexpr uint8_t kNoMax = 255;      // a window whose maximum is 0 after the ReLU: no gradient

template <typename scalar_t>
void pooled_forward_impl(const scalar_t* x, const scalar_t* w, const scalar_t* bias, const scalar_t* s, double eps,
                         int64_t B, int64_t C, int64_t P, int64_t H, int64_t W, scalar_t* y, uint8_t* idx,
                         double* mean_out, double* invstd_out) {
  const int64_t N = P * H * W, Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      channel_stats(x, B, C, N, c, eps, mean_out, invstd_out);
      scalar_t alpha, beta;
      transform(w[c], bias[c], mean_out[c], invstd_out[c], &alpha, &beta);
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t sc = s ? s[b * C + c] : scalar_t(1);
        for (int64_t pl = 0; pl < P; ++pl) {
          const scalar_t* xp = x + ((b * C + c) * P + pl) * H * W;
          scalar_t* yp = y + ((b * C + c) * P + pl) * Ho * Wo;
          uint8_t* ip = idx + ((b * C + c) * P + pl) * Ho * Wo;
          const int64_t wo_n = Wo, w_n = W;              // locals: the uint8 stores may alias anything else
          const scalar_t al = alpha, be = beta, scl = sc;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const scalar_t* __restrict__ top = xp + 2 * oh * w_n;
            const scalar_t* __restrict__ bot = top + w_n;
            scalar_t* __restrict__ yr = yp + oh * wo_n;
            uint8_t* __restrict__ ir = ip + oh * wo_n;
#pragma GCC ivdep
            for (int64_t ow = 0; ow < wo_n; ++ow) {
              const scalar_t z0 = top[2 * ow] * al + be, z1 = top[2 * ow + 1] * al + be,
                             z2 = bot[2 * ow] * al + be, z3 = bot[2 * ow + 1] * al + be;
              const scalar_t r0 = z0 > scalar_t(0) ? z0 : scalar_t(0), r1 = z1 > scalar_t(0) ? z1 : scalar_t(0),
                             r2 = z2 > scalar_t(0) ? z2 : scalar_t(0), r3 = z3 > scalar_t(0) ? z3 : scalar_t(0);
              const scalar_t m01 = r1 > r0 ? r1 : r0, m23 = r3 > r2 ? r3 : r2;
              const scalar_t m = m23 > m01 ? m23 : m01;
              yr[ow] = m * scl;
              // where the gradient goes: the first of equal maxima in row-major order (F.max_pool2d's choice),
              // none where the window's maximum is 0 after the ReLU
              const int k = r0 == m ? 0 : (r1 == m ? 1 : (r2 == m ? 2 : 3));
              ir[ow] = static_cast<uint8_t>(m > scalar_t(0) ? k : int(kNoMax));
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void pooled_backward_impl(const scalar_t* gy, const scalar_t* x, const uint8_t* idx, const scalar_t* w,
                          const scalar_t* s, const double* mean, const double* invstd, int64_t B, int64_t C, int64_t P,
                          int64_t H, int64_t W, scalar_t* dx, scalar_t* dw, scalar_t* db) {
  const int64_t N = P * H * W, Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const double M = static_cast<double>(B * N);
      const double is = invstd[c], mu = mean[c];
      double sg = 0, sgx = 0;
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t sc = s ? s[b * C + c] : scalar_t(1);
        if (sc == scalar_t(0)) continue;
        for (int64_t pl = 0; pl < P; ++pl) {
          const int64_t plane = (b * C + c) * P + pl;
          const scalar_t* xp = x + plane * H * W;
          const scalar_t* gp = gy + plane * Ho * Wo;
          const uint8_t* ip = idx + plane * Ho * Wo;
          double a1 = 0, a2 = 0;
          for (int64_t oh = 0; oh < Ho; ++oh)
            for (int64_t ow = 0; ow < Wo; ++ow) {
              const uint8_t k = ip[oh * Wo + ow];
              if (k == kNoMax) continue;
              const double g = static_cast<double>(gp[oh * Wo + ow] * sc);
              a1 += g;
              a2 += g * (static_cast<double>(xp[(2 * oh + (k >> 1)) * W + 2 * ow + (k & 1)]) - mu);
            }
          sg += a1;
          sgx += a2;
        }
      }
      scalar_t kk, cx, cc;
      input_gradient(sg, sgx, w[c], mean[c], is, M, c, dw, db, &kk, &cx, &cc);
      if (!dx) continue;
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t sc = s ? s[b * C + c] : scalar_t(1);
        for (int64_t pl = 0; pl < P; ++pl) {
          const int64_t plane = (b * C + c) * P + pl;
          const scalar_t* __restrict__ xp = x + plane * H * W;
          const scalar_t* gp = gy + plane * Ho * Wo;
          const uint8_t* ip = idx + plane * Ho * Wo;
          scalar_t* __restrict__ dp = dx + plane * H * W;
          for (int64_t i = 0; i < H * W; ++i) dp[i] = cx * xp[i] + cc;          // g = 0 off the maxima
          if (sc == scalar_t(0)) continue;
          for (int64_t oh = 0; oh < Ho; ++oh)
            for (int64_t ow = 0; ow < Wo; ++ow) {
              const uint8_t kq = ip[oh * Wo + ow];
              if (kq == kNoMax) continue;
              const int64_t at = (2 * oh + (kq >> 1)) * W + 2 * ow + (kq & 1);
              dp[at] = kk * (gp[oh * Wo + ow] * sc) + cx * xp[at] + cc;
            }
        }
      }
    }
  });
}

void check(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b, const c10::optional<torch::Tensor>& s) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(), "eqkit bn_relu: contiguous CPU x (B, C, N)");
  TORCH_CHECK(w.dim() == 1 && b.dim() == 1 && w.size(0) == x.size(1) && b.size(0) == x.size(1) && w.is_contiguous() &&
              b.is_contiguous() && w.scalar_type() == x.scalar_type() && b.scalar_type() == x.scalar_type(),
              "eqkit bn_relu: weight and bias (C,) of x's dtype");
  if (s) TORCH_CHECK(s->is_contiguous() && s->numel() == x.size(0) * x.size(1) && s->scalar_type() == x.scalar_type(),
                     "eqkit bn_relu: dropout scale (B, C) of x's dtype");
}

}  // namespace

// the gradients asked for, uninitialised (every element is written)
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> gradients_like(const torch::Tensor& x, const torch::Tensor& w,
                                                                       const torch::Tensor& b, bool nx, bool nw, bool nb) {
  return {nx ? torch::empty_like(x) : torch::Tensor(), nw ? torch::empty_like(w) : torch::Tensor(),
          nb ? torch::empty_like(b) : torch::Tensor()};
}

std::vector<torch::Tensor> bn_relu_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b,
                                           c10::optional<torch::Tensor> s, double eps) {
  check(x, w, b, s);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  auto y = torch::empty_like(x);
  auto mean = torch::empty({C}, x.options().dtype(torch::kDouble));
  auto invstd = torch::empty({C}, x.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eqkit_bn_relu_forward", [&] {
    forward_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                           s ? s->data_ptr<scalar_t>() : nullptr, eps, B, C, N, y.data_ptr<scalar_t>(),
                           mean.data_ptr<double>(), invstd.data_ptr<double>());
  });
  return {y, mean, invstd};
}

std::vector<torch::Tensor> bn_relu_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor w, torch::Tensor b,
                                            c10::optional<torch::Tensor> s, torch::Tensor mean, torch::Tensor invstd,
                                            bool need_x, bool need_w, bool need_b) {
  check(x, w, b, s);
  gy = gy.contiguous();
  TORCH_CHECK(gy.sizes() == x.sizes(), "eqkit bn_relu: gy must have x's shape");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  auto [dx, dw, db] = gradients_like(x, w, b, need_x, need_w, need_b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eqkit_bn_relu_backward", [&] {
    backward_impl<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                            b.data_ptr<scalar_t>(), s ? s->data_ptr<scalar_t>() : nullptr, mean.data_ptr<double>(),
                            invstd.data_ptr<double>(), B, C, N, need_x ? dx.data_ptr<scalar_t>() : nullptr,
                            need_w ? dw.data_ptr<scalar_t>() : nullptr, need_b ? db.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw, db};
}

std::vector<torch::Tensor> bn_relu_pool_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b,
                                                c10::optional<torch::Tensor> s, double eps) {
  TORCH_CHECK(x.dim() == 5 && x.size(3) % 2 == 0 && x.size(4) % 2 == 0, "eqkit bn_relu: pooled x (B, C, P, H, W), H, W even");
  check(x.view({x.size(0), x.size(1), -1}), w, b, s);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2), H = x.size(3), W = x.size(4);
  auto y = torch::empty({B, C, P, H / 2, W / 2}, x.options());
  auto idx = torch::empty({B, C, P, H / 2, W / 2}, x.options().dtype(torch::kUInt8));
  auto mean = torch::empty({C}, x.options().dtype(torch::kDouble));
  auto invstd = torch::empty({C}, x.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eqkit_bn_relu_pool_forward", [&] {
    pooled_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                  s ? s->data_ptr<scalar_t>() : nullptr, eps, B, C, P, H, W, y.data_ptr<scalar_t>(),
                                  idx.data_ptr<uint8_t>(), mean.data_ptr<double>(), invstd.data_ptr<double>());
  });
  return {y, mean, invstd, idx};
}

std::vector<torch::Tensor> bn_relu_pool_backward(torch::Tensor gy, torch::Tensor x, torch::Tensor idx, torch::Tensor w,
                                                 torch::Tensor b, c10::optional<torch::Tensor> s, torch::Tensor mean,
                                                 torch::Tensor invstd, bool need_x, bool need_w, bool need_b) {
  TORCH_CHECK(x.dim() == 5 && x.size(3) % 2 == 0 && x.size(4) % 2 == 0, "eqkit bn_relu: pooled x (B, C, P, H, W), H, W even");
  check(x.view({x.size(0), x.size(1), -1}), w, b, s);
  gy = gy.contiguous();
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(gy.dim() == 5 && gy.size(0) == B && gy.size(1) == C && gy.size(2) == P && gy.size(3) == H / 2 &&
              gy.size(4) == W / 2, "eqkit bn_relu: gy must be the pooled shape");
  auto [dx, dw, db] = gradients_like(x, w, b, need_x, need_w, need_b);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "eqkit_bn_relu_pool_backward", [&] {
    pooled_backward_impl<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(),
                                   w.data_ptr<scalar_t>(), s ? s->data_ptr<scalar_t>() : nullptr, mean.data_ptr<double>(),
                                   invstd.data_ptr<double>(), B, C, P, H, W, need_x ? dx.data_ptr<scalar_t>() : nullptr,
                                   need_w ? dw.data_ptr<scalar_t>() : nullptr, need_b ? db.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_forward", &bn_relu_pool_forward, "the same, then a 2 x 2 max pool: forward");
  m.def("pool_backward", &bn_relu_pool_backward, "its backward");
  m.def("forward", &bn_relu_forward, "batch norm (batch statistics) -> ReLU -> dropout scale, forward");
  m.def("backward", &bn_relu_backward, "its backward");
}
