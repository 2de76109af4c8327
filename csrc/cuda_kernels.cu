// CUDA implementations of the ops declared in registration.cpp. Row ops (norms, cross-entropy) use one
// block per row with warp-shuffle reductions; elementwise ops a grid-stride loop; weight/bias gradients
// a column-parallel reduction over rows (coalesced: neighbouring threads read neighbouring columns).
// Accumulation is in float (double for double inputs).
// Each header this file uses is named: torch's CUDA headers include fewer of ATen's in some releases than in others.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "ops.h"

namespace megatrain {
namespace {

constexpr int kThreads = 256;

int64_t rows_of(const at::Tensor& x) { return x.numel() / std::max<int64_t>(x.size(-1), 1); }

// How a column reduction over N rows is split: at least 64 rows a chunk, at most 1024 chunks.
struct RowChunks {
  int64_t rows, count;
};
RowChunks row_chunks(int64_t N) {
  const int64_t rows = std::max<int64_t>(64, (N + 1023) / 1024);
  return {rows, (N + rows - 1) / rows};
}

dim3 column_grid(int64_t columns, const RowChunks& c) {
  return dim3(static_cast<unsigned>((columns + kThreads - 1) / kThreads), static_cast<unsigned>(c.count));
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8)); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffff, v, o));
  return v;
}

// Sum (or max) over the block; every thread gets the result.
template <typename T, bool kMax>
__device__ T block_reduce(T v) {
  __shared__ T shared[32];
  __shared__ T result;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) / 32;
  T init = kMax ? -std::numeric_limits<T>::infinity() : T(0);
  v = threadIdx.x < n_warps ? shared[threadIdx.x] : init;
  if (warp == 0) {
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// ---- RMSNorm ----------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void rms_fwd_kernel(const scalar_t* x, const scalar_t* w, scalar_t* y, acc_t* rstd, int64_t D, acc_t eps) {
  const int64_t r = blockIdx.x;
  const scalar_t* xr = x + r * D;
  acc_t ss = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += acc_t(xr[i]) * acc_t(xr[i]);
  ss = block_reduce<acc_t, false>(ss);
  const acc_t inv = acc_t(1) / sqrt(ss / acc_t(D) + eps);
  if (threadIdx.x == 0) rstd[r] = inv;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    y[r * D + i] = scalar_t(acc_t(scalar_t(acc_t(xr[i]) * inv)) * acc_t(w[i]));
}

template <typename scalar_t, typename acc_t>
__global__ void rms_bwd_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_t* rstd,
                               scalar_t* dx, int64_t D) {
  const int64_t r = blockIdx.x;
  const scalar_t *xr = x + r * D, *dyr = dy + r * D;
  const acc_t inv = rstd[r];
  acc_t dot = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) dot += acc_t(dyr[i]) * acc_t(w[i]) * acc_t(xr[i]) * inv;
  dot = block_reduce<acc_t, false>(dot);
  const acc_t c = dot / acc_t(D);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    dx[r * D + i] = scalar_t(inv * (acc_t(dyr[i]) * acc_t(w[i]) - acc_t(xr[i]) * inv * c));
}

// d weight (and d bias) = sum over rows of dy * xhat (and dy); one thread per column.
// Weight (and bias) gradients of a norm: the grid is (column tiles, row chunks); each thread sums its column over
// its chunk of rows into part[chunk][column] (neighbouring threads read neighbouring columns), and the chunks are then
// summed by at::sum: enough blocks to fill the GPU however few the columns, and no atomics (the same sums each run).
template <typename scalar_t, typename acc_t>
__global__ void norm_param_grad_kernel(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* rstd,
                                       acc_t* dw_part, acc_t* db_part, int64_t N, int64_t D, int64_t rows_per_chunk) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= D) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = std::min<int64_t>(N, r0 + rows_per_chunk);
  acc_t sw = 0, sb = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t g = acc_t(dy[r * D + i]);
    const acc_t mu = mean ? mean[r] : acc_t(0);
    sw += g * (acc_t(x[r * D + i]) - mu) * rstd[r];
    sb += g;
  }
  dw_part[blockIdx.y * D + i] = sw;
  if (db_part) db_part[blockIdx.y * D + i] = sb;
}

