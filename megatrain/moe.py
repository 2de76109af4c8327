"""Mixture of Experts: the router, the experts as one grouped matmul, the load-balancing losses.

A MoE layer replaces a block's MLP (model.moe_* keys; model_config.is_moe_layer says which blocks). Each token's
router logits pick its top-k of n experts; the token's copies are sorted by expert, every expert's rows run as one
grouped matmul, and the outputs come back weighted by the router's probabilities, summed per token:

    logits = router(x)                     [T, E]
    weights, experts = top-k(softmax)      [T, k]     (model.moe_router, model.moe_norm_topk)
    rows sorted by expert -> experts(rows) -> weighted sum back onto the tokens (+ the shared expert, if any)

Dropless by default: every token reaches its k experts, however uneven the load. With model.moe_capacity > 0 an
expert takes at most ceil(capacity x T x k / E) rows, first come first served in token order; the rest are dropped
(that copy of the token adds nothing; the residual stream still carries it) and counted.

The auxiliary losses (Switch load balancing, router z-loss) reach the router's gradient through AuxLoss, an
identity on the layer's output whose backward adds their gradient: they never enter the loss the run reports (which
stays the language model's), and they work unchanged inside activation checkpointing and pipeline stages.

Expert parallelism (parallel/expert.py) sets `MoE.dispatch`: it sends each expert's rows to the rank holding it and
brings the outputs back; the model itself never sees a process group.

Parameter names (under layers.{i}.mlp):
    router.weight           [E, d_model]
    experts.gate_up         [E, 2 x moe_ffn, d_model]   rows [gate; up] (swiglu, geglu)   or experts.up [E, ff, d]
    experts.down            [E, d_model, moe_ffn]
    experts.{w}_lora_A, experts.{w}_lora_B   [E, r, in], [E, out, r]: LoRA adapters of expert weight w (add_lora)
    shared.gate_up.weight, shared.down.weight           the shared expert: a plain MLP (model.py), always on
    shared_gate.weight      [1, d_model]                its sigmoid gate (model.moe_shared_gate)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain.kernels import reference
from megatrain.model_config import ModelConfig, moe_ffn_width


class AuxLoss(torch.autograd.Function):
    """Forward: `out` unchanged. Backward: `out`'s gradient, and `scale` as the gradient of `aux` (a scalar), as if
    scale x aux had been added to the loss. `AuxLoss.scale` is set by the trainer (1 / gradient accumulation steps,
    the factor DeepSpeed applies to the loss); 1 for a plain backward."""

    scale = 1.0

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype = aux.dtype
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, torch.full((), AuxLoss.scale, dtype=ctx.aux_dtype, device=g.device)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E x sum_i f_i P_i: f_i the fraction of the T x k routed rows that went to
    expert i, P_i the router's mean probability of expert i over the T tokens. 1 when both are uniform, E at worst.
    probs [T, E] (softmax over every expert), counts [E] (rows routed to each, before any drop)."""
    T, E = probs.shape
    f = counts.to(probs.dtype) / (T * top_k)
    return E * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2 (keeps the router's logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs x [N, K] @ w[e]^T [K, M] here: fp32 or bf16, K and M 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype:
        return False
    step = 16 // x.element_size()
    return w.shape[-1] % step == 0 and w.shape[-2] % step == 0


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, loop: bool = False) -> torch.Tensor:
    """Rows of x [N, K] sorted by group, counts[e] of them for group e, each times w[e] [M, K] transposed -> [N, M].
    One grouped matmul where torch has one for these tensors; else (float64, odd sizes, `loop`) a loop over the
    groups, the reference it equals."""
    if not loop and grouped_mm_supported(x, w):
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
        if y.requires_grad:  # NOTE: its backward refuses a broadcast (zero-stride) gradient, e.g. from a .sum()
            y.register_hook(lambda g: g.contiguous())
        return y
    parts = x.split(counts.tolist())
    return torch.cat([p @ w[e].T for e, p in enumerate(parts)]) if parts else x.new_empty(0, w.shape[-2])


