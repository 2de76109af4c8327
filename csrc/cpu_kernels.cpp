// CPU implementations: each op runs a per-row function over rows split across threads (at::parallel_for);
// the row functions' inner loops are written so the compiler vectorises them (omp simd); accumulation in
// float (double for double inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>

#include "ops.h"

namespace megatrain {
namespace {

// exp that the compiler can vectorise (std::exp is an opaque libm call): Cephes' expf, range reduction
// by ln 2 then a degree-6 polynomial, ~1 ulp. Doubles keep std::exp.
template <typename T>
inline T vexp(T x) { return std::exp(x); }
template <>
inline float vexp<float>(float x) {
  x = std::min(std::max(x, -87.33654f), 88.72283f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
template <typename T>
inline T vtanh(T x) { return T(1) - T(2) / (vexp(T(2) * x) + T(1)); }
template <typename T>
inline T vsigmoid(T x) { return T(1) / (T(1) + vexp(-x)); }

constexpr int64_t kGrain = 16;  // rows per parallel task, at least

int64_t rows_of(const at::Tensor& x) { return x.numel() / std::max<int64_t>(x.size(-1), 1); }

// Per-thread partial sums of a [dim] reduction over rows (weight/bias gradients), then summed.
struct RowReduction {
  at::Tensor partial;  // [threads, dim], accumulation type
  explicit RowReduction(int64_t dim, at::ScalarType t)
      : partial(at::zeros({at::get_num_threads(), dim}, at::TensorOptions().dtype(t))) {}
  template <typename acc_t>
  acc_t* mine() { return partial.data_ptr<acc_t>() + at::get_thread_num() * partial.size(1); }
  at::Tensor total(at::ScalarType out) { return partial.sum(0).to(out); }
};

// One row of each norm. NOTE: the row loops live in plain functions of raw pointers, not in the
// parallel_for lambda: there, D and the pointers are references into the enclosing lambdas and GCC left
// the loops 1.6x slower (LayerNorm backward 10 ms vs 6 ms on [4096, 1024], bench_kernels.py).
template <typename scalar_t, typename acc_t>
inline acc_t rms_norm_fwd_row(const scalar_t* x, const scalar_t* w, int64_t D, double eps, scalar_t* y) {
  acc_t ss = 0;
_Pragma("omp simd reduction(+ : ss)")
  for (int64_t i = 0; i < D; ++i) ss += acc_t(x[i]) * acc_t(x[i]);
  const acc_t inv = acc_t(1) / std::sqrt(ss / acc_t(D) + acc_t(eps));
  // as the reference: normalise in float, round to the input dtype, then scale by the weight
_Pragma("omp simd")
  for (int64_t i = 0; i < D; ++i) y[i] = scalar_t(acc_t(scalar_t(acc_t(x[i]) * inv)) * acc_t(w[i]));
  return inv;
}

template <typename scalar_t, typename acc_t>
inline void rms_norm_bwd_row(const scalar_t* x, const scalar_t* dy, const scalar_t* w, acc_t inv, int64_t D,
                             scalar_t* dx, acc_t* dw) {
  acc_t dot = 0;  // sum(dy * w * x)
_Pragma("omp simd reduction(+ : dot)")
  for (int64_t i = 0; i < D; ++i) dot += acc_t(dy[i]) * acc_t(w[i]) * acc_t(x[i]);
  // dx = inv * (dy w - xhat mean(dy w xhat)) = inv * dy w + s * x
  const acc_t s = -inv * inv * inv * dot / acc_t(D);
_Pragma("omp simd")
  for (int64_t i = 0; i < D; ++i) {
    const acc_t dyi = acc_t(dy[i]), xi = acc_t(x[i]);
    dw[i] += dyi * xi * inv;
    dx[i] = scalar_t(inv * dyi * acc_t(w[i]) + s * xi);
  }
}

// Returns (mean, 1 / std); two passes over the row (it is in L1) for an exact variance.
template <typename scalar_t, typename acc_t>
inline std::pair<acc_t, acc_t> layer_norm_fwd_row(const scalar_t* x, const scalar_t* w, const scalar_t* b, int64_t D,
                                                  double eps, scalar_t* y) {
  acc_t sum = 0;
_Pragma("omp simd reduction(+ : sum)")
  for (int64_t i = 0; i < D; ++i) sum += acc_t(x[i]);
  const acc_t mu = sum / acc_t(D);
  acc_t var = 0;
_Pragma("omp simd reduction(+ : var)")
  for (int64_t i = 0; i < D; ++i) var += (acc_t(x[i]) - mu) * (acc_t(x[i]) - mu);
  const acc_t inv = acc_t(1) / std::sqrt(var / acc_t(D) + acc_t(eps));
  if (b) {
_Pragma("omp simd")
    for (int64_t i = 0; i < D; ++i) y[i] = scalar_t((acc_t(x[i]) - mu) * inv * acc_t(w[i]) + acc_t(b[i]));
  } else {
_Pragma("omp simd")
    for (int64_t i = 0; i < D; ++i) y[i] = scalar_t((acc_t(x[i]) - mu) * inv * acc_t(w[i]));
  }
  return {mu, inv};
}

template <typename scalar_t, typename acc_t>
inline void layer_norm_bwd_row(const scalar_t* x, const scalar_t* dy, const scalar_t* w, acc_t mu, acc_t inv,
                               int64_t D, scalar_t* dx, acc_t* dw, acc_t* db) {
  acc_t sum_g = 0, sum_gxc = 0;  // sums of g = dy * w and of g * (x - mu)
_Pragma("omp simd reduction(+ : sum_g, sum_gxc)")
  for (int64_t i = 0; i < D; ++i) {
    const acc_t g = acc_t(dy[i]) * acc_t(w[i]);
    sum_g += g;
    sum_gxc += g * (acc_t(x[i]) - mu);
  }
  // dx = inv * (g - mean(g) - xhat mean(g xhat)) = inv * g + s * (x - mu) + t
  const acc_t s = -inv * inv * inv * sum_gxc / acc_t(D), t = -inv * sum_g / acc_t(D);
_Pragma("omp simd")
  for (int64_t i = 0; i < D; ++i) {
    const acc_t dyi = acc_t(dy[i]), xc = acc_t(x[i]) - mu;
    dw[i] += dyi * xc * inv;
    db[i] += dyi;
    dx[i] = scalar_t(inv * dyi * acc_t(w[i]) + s * xc + t);
  }
}

template <typename scalar_t, typename acc_t>
inline void rope_row(const scalar_t* x, const float* c, const float* s, float sign, int64_t half, scalar_t* o) {
_Pragma("omp simd")
  for (int64_t i = 0; i < half; ++i) o[i] = scalar_t(acc_t(x[i]) * acc_t(c[i]) - acc_t(x[i + half]) * acc_t(sign * s[i]));
_Pragma("omp simd")
  for (int64_t i = half; i < 2 * half; ++i)
    o[i] = scalar_t(acc_t(x[i]) * acc_t(c[i]) + acc_t(x[i - half]) * acc_t(sign * s[i]));
}

// gate_up row = [gate (F) | up (F)]
template <typename scalar_t, typename acc_t>
inline void swiglu_fwd_row(const scalar_t* gu, int64_t F, scalar_t* y) {
_Pragma("omp simd")
  for (int64_t i = 0; i < F; ++i) {
    const acc_t a = acc_t(gu[i]);
    y[i] = scalar_t(a * vsigmoid(a) * acc_t(gu[F + i]));
  }
}

template <typename scalar_t, typename acc_t>
inline void swiglu_bwd_row(const scalar_t* gu, const scalar_t* dy, int64_t F, scalar_t* dgu) {
_Pragma("omp simd")
  for (int64_t i = 0; i < F; ++i) {
    const acc_t a = acc_t(gu[i]), s = vsigmoid(a), d = acc_t(dy[i]);
    dgu[i] = scalar_t(d * acc_t(gu[F + i]) * s * (acc_t(1) + a * (acc_t(1) - s)));
    dgu[F + i] = scalar_t(d * a * s);
  }
}

// GeLU, tanh form: gelu(h) = 0.5 h (1 + tanh(k0 (h + k1 h^3))); gelu_tanh_t is that tanh.
constexpr double kGeluK0 = 0.7978845608028654, kGeluK1 = 0.044715;  // sqrt(2 / pi), and the cubic term

template <typename acc_t>
inline acc_t gelu_tanh_t(acc_t h) { return vtanh(acc_t(kGeluK0) * (h + acc_t(kGeluK1) * h * h * h)); }

template <typename scalar_t, typename acc_t>
inline void bias_gelu_fwd_row(const scalar_t* x, const scalar_t* b, int64_t F, scalar_t* y) {
_Pragma("omp simd")
  for (int64_t i = 0; i < F; ++i) {
    const acc_t h = acc_t(x[i]) + acc_t(b[i]);
    y[i] = scalar_t(acc_t(0.5) * h * (acc_t(1) + gelu_tanh_t(h)));
  }
}

template <typename scalar_t, typename acc_t>
inline void bias_gelu_bwd_row(const scalar_t* x, const scalar_t* b, const scalar_t* dy, int64_t F, scalar_t* dx,
                              acc_t* db) {
  const acc_t k0 = acc_t(kGeluK0), k1 = acc_t(kGeluK1);
_Pragma("omp simd")
  for (int64_t i = 0; i < F; ++i) {
    const acc_t h = acc_t(x[i]) + acc_t(b[i]);
    const acc_t t = gelu_tanh_t(h);
    const acc_t grad = acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * h * (acc_t(1) - t * t) * k0 * (acc_t(1) + acc_t(3) * k1 * h * h);
    const acc_t d = acc_t(dy[i]) * grad;
    dx[i] = scalar_t(d);
    db[i] += d;
  }
}

// max, sum of exp(l - max) and plain sum of one row of logits
template <typename scalar_t, typename acc_t>
inline void ce_stats_row(const scalar_t* l, int64_t V, acc_t* max_out, acc_t* sumexp_out, acc_t* sum_out) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), all = 0;
_Pragma("omp simd reduction(max : m) reduction(+ : all)")
  for (int64_t i = 0; i < V; ++i) {
    m = std::max(m, acc_t(l[i]));
    all += acc_t(l[i]);
  }
  acc_t s = 0;
_Pragma("omp simd reduction(+ : s)")
  for (int64_t i = 0; i < V; ++i) s += vexp(acc_t(l[i]) - m);
  *max_out = m;
  *sumexp_out = s;
  *sum_out = all;
}

// g * (softmax - smoothing / V) for one row; lse = log-sum-exp of the row
template <typename scalar_t, typename acc_t>
inline void ce_grad_row(const scalar_t* l, int64_t V, acc_t lse, acc_t g, acc_t uniform, scalar_t* o) {
_Pragma("omp simd")
  for (int64_t i = 0; i < V; ++i) o[i] = scalar_t(g * (vexp(acc_t(l[i]) - lse) - uniform));
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  auto rstd = at::empty({N}, x.options().dtype(acc_type_of(x)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rp[r] = rms_norm_fwd_row<scalar_t, acc_t>(xp + r * D, wp, D, eps, yp + r * D);
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                                                    const at::Tensor& rstd_) {
  auto dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  RowReduction dw(D, acc_type_of(x));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      acc_t* dwp = dw.mine<acc_t>();
      for (int64_t r = begin; r < end; ++r)
        rms_norm_bwd_row<scalar_t, acc_t>(xp + r * D, dyp + r * D, wp, rp[r], D, dxp + r * D, dwp);
    });
  });
  return {dx, dw.total(w.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x_, const at::Tensor& w_,
                                                                  const c10::optional<at::Tensor>& b_, double eps) {
  auto x = x_.contiguous(), w = w_.contiguous();
  at::Tensor b = b_.has_value() ? b_->contiguous() : at::Tensor();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(acc_type_of(x)));
  auto rstd = at::empty({N}, x.options().dtype(acc_type_of(x)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        std::tie(mp[r], rp[r]) = layer_norm_fwd_row<scalar_t, acc_t>(xp + r * D, wp, bp, D, eps, yp + r * D);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_,
                                                                  const at::Tensor& w_, const at::Tensor& mean_,
                                                                  const at::Tensor& rstd_) {
  auto dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous();
  auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  RowReduction dw(D, acc_type_of(x)), db(D, acc_type_of(x));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      acc_t *dwp = dw.mine<acc_t>(), *dbp = db.mine<acc_t>();
      for (int64_t r = begin; r < end; ++r)
        layer_norm_bwd_row<scalar_t, acc_t>(xp + r * D, dyp + r * D, wp, mp[r], rp[r], D, dxp + r * D, dwp, dbp);
    });
  });
  return {dx, dw.total(w.scalar_type()), db.total(w.scalar_type())};
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  TORCH_CHECK(x.dim() == 4 && x.stride(-1) == 1, "rope: x must be [B, T, H, D] with a contiguous last dim");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos_.size(0) >= T && cos_.size(1) == D, "rope: cos/sin must be [>=T, D], D even");
  auto cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  auto out = at::empty({B, T, H, D}, x.options());
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  const float sign = inverse ? -1.f : 1.f;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    at::parallel_for(0, B * T, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cp + t * D, *s = sp + t * D;
        for (int64_t h = 0; h < H; ++h)
          rope_row<scalar_t, acc_t>(xp + b * sb + t * st + h * sh, c, s, sign, half, op + ((bt * H) + h) * D);
      }
    });
  });
  return out;
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gu_) {
  auto gu = gu_.contiguous();
  const int64_t F = gu.size(-1) / 2, N = rows_of(gu);
  auto sizes = gu.sizes().vec();
  sizes.back() = F;
  auto y = at::empty(sizes, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gu.scalar_type(), "swiglu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) swiglu_fwd_row<scalar_t, acc_t>(gp + r * 2 * F, F, yp + r * F);
    });
  });
  return y;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& dy_, const at::Tensor& gu_) {
  auto dy = dy_.contiguous(), gu = gu_.contiguous();
  const int64_t F = gu.size(-1) / 2, N = rows_of(gu);
  auto dgu = at::empty_like(gu);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gu.scalar_type(), "swiglu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = gu.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>();
    scalar_t* dp = dgu.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) swiglu_bwd_row<scalar_t, acc_t>(gp + r * 2 * F, dyp + r * F, F, dp + r * 2 * F);
    });
  });
  return dgu;
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x_, const at::Tensor& b_) {
  auto x = x_.contiguous(), b = b_.contiguous();
  const int64_t F = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) bias_gelu_fwd_row<scalar_t, acc_t>(xp + r * F, bp, F, yp + r * F);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& b_) {
  auto dy = dy_.contiguous(), x = x_.contiguous(), b = b_.contiguous();
  const int64_t F = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  RowReduction db(F, acc_type_of(x));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      acc_t* dbp = db.mine<acc_t>();
      for (int64_t r = begin; r < end; ++r)
        bias_gelu_bwd_row<scalar_t, acc_t>(xp + r * F, bp, dyp + r * F, F, dxp + r * F, dbp);
    });
  });
  return {dx, db.total(b.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_stats_cpu(const at::Tensor& logits_,
                                                                        const at::Tensor& labels_, int64_t vocab_start,
                                                                        int64_t ignore_index) {
  auto logits = logits_.contiguous();
  auto labels = labels_.contiguous().to(at::kLong);
  const int64_t V = logits.size(-1), N = rows_of(logits);
  auto opts = logits.options().dtype(acc_type_of(logits));
  auto mx = at::empty({N}, opts), sumexp = at::empty({N}, opts), target = at::empty({N}, opts), total = at::empty({N}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "ce_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const int64_t* yp = labels.data_ptr<int64_t>();
    acc_t *mp = mx.data_ptr<acc_t>(), *sp = sumexp.data_ptr<acc_t>(), *tp = target.data_ptr<acc_t>(),
          *ap = total.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* l = lp + r * V;
        ce_stats_row<scalar_t, acc_t>(l, V, mp + r, sp + r, ap + r);
        const int64_t local = yp[r] - vocab_start;
        tp[r] = (yp[r] != ignore_index && local >= 0 && local < V) ? acc_t(l[local]) : acc_t(0);
      }
    });
  });
  return {mx, sumexp, target, total};
}

