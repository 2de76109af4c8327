"""Task heads on the plain Transformer, LoRA adapters and freezing: the model a fine-tuning run trains.

    model = build_model(cfg)   # the class finetune.task asks for, LoRA and freezing as finetune.* says

Each head is a Transformer subclass with one small linear layer on the final norm's output, so the parameter names
stay the model's own (embed.*, layers.*, norm.*) plus the head's, and every reader, converter and parallel layout
treats a fine-tuned model as it treats a pretrained one:
    SequenceClassifier  score [n_labels, d] on one pooled position per row: the last real token of a causal model
                        (it has read the whole text), the mean of a bidirectional one's real tokens, or the first
    TokenTagger         tagger [n_tags, d] on every position
    SpanExtractor       span [2, d]: start and end logits on every position
sft trains the language model itself. A head replaces the LM head, which a fine-tuned classifier does not keep.

LoRA (Hu et al. 2021) adds B @ A (rank r, B zero at the start, scaled by alpha / r) to the chosen projections and
freezes everything else but the head. On a MoE block the targets gate_up / up / down adapt every routed expert
(per-expert adapters on the stacked weights, moe.GroupedExperts.add_lora) and the shared expert's projections.
Under tensor parallelism apply_tp cuts B like a column-parallel weight's rows
and A like a row-parallel weight's columns (parallel/sharding.py), so the adapters split as the weights they adapt.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain import cpu_linear
from megatrain.config import LM_TASKS, Config, ModelConfig
from megatrain.model import IGNORE_INDEX, Transformer
from megatrain.moe import MoE

LORA_TARGETS = ("qkv", "o_proj", "gate_up", "up", "down")  # the projections a block has that LoRA can adapt


class _Headed(Transformer):
    """A Transformer whose LM head is replaced by a task head `self.<head_name>`."""

    head_name = "head"

    def __init__(self, cfg: ModelConfig, n_out: int):
        super().__init__(cfg)
        self.lm_head = None  # not kept: the task head reads the same final-norm output
        layer = nn.Linear(cfg.d_model, n_out)
        if layer.weight.device.type != "meta":
            nn.init.normal_(layer.weight, 0.0, cfg.init_std)
            nn.init.zeros_(layer.bias)
        setattr(self, self.head_name, layer)


class SequenceClassifier(_Headed):
    head_name = "score"

    def __init__(self, cfg: ModelConfig, n_labels: int, pooling: str = "auto"):
        super().__init__(cfg, n_labels)
        self.pooling = ("last" if cfg.objective == "causal" else "mean") if pooling == "auto" else pooling

    def pooled_positions(self, tokens: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor | None:
        """[B]: the flat position in [B * T] of the token each row is scored on, for "last" and "first" pooling
        (segments: 1 on real tokens, 0 on padding); None for "mean", which reads every real token."""
        B, T = tokens.shape
        starts = torch.arange(B, device=tokens.device) * T
        if self.pooling == "first":
            return starts
        if self.pooling == "mean":
            return None
        real = T if segments is None else (segments > 0).long().sum(1).clamp(min=1)
        return starts + real - 1  # right padding: the last real token

    def forward(self, tokens, labels=None, cache=None, pos=0, segments=None):
        rows = self.pooled_positions(tokens, segments)
        h = self.features(tokens, segments, rows=rows)  # [B, d] at the pooled token (the last block runs only there)
        if rows is None:  # the mean of each row's real tokens
            w = (torch.ones(h.shape[:2], device=h.device) if segments is None else (segments > 0)).to(h.dtype)
            h = (h * w.unsqueeze(-1)).sum(1) / w.sum(1).clamp(min=1).unsqueeze(-1)
        logits = self.score(h).float()
        return logits if labels is None else F.cross_entropy(logits, labels)


class TokenTagger(_Headed):
    head_name = "tagger"

    def forward(self, tokens, labels=None, cache=None, pos=0, segments=None):
        logits = self.tagger(self.features(tokens, segments)).float()
        if labels is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class SpanExtractor(_Headed):
    head_name = "span"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, 2)

    def forward(self, tokens, labels=None, cache=None, pos=0, segments=None):
        """[B, T, 2] start and end logits; with labels [B, 2] (start and end token) the mean of the two
        cross-entropies. (The qa task masks positions outside the context before its own loss.)"""
        logits = self.span(self.features(tokens, segments)).float()
        if labels is None:
            return logits
        return (F.cross_entropy(logits[..., 0], labels[:, 0]) + F.cross_entropy(logits[..., 1], labels[:, 1])) / 2


def new_part_value(cfg: Config, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting value of a part a fine-tuning model adds to the pretrained one (a task head, LoRA adapters) when
    the model is built on the meta device and filled from finetune.init: drawn from a generator of its own, seeded by
    train.seed and the name, so the same whatever the layout. A head's weight ~ N(0, init_std) and its bias 0; LoRA's
    A as nn.Linear's default (kaiming uniform, a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and B = 0, so the model
    starts unchanged."""
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.zeros(shape)
    if name.endswith("lora_A"):  # (a MoE layer's experts: [E, r, in], `experts.{w}_lora_A`)
        bound = 1 / math.sqrt(shape[-1])
        t.uniform_(-bound, bound, generator=g)
    elif name.endswith(".weight"):
        t.normal_(0.0, cfg.model.init_std, generator=g)
    return t