// ---- LayerNorm --------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void ln_fwd_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, acc_t* mean,
                              acc_t* rstd, int64_t D, acc_t eps) {
  const int64_t r = blockIdx.x;
  const scalar_t* xr = x + r * D;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) s += acc_t(xr[i]);
  const acc_t mu = block_reduce<acc_t, false>(s) / acc_t(D);
  acc_t v = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const acc_t d = acc_t(xr[i]) - mu;
    v += d * d;
  }
  const acc_t inv = acc_t(1) / sqrt(block_reduce<acc_t, false>(v) / acc_t(D) + eps);
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = inv;
  }
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    acc_t o = (acc_t(xr[i]) - mu) * inv * acc_t(w[i]);
    if (b) o += acc_t(b[i]);
    y[r * D + i] = scalar_t(o);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void ln_bwd_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_t* mean,
                              const acc_t* rstd, scalar_t* dx, int64_t D) {
  const int64_t r = blockIdx.x;
  const scalar_t *xr = x + r * D, *dyr = dy + r * D;
  const acc_t mu = mean[r], inv = rstd[r];
  acc_t sg = 0, sgx = 0;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const acc_t g = acc_t(dyr[i]) * acc_t(w[i]);
    sg += g;
    sgx += g * (acc_t(xr[i]) - mu) * inv;
  }
  const acc_t a = block_reduce<acc_t, false>(sg) / acc_t(D);
  const acc_t c = block_reduce<acc_t, false>(sgx) / acc_t(D);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x)
    dx[r * D + i] = scalar_t(inv * (acc_t(dyr[i]) * acc_t(w[i]) - a - (acc_t(xr[i]) - mu) * inv * c));
}

// ---- RoPE, SwiGLU, bias-GeLU ------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void rope_kernel(const scalar_t* x, const float* cos, const float* sin, scalar_t* out, int64_t B, int64_t T,
                            int64_t H, int64_t D, int64_t sb, int64_t st, int64_t sh, float sign) {
  const int64_t n = B * T * H * D, half = D / 2;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % D, h = (idx / D) % H, t = (idx / (D * H)) % T, b = idx / (D * H * T);
    const scalar_t* xr = x + b * sb + t * st + h * sh;
    const acc_t c = cos[t * D + i], s = sign * sin[t * D + i];
    const acc_t other = i < half ? -acc_t(xr[i + half]) : acc_t(xr[i - half]);
    out[idx] = scalar_t(acc_t(xr[i]) * c + other * s);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void swiglu_fwd_kernel(const scalar_t* gu, scalar_t* y, int64_t N, int64_t F) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < N * F; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / F, i = idx % F;
    const acc_t a = acc_t(gu[r * 2 * F + i]), u = acc_t(gu[r * 2 * F + F + i]);
    y[idx] = scalar_t(a / (acc_t(1) + exp(-a)) * u);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void swiglu_bwd_kernel(const scalar_t* dy, const scalar_t* gu, scalar_t* dgu, int64_t N, int64_t F) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < N * F; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / F, i = idx % F;
    const acc_t a = acc_t(gu[r * 2 * F + i]), u = acc_t(gu[r * 2 * F + F + i]), d = acc_t(dy[idx]);
    const acc_t s = acc_t(1) / (acc_t(1) + exp(-a));
    dgu[r * 2 * F + i] = scalar_t(d * u * s * (acc_t(1) + a * (acc_t(1) - s)));
    dgu[r * 2 * F + F + i] = scalar_t(d * a * s);
  }
}

template <typename acc_t>
__device__ __forceinline__ void gelu_tanh(acc_t h, acc_t* out, acc_t* grad) {
  const acc_t k0 = acc_t(0.7978845608028654), k1 = acc_t(0.044715);
  const acc_t t = tanh(k0 * (h + k1 * h * h * h));
  if (out) *out = acc_t(0.5) * h * (acc_t(1) + t);
  if (grad) *grad = acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * h * (acc_t(1) - t * t) * k0 * (acc_t(1) + acc_t(3) * k1 * h * h);
}