at::Tensor ce_grad_cpu(const at::Tensor& logits_, const at::Tensor& labels_, const at::Tensor& lse_,
                       const at::Tensor& grad_rows_, int64_t vocab_start, int64_t ignore_index, double smoothing,
                       int64_t vocab_total, bool inplace) {
  TORCH_CHECK(!inplace || logits_.is_contiguous(), "ce_grad: in-place needs contiguous logits");
  auto logits = logits_.contiguous();
  auto labels = labels_.contiguous().to(at::kLong);
  auto lse = lse_.contiguous(), grad_rows = grad_rows_.contiguous();
  const int64_t V = logits.size(-1), N = rows_of(logits);
  auto out = inplace ? logits : at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "ce_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* yp = labels.data_ptr<int64_t>();
    const acc_t *zp = lse.data_ptr<acc_t>(), *gp = grad_rows.data_ptr<acc_t>();
    const acc_t eps = acc_t(smoothing), uniform = eps / acc_t(vocab_total);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* l = lp + r * V;
        scalar_t* o = op + r * V;
        if (yp[r] == ignore_index) {
          for (int64_t i = 0; i < V; ++i) o[i] = scalar_t(0);
          continue;
        }
        const acc_t g = gp[r];
        ce_grad_row<scalar_t, acc_t>(l, V, zp[r], g, uniform, o);
        const int64_t local = yp[r] - vocab_start;
        if (local >= 0 && local < V) o[local] = scalar_t(acc_t(o[local]) - g * (acc_t(1) - eps));
      }
    });
  });
  return out;
}


