// CPU implementations: one pass over each row, OpenMP-parallel over rows (at::parallel_for), inner
// loops written so the compiler vectorises them; accumulation in float (double for double inputs).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  auto rstd = at::empty({N}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * D;
        acc_t ss = 0;
_Pragma("omp simd reduction(+ : ss)")
        for (int64_t i = 0; i < D; ++i) ss += acc_t(xr[i]) * acc_t(xr[i]);
        const acc_t inv = acc_t(1) / std::sqrt(ss / acc_t(D) + acc_t(eps));
        rp[r] = inv;
        scalar_t* yr = yp + r * D;
        // as the reference: normalise in float, round to the input dtype, then scale by the weight
        for (int64_t i = 0; i < D; ++i) yr[i] = scalar_t(acc_t(scalar_t(acc_t(xr[i]) * inv)) * acc_t(wp[i]));
      }
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                                                    const at::Tensor& rstd_) {
  auto dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RowReduction dw(D, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      acc_t* dwp = dw.mine<acc_t>();
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t *xr = xp + r * D, *dyr = dyp + r * D;
        const acc_t inv = rp[r];
        acc_t dot = 0;  // sum(dy * w * xhat)
_Pragma("omp simd reduction(+ : dot)")
        for (int64_t i = 0; i < D; ++i) {
          const acc_t xhat = acc_t(xr[i]) * inv;
          dot += acc_t(dyr[i]) * acc_t(wp[i]) * xhat;
          dwp[i] += acc_t(dyr[i]) * xhat;
        }
        const acc_t c = dot / acc_t(D);
        scalar_t* dxr = dxp + r * D;
        for (int64_t i = 0; i < D; ++i) {
          const acc_t xhat = acc_t(xr[i]) * inv;
          dxr[i] = scalar_t(inv * (acc_t(dyr[i]) * acc_t(wp[i]) - xhat * c));
        }
      }
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
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mean = at::empty({N}, x.options().dtype(acc_type));
  auto rstd = at::empty({N}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * D;
        acc_t s = 0;
_Pragma("omp simd reduction(+ : s)")
        for (int64_t i = 0; i < D; ++i) s += acc_t(xr[i]);
        const acc_t mu = s / acc_t(D);
        acc_t v = 0;
_Pragma("omp simd reduction(+ : v)")
        for (int64_t i = 0; i < D; ++i) {
          const acc_t d = acc_t(xr[i]) - mu;
          v += d * d;
        }
        const acc_t inv = acc_t(1) / std::sqrt(v / acc_t(D) + acc_t(eps));
        mp[r] = mu;
        rp[r] = inv;
        scalar_t* yr = yp + r * D;
        for (int64_t i = 0; i < D; ++i) {
          acc_t o = (acc_t(xr[i]) - mu) * inv * acc_t(wp[i]);
          if (bp) o += acc_t(bp[i]);
          yr[i] = scalar_t(o);
        }
      }
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
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RowReduction dw(D, acc_type), db(D, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "layer_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const acc_t *mp = mean.data_ptr<acc_t>(), *rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      acc_t *dwp = dw.mine<acc_t>(), *dbp = db.mine<acc_t>();
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t *xr = xp + r * D, *dyr = dyp + r * D;
        const acc_t mu = mp[r], inv = rp[r];
        acc_t sum_g = 0, sum_gx = 0;  // g = dy * w
_Pragma("omp simd reduction(+ : sum_g, sum_gx)")
        for (int64_t i = 0; i < D; ++i) {
          const acc_t xhat = (acc_t(xr[i]) - mu) * inv;
          const acc_t g = acc_t(dyr[i]) * acc_t(wp[i]);
          sum_g += g;
          sum_gx += g * xhat;
          dwp[i] += acc_t(dyr[i]) * xhat;
          dbp[i] += acc_t(dyr[i]);
        }
        const acc_t a = sum_g / acc_t(D), c = sum_gx / acc_t(D);
        scalar_t* dxr = dxp + r * D;
        for (int64_t i = 0; i < D; ++i) {
          const acc_t xhat = (acc_t(xr[i]) - mu) * inv;
          dxr[i] = scalar_t(inv * (acc_t(dyr[i]) * acc_t(wp[i]) - a - xhat * c));
        }
      }
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
    at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        const float *c = cp + t * D, *s = sp + t * D;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* xr = xp + b * sb + t * st + h * sh;
          scalar_t* o = op + ((bt * H) + h) * D;
          for (int64_t i = 0; i < half; ++i)
            o[i] = scalar_t(acc_t(xr[i]) * acc_t(c[i]) - acc_t(xr[i + half]) * acc_t(sign * s[i]));
          for (int64_t i = half; i < D; ++i)
            o[i] = scalar_t(acc_t(xr[i]) * acc_t(c[i]) + acc_t(xr[i - half]) * acc_t(sign * s[i]));
        }
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
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t *g = gp + r * 2 * F, *u = g + F;
        scalar_t* yr = yp + r * F;
        for (int64_t i = 0; i < F; ++i) {
          const acc_t a = acc_t(g[i]);
          yr[i] = scalar_t(a * vsigmoid(a) * acc_t(u[i]));
        }
      }
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
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t *g = gp + r * 2 * F, *u = g + F, *d = dyp + r * F;
        scalar_t *dg = dp + r * 2 * F, *du = dg + F;
        for (int64_t i = 0; i < F; ++i) {
          const acc_t a = acc_t(g[i]), s = vsigmoid(a);
          dg[i] = scalar_t(acc_t(d[i]) * acc_t(u[i]) * s * (acc_t(1) + a * (acc_t(1) - s)));
          du[i] = scalar_t(acc_t(d[i]) * a * s);
        }
      }
    });
  });
  return dgu;
}