template <typename scalar_t, typename acc_t>
__global__ void bias_gelu_fwd_kernel(const scalar_t* x, const scalar_t* b, scalar_t* y, int64_t N, int64_t F) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < N * F; idx += int64_t(gridDim.x) * blockDim.x) {
    acc_t o;
    gelu_tanh<acc_t>(acc_t(x[idx]) + acc_t(b[idx % F]), &o, nullptr);
    y[idx] = scalar_t(o);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bias_gelu_bwd_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* b, scalar_t* dx, int64_t N,
                                     int64_t F) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < N * F; idx += int64_t(gridDim.x) * blockDim.x) {
    acc_t g;
    gelu_tanh<acc_t>(acc_t(x[idx]) + acc_t(b[idx % F]), nullptr, &g);
    dx[idx] = scalar_t(acc_t(dy[idx]) * g);
  }
}

// Column sums of an [N, F] matrix (a bias gradient), over row chunks as norm_param_grad_kernel does.
template <typename scalar_t, typename acc_t>
__global__ void column_sum_kernel(const scalar_t* x, acc_t* part, int64_t N, int64_t F, int64_t rows_per_chunk) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= F) return;
  const int64_t r0 = blockIdx.y * rows_per_chunk, r1 = std::min<int64_t>(N, r0 + rows_per_chunk);
  acc_t s = 0;
  for (int64_t r = r0; r < r1; ++r) s += acc_t(x[r * F + i]);
  part[blockIdx.y * F + i] = s;
}