// -- a decoding step's products: a few rows against a whole weight ---------------------------------------------------
// y[m, n] = sum_k x[m, k] w[n, k] for M <= 16 rows. The weight is read once, row by row, straight from its [N, K]
// layout, while the rows of x stay in L1: the product runs at the memory's rate (BLAS reads such a weight at a
// fraction of it). Several independent sums per loop (4 weight rows against one x row; 2 weight rows against 4 x
// rows) keep the FMA units busy; each sum is vectorised over k.
namespace {

template <typename T>
inline T dot(const T* a, const T* b, int64_t K) {
  T s = 0;
_Pragma("omp simd reduction(+ : s)")
  for (int64_t k = 0; k < K; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>  // 4 weight rows . one x row -> y[0..3]
inline void rows4_x1(const T* w, int64_t K, const T* x, T* y) {
  const T *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
_Pragma("omp simd reduction(+ : a0, a1, a2, a3)")
  for (int64_t k = 0; k < K; ++k) {
    const T xk = x[k];
    a0 += w0[k] * xk;
    a1 += w1[k] * xk;
    a2 += w2[k] * xk;
    a3 += w3[k] * xk;
  }
  y[0] = a0, y[1] = a1, y[2] = a2, y[3] = a3;
}

template <typename T>  // 2 weight rows . 4 x rows (x rows K apart) -> y[m * ldy + {0, 1}]
inline void rows2_x4(const T* w, int64_t K, const T* x, T* y, int64_t ldy) {
  const T *w0 = w, *w1 = w + K, *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
_Pragma("omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)")
  for (int64_t k = 0; k < K; ++k) {
    const T u = w0[k], v = w1[k], p = x0[k], q = x1[k], r = x2[k], s = x3[k];
    a0 += u * p, a1 += u * q, a2 += u * r, a3 += u * s;
    b0 += v * p, b1 += v * q, b2 += v * r, b3 += v * s;
  }
  y[0] = a0, y[ldy] = a1, y[2 * ldy] = a2, y[3 * ldy] = a3;
  y[1] = b0, y[ldy + 1] = b1, y[2 * ldy + 1] = b2, y[3 * ldy + 1] = b3;
}

template <typename T>  // weight rows [begin, end) against every x row
void decode_rows(const T* X, const T* W, T* Y, int64_t M, int64_t K, int64_t N, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {  // 4 weight rows at a time (in L1 after the first x row)
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      rows2_x4(W + n * K, K, X + m * K, Y + m * N + n, N);
      rows2_x4(W + (n + 2) * K, K, X + m * K, Y + m * N + n + 2, N);
    }
    for (; m < M; ++m) rows4_x1(W + n * K, K, X + m * K, Y + m * N + n);
  }
  for (; n < end; ++n)
    for (int64_t m = 0; m < M; ++m) Y[m * N + n] = dot(W + n * K, X + m * K, K);
}

}  // namespace

at::Tensor decode_linear_cpu(const at::Tensor& x_, const at::Tensor& w_) {
  TORCH_CHECK(x_.dim() == 2 && w_.dim() == 2 && x_.size(1) == w_.size(1), "decode_linear: x [M, K] and weight [N, K]");
  TORCH_CHECK(x_.scalar_type() == w_.scalar_type(), "decode_linear: x and weight differ in dtype");
  auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_linear", [&] {
    const scalar_t *X = x.data_ptr<scalar_t>(), *W = w.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    // (at least 64 weight rows a task: a 576-wide layer's 576 rows go to 2 threads, not to 9 tiny tasks)
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { decode_rows(X, W, Y, M, K, N, begin, end); });
  });
  return y;
}

}  // namespace megatrain