# -- LoRA ---------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Linear):
    """A linear layer plus a trainable low-rank update: y = x W^T + b + (alpha / r) * drop(x) A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scale = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0: the model starts unchanged

    def forward(self, x):
        u = cpu_linear.linear(self.lora_dropout(x), self.lora_A)
        return add_lora_update(cpu_linear.linear(x, self.weight, self.bias), u, self.lora_B, self.scale)


def add_lora_update(y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * u B^T (u = drop(x) A^T) as one product: the scale and the sum ride in the matmul (addmm, or oneDNN's
    epilogue on a CPU in fp32), with no separate mul and add over the output. Every LoRA layer adds its update so
    (LoRALinear, the tensor-parallel layers)."""
    return _LoRAUpdate.apply(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), lora_B, scale).view(y.shape)


class _LoRAUpdate(torch.autograd.Function):
    """y + scale * u B^T, with the backward's two rank-r products in the layouts a CPU runs fastest. Autograd's own
    addmm backward takes B's gradient as g^T u (to match B^T's strides), which MKL runs at a sixth of the speed of
    (u^T g)^T for an 8-column u; and u's as g B rather than g against B^T's transpose (half the speed). Forward and
    backward on 2 cores, 1032 tokens, rank 8: 5.9 ms at 4096 outputs (15.0 through addmm's autograd), 2.7 at 2304
    (4.1). On a CPU in fp32 the forward (the sum in the product's epilogue) and u's gradient run through oneDNN
    (cpu_linear): 0.87 against 1.63 ms and 0.38 against 0.77 ms at 4096 outputs; B's stays with MKL (1.07 against
    2.9)."""

    @staticmethod
    def forward(ctx, y, u, lora_B, scale: float):
        ctx.save_for_backward(u, lora_B)
        ctx.scale = scale
        if cpu_linear.runs_here(u, lora_B):
            return cpu_linear.product_add(u, lora_B * scale, y)
        return torch.addmm(y, u, lora_B.t(), alpha=scale)

    @staticmethod
    def backward(ctx, g):
        u, lora_B = ctx.saved_tensors
        s = ctx.scale
        grad_u = None
        if ctx.needs_input_grad[1]:  # g (s B): through oneDNN, else against a transposed copy of s B^T
            grad_u = (cpu_linear.product(g, (lora_B * s).t()) if cpu_linear.runs_here(g, lora_B)
                      else g.mm((lora_B.t() * s).contiguous().t()))
        grad_B = (u * s).t().mm(g).t().contiguous() if ctx.needs_input_grad[2] else None
        return g, grad_u, grad_B, None


