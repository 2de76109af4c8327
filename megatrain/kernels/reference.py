"""The plain PyTorch version of every fused op: the fallback, and what the kernels are tested against.

Also the rules both sides share: the RoPE tables (the model builds them, rope takes them) and the cross-entropy
over logits split along the vocabulary (the tensor-parallel loss; ops.cross_entropy falls back to it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are stretched (model.rope_scaling and its keys)."""

    kind: str  # linear | llama3 | yarn
    factor: float
    original_max_len: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] (float64) and the factor cos/sin are multiplied by (YaRN's
    attention factor; 1 otherwise)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    f = scaling.factor
    if scaling.kind == "linear":  # positions / factor
        return inv_freq / f, 1.0
    if scaling.kind == "llama3":  # long wavelengths stretched by factor, short ones kept, a linear blend between
        wavelen = 2 * math.pi / inv_freq
        orig = scaling.original_max_len
        stretched = torch.where(wavelen > orig / scaling.low_freq_factor, inv_freq / f, inv_freq)
        blend = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        between = (wavelen >= orig / scaling.high_freq_factor) & (wavelen <= orig / scaling.low_freq_factor)
        return torch.where(between, (1 - blend) * inv_freq / f + blend * inv_freq, stretched), 1.0
    # yarn: frequencies that turn fewer than beta_slow times over the original context are interpolated (/ factor),
    # those turning more than beta_fast times kept, a linear ramp over the dimensions between; and the attention
    # logits sharpened by 0.1 ln(factor) + 1 (applied to cos and sin, so to q.k twice: as YaRN does)
    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times
        return head_dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_of(scaling.beta_fast)), 0)
    high = min(math.ceil(dim_of(scaling.beta_slow)), head_dim - 1)
    dims = torch.arange(head_dim // 2, dtype=torch.float64, device="cpu")  # (CPU inside a meta-device build too)
    ramp = ((dims - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / f * ramp + inv_freq * (1 - ramp)
    return inv_freq, (0.1 * math.log(f) + 1.0) if f > 1 else 1.0


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: RopeScaling | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_len, head_dim] for the rotate-half convention."""
    # always computed on the CPU (also inside a meta-device build: the tables are a function of the config)
    inv_freq, gain = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * gain).float(), (angles.sin() * gain).float()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos/sin [T, D], or [B, T, D] per row (rotate-half layout)."""
    half = x.shape[-1] // 2
    if cos.dim() == 3:
        c, s = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    else:
        c, s = cos[: x.shape[1], None, :].to(x.dtype), sin[: x.shape[1], None, :].to(x.dtype)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * c + rotated * s


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Gemma's gated MLP: tanh-GeLU of the gate times up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias, approximate="tanh")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over non-ignored rows."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> torch.Tensor:
    """The LM head and the loss, with the full [tokens, vocab] logits in memory."""
    return cross_entropy(hidden @ weight.t(), labels, ignore_index, label_smoothing)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary, without gathering them: three all-reduces
    of [tokens]-sized tensors (max, sum of exp, target logit). Backward: softmax - one_hot, locally."""

    @staticmethod
    def forward(ctx, logits, labels, group, ignore_index):
        logits = logits.float()
        v_local = logits.shape[-1]
        start = dist.get_rank(group) * v_local
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        local = labels - start
        valid = labels != ignore_index
        mine = (local >= 0) & (local < v_local) & valid
        target = torch.zeros_like(row_max)
        idx = local.clamp(0, v_local - 1)
        target[mine] = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1)[mine]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack([sum_exp, target])
        dist.all_reduce(both, group=group)
        sum_exp, target = both[0], both[1]
        loss = (sum_exp.log() - target) * valid
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(exp, sum_exp, idx, mine, valid)
        ctx.count = count
        return loss.sum() / count

    @staticmethod
    def backward(ctx, g):
        exp, sum_exp, idx, mine, valid = ctx.saved_tensors
        grad = exp / sum_exp.unsqueeze(-1)  # softmax, this rank's slice of the vocabulary
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad *= (valid.to(grad.dtype) * (g / ctx.count)).unsqueeze(-1)
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits, labels, group, ignore_index: int = -100):
    """Mean cross-entropy of [..., V/tp] logit shards against global labels."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group, ignore_index)