class GroupedExperts(nn.Module):
    """E expert MLPs held as stacked weights: gated (swiglu, geglu: gate_up, down) or not (gelu: up, down)."""

    def __init__(self, n_experts: int, d_model: int, ffn: int, mlp: str, gelu: str):
        super().__init__()
        self.mlp, self.gelu = mlp, gelu
        rows = 2 * ffn if mlp in ("swiglu", "geglu") else ffn
        name = "gate_up" if mlp in ("swiglu", "geglu") else "up"
        setattr(self, name, nn.Parameter(torch.empty(n_experts, rows, d_model)))
        self.down = nn.Parameter(torch.empty(n_experts, d_model, ffn))
        self.loop = False  # True: the per-expert loop even where a grouped matmul exists (benchmarks, parity)
        self.lora: tuple[str, ...] = ()  # the weights with LoRA adapters (add_lora)
        self.lora_scale, self.lora_dropout = 1.0, nn.Identity()

    def add_lora(self, names: list[str], rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Per-expert LoRA on the named weights (gate_up / up, down): `{w}_lora_A` [E, r, in] and `{w}_lora_B`
        [E, out, r], B zero (the experts start unchanged), A as nn.Linear's default, U(-1/sqrt(in), 1/sqrt(in)).
        Expert w then computes rows @ (W[e] + alpha / r B[e] A[e])^T. (Not `gate_up.lora_A`: a parameter has no
        children; the sharding table and the checkpoint reader know these names.)"""
        self.lora = tuple(n for n in ("gate_up", "up", "down") if n in names and hasattr(self, n))
        self.lora_scale, self.lora_dropout = alpha / rank, nn.Dropout(dropout)
        for n in self.lora:
            w = getattr(self, n)
            a = nn.Parameter(torch.empty(w.shape[0], rank, w.shape[2], device=w.device, dtype=w.dtype))
            b = nn.Parameter(torch.zeros(w.shape[0], w.shape[1], rank, device=w.device, dtype=w.dtype))
            if w.device.type != "meta":
                bound = 1 / math.sqrt(w.shape[2])
                nn.init.uniform_(a, -bound, bound)
            setattr(self, n + "_lora_A", a)
            setattr(self, n + "_lora_B", b)

    def _linear(self, x: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
        y = grouped_linear(x, getattr(self, name), counts, self.loop)
        if name not in self.lora:
            return y
        h = grouped_linear(self.lora_dropout(x), getattr(self, name + "_lora_A"), counts, self.loop)
        return y + self.lora_scale * grouped_linear(h, getattr(self, name + "_lora_B"), counts, self.loop)

    @property
    def n_experts(self) -> int:
        return self.down.shape[0]

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, d] sorted by expert, counts [E] -> [N, d]."""
        if self.mlp == "gelu":
            h = F.gelu(self._linear(rows, "up", counts),
                       approximate="tanh" if self.gelu == "tanh" else "none")
        else:
            h = self._linear(rows, "gate_up", counts)
            h = reference.geglu(h) if self.mlp == "geglu" else reference.swiglu(h)
        return self._linear(h, "down", counts)


@dataclass
class Routing:
    """Where each token's copies go: `order` sorts the T x k (token, choice) rows by expert (row r of the sorted
    batch is token order[r] // k), `counts` [E] the rows each expert receives, `weights` [T x k] in sorted order,
    `keep` [T x k] sorted, False for a row dropped by the capacity (None: dropless)."""

    order: torch.Tensor
    counts: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor | None
    dropped: torch.Tensor | int = 0
    kept: torch.Tensor | None = None  # [E] rows each expert keeps under the capacity (None: dropless)


@dataclass
class LoadStats:
    """What one MoE layer saw since it was last read (tensors, read when a line is logged: no sync per step)."""

    load: torch.Tensor | None = None  # [E] rows routed to each expert (before drops)
    dropped: torch.Tensor | int = 0  # rows dropped by the capacity
    aux: torch.Tensor | float = 0.0  # sum of the load-balancing loss over the calls
    z: torch.Tensor | float = 0.0  # sum of the router z-loss
    calls: int = 0

    def add(self, counts: torch.Tensor, dropped, aux: torch.Tensor, z: torch.Tensor) -> None:
        self.load = counts.detach() if self.load is None else self.load + counts.detach()
        self.dropped = self.dropped + dropped
        self.aux = self.aux + aux.detach()
        self.z = self.z + z.detach()
        self.calls += 1


def route(logits: torch.Tensor, top_k: int, router: str, norm_topk: bool,
          capacity: float) -> tuple[Routing, torch.Tensor]:
    """logits [T, E] -> the routing and the softmax over every expert [T, E] (for the load-balancing loss)."""
    T, E = logits.shape
    probs = logits.softmax(-1)
    if router == "topk_softmax":  # softmax over the k best logits (Mixtral's form; normalised by construction)
        top_logits, experts = logits.topk(top_k, dim=-1)
        weights = top_logits.softmax(-1)
    else:
        weights, experts = probs.topk(top_k, dim=-1)
        if norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: within an expert, rows stay in token order
    counts = torch.bincount(flat, minlength=E)
    keep, dropped, kept = None, 0, None
    if capacity > 0:
        cap = math.ceil(capacity * T * top_k / E)
        starts = counts.cumsum(0) - counts
        sorted_experts = flat[order]
        rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[sorted_experts]
        keep = rank_in_expert < cap
        kept = counts.clamp(max=cap)  # (an expert keeps its first `cap` rows)
        dropped = (counts - kept).sum()
    return Routing(order, counts, weights.reshape(-1)[order], keep, dropped, kept), probs


class MoE(nn.Module):
    """A block's feed-forward layer as a Mixture of Experts (see the module's docstring)."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None, layer: int = 0):
        super().__init__()
        self.layer = layer  # the block's index (the metrics name the layer by it)
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.router_kind, self.norm_topk, self.capacity = cfg.moe_router, cfg.moe_norm_topk, cfg.moe_capacity
        self.aux_coef, self.z_coef = cfg.moe_aux_loss, cfg.moe_z_loss
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = GroupedExperts(cfg.moe_experts, cfg.d_model, moe_ffn_width(cfg), cfg.mlp, cfg.gelu)
        self.shared = shared
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if shared is not None and cfg.moe_shared_gate else None
        # set by parallel/expert.apply_ep: runs the experts on the ranks that hold them; None: all are here
        self.dispatch = None
        # set by apply_tp: (enter, leave) around the layer, the TP regions' collectives (experts are TP-split)
        self.tp_regions = None
        self.aux_share = 1.0
        self.stats = LoadStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = None
        if self.shared is not None:  # a plain MLP (TP-split as one, with its own collectives)
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
        if self.tp_regions is not None:
            x = self.tp_regions[0](x)  # every token of the TP group (gathered under sequence parallelism)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        logits = logits if logits.dtype == torch.float64 else logits.float()  # route in fp32 at least
        routing, probs = route(logits, self.top_k, self.router_kind, self.norm_topk, self.capacity)
        tokens, weights, counts = routing.order // self.top_k, routing.weights, routing.counts
        if routing.keep is not None:  # capacity: the dropped rows leave before the experts
            tokens, weights, counts = tokens[routing.keep], weights[routing.keep], routing.kept
        rows = x[tokens]
        y = self.experts(rows, counts) if self.dispatch is None else self.dispatch(rows, counts, self.experts)
        out = torch.zeros_like(x).index_add_(0, tokens, y * weights.to(y.dtype)[:, None]).view(shape)
        aux = load_balancing_loss(probs, routing.counts, self.top_k)
        z = router_z_loss(logits)
        if torch.is_grad_enabled() and (self.aux_coef or self.z_coef):
            # aux_share: 1/tp under TP, whose ranks each add this gradient and then sum the router's over the group
            out = AuxLoss.apply(out, (self.aux_coef * aux + self.z_coef * z) * self.aux_share)
        # NOTE: counted once: in training, and not in an activation-checkpointing recompute (which runs in backward)
        if self.training and torch._C._current_graph_task_id() == -1:
            self.stats.add(routing.counts, routing.dropped, aux, z)
        if self.tp_regions is not None:
            out = self.tp_regions[1](out)  # the sum of the TP ranks' expert slices (scattered again under SP)
        return out if shared is None else out + shared


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of a model, with its module name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def take_stats(model: nn.Module) -> dict[int, LoadStats]:
    """Each MoE layer's LoadStats since the last call (by block index), and a fresh start."""
    out = {}
    for _, m in moe_layers(model):
        out[m.layer] = m.stats
        m.stats = LoadStats()
    return out