def apply_lora(model: Transformer, rank: int, alpha: float, dropout: float, targets: str) -> Transformer:
    """Adapters on the named projections of every block; every other parameter but a task head is frozen."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"finetune.lora_targets: {unknown[0]!r} names no projection; choose from "
                         f"{', '.join(LORA_TARGETS)}")
    found = 0
    for block in model.layers:
        for owner in _owners(block):
            for n in names:
                layer = getattr(owner, n, None)
                if isinstance(layer, nn.Linear):
                    setattr(owner, n, LoRALinear(layer, rank, alpha, dropout))
                    found += 1
        if isinstance(block.mlp, MoE):  # the routed experts: per-expert adapters on their stacked weights
            block.mlp.experts.add_lora(names, rank, alpha, dropout)
            found += len(block.mlp.experts.lora)
    if not found:
        has = [n for n in LORA_TARGETS if any(isinstance(getattr(o, n, None), nn.Linear) or
                                              isinstance(getattr(o, n, None), nn.Parameter)
                                              for o in _owners(model.layers[0]) + _experts(model.layers[0]))]
        raise ValueError(f"finetune.lora_targets: {targets!r} names no projection this model has (it has "
                         f"{', '.join(has)})")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or _is_head(model, name)
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Inside: `model` (any layout: LoRALinear, its tensor-parallel cuts, per-expert adapters) computes as its frozen
    weights alone, each adapter's scale set to 0 (x W^T + 0 * (...) is x W^T exactly). dpo's held reference under
    LoRA is the policy with its adapters off."""
    saved = []
    for m in model.modules():
        if getattr(m, "lora_A", None) is None and not getattr(m, "lora", ()):
            continue  # (no adapters here)
        for key in ("scale", "lora_scale"):
            if isinstance(getattr(m, key, None), float):
                saved.append((m, key, getattr(m, key)))
                setattr(m, key, 0.0)
    try:
        yield model
    finally:
        for m, key, value in saved:
            setattr(m, key, value)


def _owners(block: nn.Module) -> list[nn.Module]:
    """The modules of a block whose nn.Linear projections LoRA can adapt (a MoE block's: its shared expert)."""
    mlp = block.mlp
    if not isinstance(mlp, MoE):
        return [block.attn, mlp]
    return [block.attn] + ([mlp.shared] if mlp.shared is not None else [])


def _experts(block: nn.Module) -> list[nn.Module]:
    return [block.mlp.experts] if isinstance(block.mlp, MoE) else []


def _is_head(model: Transformer, name: str) -> bool:
    head = getattr(model, "head_name", None)
    return head is not None and name.startswith(head + ".")


def apply_freeze(model: Transformer, spec: str) -> Transformer:
    """finetune.freeze: `embeddings`, `blocks:N` (the first N blocks), `all_but_head` (comma-separated)."""
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "embeddings":
            frozen = lambda n: n.startswith(("embed.", "pos_embed."))  # noqa: E731
        elif item.startswith("blocks:") and item[7:].isdigit():
            k = int(item[7:])
            if k > len(model.layers):  # would freeze every block, as blocks:n_layers says plainly
                raise ValueError(f"finetune.freeze: {item!r} names more blocks than the model's {len(model.layers)} "
                                 f"(model.n_layers); freeze at most blocks:{len(model.layers)}")
            frozen = lambda n, k=k: n.startswith("layers.") and int(n.split(".")[1]) < k  # noqa: E731
        elif item == "all_but_head":
            frozen = lambda n: not _is_head(model, n)  # noqa: E731
        else:
            raise ValueError(f"finetune.freeze: {item!r} is not embeddings, blocks:N or all_but_head")
        for name, p in model.named_parameters():
            if frozen(name):
                p.requires_grad = False
    return model


def build_model(cfg: Config) -> Transformer:
    """The model a run with this config trains (or a checkpoint of it holds): a pretraining run's Transformer, or
    the fine-tuning task's head on it, with LoRA and frozen parameters as finetune.* says."""
    f = cfg.finetune
    if f.task in LM_TASKS:
        model = Transformer(cfg.model)
        model.sparse_labels = model.sparse_labels or f.task == "sft"  # (the prompt's tokens have no label)
    elif f.task == "classify":
        model = SequenceClassifier(cfg.model, len(f.labels), f.pooling)
    elif f.task == "tokens":
        model = TokenTagger(cfg.model, len(f.labels))
    else:
        model = SpanExtractor(cfg.model)
    if f.lora_rank:
        apply_lora(model, f.lora_rank, f.lora_alpha, f.lora_dropout, f.lora_targets)
    if f.freeze:
        apply_freeze(model, f.freeze)
    return model
