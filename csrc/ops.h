// megatrain fused ops: one schema (registration.cpp), a CPU implementation (cpu_kernels.cpp) and a
// CUDA one (cuda_kernels.cu). Every op is functional; autograd lives in megatrain/kernels/ops.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace megatrain {

// RMSNorm / LayerNorm over the last dimension of a [rows, dim] tensor.
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w, double eps);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                    const at::Tensor& rstd);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                                  const c10::optional<at::Tensor>& b, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& w, const at::Tensor& mean,
                                                                  const at::Tensor& rstd);
// Rotary embedding of x [B, T, H, D] (last dim contiguous) with cos/sin [T, D] (rotate-half layout).
// inverse=true rotates by -theta: the backward pass.
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
// SwiGLU on the fused [rows, 2F] projection (gate | up) -> [rows, F]; backward gives d(gate | up).
at::Tensor swiglu_fwd_cpu(const at::Tensor& gate_up);
at::Tensor swiglu_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate_up);
// GeLU (tanh approximation) of x + bias; backward gives (dx, dbias).
at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bias);
// Cross-entropy statistics of a [rows, V_local] logits shard that starts at global id vocab_start:
// (row max, sum exp(logit - max), the label's logit or 0 when not in this shard, sum of logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_stats_cpu(const at::Tensor& logits,
                                                                        const at::Tensor& labels, int64_t vocab_start,
                                                                        int64_t ignore_index);
// d loss / d logits = g_row * (softmax - (1 - eps) * onehot - eps / V), 0 on ignored rows; written into
// `logits` itself when inplace (the probabilities are never stored).
at::Tensor ce_grad_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const at::Tensor& grad_rows, int64_t vocab_start, int64_t ignore_index, double smoothing,
                       int64_t vocab_total, bool inplace);
// A decoding step's product x [M, K] @ weight [N, K]^T for a few rows (M <= 16), reading the weight once at the
// memory's rate (CPU only: decode_matmul.py calls it for CPU decoding steps).
at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight);

}  // namespace megatrain