// ---- cross-entropy ----------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void ce_stats_kernel(const scalar_t* logits, const int64_t* labels, acc_t* mx, acc_t* sumexp, acc_t* target,
                                acc_t* total, int64_t V, int64_t vocab_start, int64_t ignore_index) {
  const int64_t r = blockIdx.x;
  const scalar_t* l = logits + r * V;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), all = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    m = max(m, acc_t(l[i]));
    all += acc_t(l[i]);
  }
  m = block_reduce<acc_t, true>(m);
  all = block_reduce<acc_t, false>(all);
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) s += exp(acc_t(l[i]) - m);
  s = block_reduce<acc_t, false>(s);
  if (threadIdx.x == 0) {
    const int64_t local = labels[r] - vocab_start;
    mx[r] = m;
    sumexp[r] = s;
    total[r] = all;
    target[r] = (labels[r] != ignore_index && local >= 0 && local < V) ? acc_t(l[local]) : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void ce_grad_kernel(const scalar_t* logits, const int64_t* labels, const acc_t* lse, const acc_t* grad_rows,
                               scalar_t* out, int64_t V, int64_t vocab_start, int64_t ignore_index, acc_t eps,
                               acc_t uniform) {
  const int64_t r = blockIdx.x;
  const scalar_t* l = logits + r * V;
  scalar_t* o = out + r * V;
  const bool ignored = labels[r] == ignore_index;
  const int64_t local = labels[r] - vocab_start;
  const acc_t z = lse[r], g = grad_rows[r];
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    acc_t v = ignored ? acc_t(0) : g * (exp(acc_t(l[i]) - z) - uniform - (i == local ? acc_t(1) - eps : acc_t(0)));
    o[i] = scalar_t(v);
  }
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

#define MT_DISPATCH(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  auto rstd = at::empty({N}, x.options().dtype(acc_type_of(x)));
  if (N == 0) return {y, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  MT_DISPATCH(x.scalar_type(), "rms_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_fwd_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                                                 y.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(), D, acc_t(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& w_,
                                                     const at::Tensor& rstd_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  if (N == 0) return {dx, at::zeros({D}, w.options())};
  const RowChunks chunks = row_chunks(N);
  auto dw_part = at::empty({chunks.count, D}, x.options().dtype(acc_type_of(x)));
  auto stream = at::cuda::getCurrentCUDAStream();
  MT_DISPATCH(x.scalar_type(), "rms_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rms_bwd_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                                 w.data_ptr<scalar_t>(), rstd.data_ptr<acc_t>(),
                                                                 dx.data_ptr<scalar_t>(), D);
    norm_param_grad_kernel<scalar_t, acc_t><<<column_grid(D, chunks), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), nullptr, rstd.data_ptr<acc_t>(), dw_part.data_ptr<acc_t>(),
        nullptr, N, D, chunks.rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw_part.sum(0).to(w.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x_, const at::Tensor& w_,
                                                                   const c10::optional<at::Tensor>& b_, double eps) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), w = w_.contiguous();
  at::Tensor b = b_.has_value() ? b_->contiguous() : at::Tensor();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(acc_type_of(x))), rstd = at::empty_like(mean);
  if (N == 0) return {y, mean, rstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  MT_DISPATCH(x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ln_fwd_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), D, acc_t(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& dy_, const at::Tensor& x_,
                                                                   const at::Tensor& w_, const at::Tensor& mean_,
                                                                   const at::Tensor& rstd_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto dy = dy_.contiguous(), x = x_.contiguous(), w = w_.contiguous();
  auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t D = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  if (N == 0) return {dx, at::zeros({D}, w.options()), at::zeros({D}, w.options())};
  const RowChunks chunks = row_chunks(N);
  auto dw_part = at::empty({chunks.count, D}, x.options().dtype(acc_type_of(x))), db_part = at::empty_like(dw_part);
  auto stream = at::cuda::getCurrentCUDAStream();
  MT_DISPATCH(x.scalar_type(), "layer_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ln_bwd_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                                w.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                                                                rstd.data_ptr<acc_t>(), dx.data_ptr<scalar_t>(), D);
    norm_param_grad_kernel<scalar_t, acc_t><<<column_grid(D, chunks), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        dw_part.data_ptr<acc_t>(), db_part.data_ptr<acc_t>(), N, D, chunks.rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw_part.sum(0).to(w.scalar_type()), db_part.sum(0).to(w.scalar_type())};
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_, bool inverse) {
  TORCH_CHECK(x.dim() == 4 && x.stride(-1) == 1, "rope: x must be [B, T, H, D] with a contiguous last dim");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  auto cos = cos_.to(at::kFloat).contiguous(), sin = sin_.to(at::kFloat).contiguous();
  auto out = at::empty({B, T, H, D}, x.options());
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  MT_DISPATCH(x.scalar_type(), "rope_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rope_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<scalar_t>(), B, T, H, D,
        x.stride(0), x.stride(1), x.stride(2), inverse ? -1.f : 1.f);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gu_) {
  const c10::cuda::CUDAGuard guard(gu_.device());
  auto gu = gu_.contiguous();
  const int64_t F = gu.size(-1) / 2, N = rows_of(gu);
  auto sizes = gu.sizes().vec();
  sizes.back() = F;
  auto y = at::empty(sizes, gu.options());
  if (y.numel() == 0) return y;
  MT_DISPATCH(gu.scalar_type(), "swiglu_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    swiglu_fwd_kernel<scalar_t, acc_t><<<blocks_for(N * F), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        gu.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, F);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor swiglu_bwd_cuda(const at::Tensor& dy_, const at::Tensor& gu_) {
  const c10::cuda::CUDAGuard guard(gu_.device());
  auto dy = dy_.contiguous(), gu = gu_.contiguous();
  const int64_t F = gu.size(-1) / 2, N = rows_of(gu);
  auto dgu = at::empty_like(gu);
  if (dgu.numel() == 0) return dgu;
  MT_DISPATCH(gu.scalar_type(), "swiglu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    swiglu_bwd_kernel<scalar_t, acc_t><<<blocks_for(N * F), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        dy.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(), dgu.data_ptr<scalar_t>(), N, F);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dgu;
}

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x_, const at::Tensor& b_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), b = b_.contiguous();
  const int64_t F = x.size(-1), N = rows_of(x);
  auto y = at::empty_like(x);
  if (y.numel() == 0) return y;
  MT_DISPATCH(x.scalar_type(), "bias_gelu_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_gelu_fwd_kernel<scalar_t, acc_t><<<blocks_for(N * F), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, F);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& b_) {
  const c10::cuda::CUDAGuard guard(x_.device());
  auto dy = dy_.contiguous(), x = x_.contiguous(), b = b_.contiguous();
  const int64_t F = x.size(-1), N = rows_of(x);
  auto dx = at::empty_like(x);
  if (dx.numel() == 0) return {dx, at::zeros({F}, b.options())};
  const RowChunks chunks = row_chunks(N);
  auto db_part = at::empty({chunks.count, F}, x.options().dtype(acc_type_of(x)));
  auto stream = at::cuda::getCurrentCUDAStream();
  MT_DISPATCH(x.scalar_type(), "bias_gelu_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_gelu_bwd_kernel<scalar_t, acc_t><<<blocks_for(N * F), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), N, F);
    column_sum_kernel<scalar_t, acc_t><<<column_grid(F, chunks), kThreads, 0, stream>>>(
        dx.data_ptr<scalar_t>(), db_part.data_ptr<acc_t>(), N, F, chunks.rows);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, db_part.sum(0).to(b.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_stats_cuda(const at::Tensor& logits_,
                                                                         const at::Tensor& labels_, int64_t vocab_start,
                                                                         int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits_.device());
  auto logits = logits_.contiguous();
  auto labels = labels_.contiguous().to(at::kLong);
  const int64_t V = logits.size(-1), N = rows_of(logits);
  auto opts = logits.options().dtype(acc_type_of(logits));
  auto mx = at::empty({N}, opts), sumexp = at::empty({N}, opts), target = at::empty({N}, opts), total = at::empty({N}, opts);
  if (N == 0) return {mx, sumexp, target, total};
  MT_DISPATCH(logits.scalar_type(), "ce_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_stats_kernel<scalar_t, acc_t><<<N, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), mx.data_ptr<acc_t>(), sumexp.data_ptr<acc_t>(),
        target.data_ptr<acc_t>(), total.data_ptr<acc_t>(), V, vocab_start, ignore_index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mx, sumexp, target, total};
}

at::Tensor ce_grad_cuda(const at::Tensor& logits_, const at::Tensor& labels_, const at::Tensor& lse_,
                        const at::Tensor& grad_rows_, int64_t vocab_start, int64_t ignore_index, double smoothing,
                        int64_t vocab_total, bool inplace) {
  TORCH_CHECK(!inplace || logits_.is_contiguous(), "ce_grad: in-place needs contiguous logits");
  const c10::cuda::CUDAGuard guard(logits_.device());
  auto logits = logits_.contiguous();
  auto labels = labels_.contiguous().to(at::kLong);
  auto lse = lse_.contiguous(), grad_rows = grad_rows_.contiguous();
  const int64_t V = logits.size(-1), N = rows_of(logits);
  auto out = inplace ? logits : at::empty_like(logits);
  if (N == 0) return out;
  MT_DISPATCH(logits.scalar_type(), "ce_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_grad_kernel<scalar_t, acc_t><<<N, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), lse.data_ptr<acc_t>(), grad_rows.data_ptr<acc_t>(),
        out.data_ptr<scalar_t>(), V, vocab_start, ignore_index, acc_t(smoothing), acc_t(smoothing / double(vocab_total)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace megatrain

TORCH_LIBRARY_IMPL(megatrain, CUDA, m) {
  m.impl("rms_norm_fwd", &megatrain::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &megatrain::rms_norm_bwd_cuda);
  m.impl("layer_norm_fwd", &megatrain::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &megatrain::layer_norm_bwd_cuda);
  m.impl("rope", &megatrain::rope_cuda);
  m.impl("swiglu_fwd", &megatrain::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &megatrain::swiglu_bwd_cuda);
  m.impl("bias_gelu_fwd", &megatrain::bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &megatrain::bias_gelu_bwd_cuda);
  m.impl("ce_stats", &megatrain::ce_stats_cuda);
  m.impl("ce_grad", &megatrain::ce_grad_cuda);
}