namespace {
template <typename acc_t>
inline void gelu_tanh(acc_t h, acc_t* out, acc_t* grad) {
  const acc_t k0 = acc_t(0.7978845608028654), k1 = acc_t(0.044715);
  const acc_t inner = k0 * (h + k1 * h * h * h);
  const acc_t t = vtanh(inner);
  if (out) *out = acc_t(0.5) * h * (acc_t(1) + t);
  if (grad) *grad = acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * h * (acc_t(1) - t * t) * k0 * (acc_t(1) + acc_t(3) * k1 * h * h);
}
}  // namespace

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x_, const at::Tensor& b_) {
  auto x = x_.contiguous(), b = b_.contiguous();
  const int64_t F = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t i = 0; i < F; ++i) {
          acc_t o;
          gelu_tanh<acc_t>(acc_t(xp[r * F + i]) + acc_t(bp[i]), &o, nullptr);
          yp[r * F + i] = scalar_t(o);
        }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& b_) {
  auto dy = dy_.contiguous(), x = x_.contiguous(), b = b_.contiguous();
  const int64_t F = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  RowReduction db(F, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bias_gelu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>(), *dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      acc_t* dbp = db.mine<acc_t>();
      for (int64_t r = begin; r < end; ++r)
        for (int64_t i = 0; i < F; ++i) {
          acc_t g;
          gelu_tanh<acc_t>(acc_t(xp[r * F + i]) + acc_t(bp[i]), nullptr, &g);
          const acc_t d = acc_t(dyp[r * F + i]) * g;
          dxp[r * F + i] = scalar_t(d);
          dbp[i] += d;
        }
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
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(acc_type);
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
        acc_t m = -std::numeric_limits<acc_t>::infinity(), all = 0;
_Pragma("omp simd reduction(max : m) reduction(+ : all)")
        for (int64_t i = 0; i < V; ++i) {
          m = std::max(m, acc_t(l[i]));
          all += acc_t(l[i]);
        }
        acc_t s = 0;
_Pragma("omp simd reduction(+ : s)")
        for (int64_t i = 0; i < V; ++i) s += vexp(acc_t(l[i]) - m);
        const int64_t local = yp[r] - vocab_start;
        mp[r] = m;
        sp[r] = s;
        ap[r] = all;
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
        const acc_t z = zp[r], g = gp[r];
        for (int64_t i = 0; i < V; ++i) o[i] = scalar_t(g * (vexp(acc_t(l[i]) - z) - uniform));
        const int64_t local = yp[r] - vocab_start;
        if (local >= 0 && local < V) o[local] = scalar_t(acc_t(o[local]) - g * (acc_t(1) - eps));
      }
    });
  });
  return out;
}

}  // namespace megatrain
