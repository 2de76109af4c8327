"""Bytes per rank: parameters, gradients and optimizer states (per ZeRO stage, precision and offload), activations
(per micro-batch, with activation checkpointing, sequence parallelism and the pipeline's micro-batches in flight),
DeepSpeed's buffers, and the start-up peak.

The counts come from the model itself: `Transformer` is built on the meta device (shapes, no memory) and each
parameter is placed as parallel/ places it (TP splits from checkpoint/sharding.py's table, pipeline stages cut by
DeepSpeed's own partitioner as apply_pipeline asks it to). The per-token activation counts below list the tensors
autograd keeps in each layer of model.py with megatrain's fused kernels; tests/test_plan.py measures them.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

from megatrain.config import (Config, ModelConfig, ffn_width, head_dim, is_local_layer, is_moe_layer, kv_heads,
                              kv_repeat, moe_ffn_width, shared_ffn_width)

FP32 = 4
DEEPSPEED_MAX_LIVE_PARAMETERS = 1_000_000_000  # ZeRO-3 keeps at most this many gathered parameters (its default)


def bytes_per_value(precision: str) -> int:
    """Parameters, gradients and activations: 2 bytes under bf16/fp16, 4 under fp32."""
    return FP32 if precision == "fp32" else 2


@dataclass(frozen=True)
class StageParams:
    """The parameters one rank of a pipeline stage holds (after its TP and EP splits)."""

    local: int  # parameters on the rank
    zero3_persistent: int  # of those, the ones ZeRO-3 keeps whole (fewer elements than its persistence threshold)
    layers: int  # Transformer blocks in the stage
    first: bool  # holds the embedding
    last: bool  # holds the final norm and the LM head
    expert: int = 0  # of `local`, the experts' (E / ep of each MoE layer): ZeRO partitions them over dp / ep ranks
    expert_persistent: int = 0  # of `zero3_persistent`, the experts'
    moe_layers: int = 0  # of `layers`, the MoE blocks

    @property
    def dense(self) -> int:
        """Parameters ZeRO partitions over every data-parallel rank."""
        return self.local - self.expert


def parameter_table(m: ModelConfig) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """(name, numel, shape) of every parameter of the model, from a meta-device build (no memory, no init)."""
    return _parameter_table(_model_key(m))


@functools.lru_cache(maxsize=8)
def _parameter_table(fields: tuple) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    import torch  # torch, the model and DeepSpeed only where a figure needs them: `megatrain plan --help` imports this

    from megatrain.model import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig(*fields))
    return tuple((n, p.numel(), tuple(p.shape)) for n, p in model.named_parameters())


def local_numel(name: str, numel: int, m: ModelConfig, tp: int, ep: int = 1) -> int:
    """A parameter's elements on one rank: its TP slice, and for a MoE layer's experts 1/ep of them."""
    from megatrain.parallel.sharding import is_expert_param, split_of

    n = numel if split_of(name, m).replicated else numel // tp
    return n // ep if is_expert_param(name) else n


@functools.lru_cache(maxsize=64)
def blocks_per_stage(n_layers: int, pp: int) -> tuple[int, ...]:
    """How apply_pipeline's PipelineModule cuts the blocks ('type:BlockPipe': DeepSpeed's balanced partition of the
    layer list embedding, blocks, final norm, head, where only the blocks weigh)."""
    if pp == 1:
        return (n_layers,)
    from deepspeed.runtime.utils import partition_balanced

    weights = [0] + [1] * n_layers + [0, 0]
    bounds = [int(b) for b in partition_balanced(weights, pp)]
    return tuple(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))


def stage_params(m: ModelConfig, tp: int, pp: int, persistence_threshold: int, ep: int = 1) -> list[StageParams]:
    """Per pipeline stage: what one of its ranks holds."""
    return list(_stage_params(_model_key(m), tp, pp, persistence_threshold, ep))


def _model_key(m: ModelConfig) -> tuple:
    return tuple(dataclasses.astuple(dataclasses.replace(m, fused_kernels="off")))


@functools.lru_cache(maxsize=256)
def _stage_params(key: tuple, tp: int, pp: int, persistence_threshold: int, ep: int) -> tuple[StageParams, ...]:
    from megatrain.parallel.sharding import is_expert_param

    m = ModelConfig(*key)
    table = _parameter_table(key)
    blocks = blocks_per_stage(m.n_layers, pp)
    starts = [sum(blocks[:s]) for s in range(pp)]
    out = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        local = persistent = expert = expert_persistent = 0
        for name, numel, _ in table:
            if name.startswith("layers."):
                mine = starts[s] <= int(name.split(".")[1]) < starts[s] + blocks[s]
            elif name in ("embed.weight", "pos_embed.weight"):
                # a tied head is the embedding's weight: the last stage holds its own copy (TiedLayerSpec)
                mine = first or (last and name == "embed.weight" and m.tie_embeddings)
            else:  # final norm, LM head
                mine = last
            if mine:
                n = local_numel(name, numel, m, tp, ep)
                local += n
                persistent += n if n < persistence_threshold else 0
                if is_expert_param(name):
                    expert += n
                    expert_persistent += n if n < persistence_threshold else 0
        moe = sum(is_moe_layer(m, i) for i in range(starts[s], starts[s] + blocks[s]))
        out.append(StageParams(local, persistent, blocks[s], first, last, expert, expert_persistent, moe))
    return tuple(out)


def total_params(m: ModelConfig) -> int:
    return sum(numel for _, numel, _ in parameter_table(m))


def active_params(m: ModelConfig) -> int:
    """The parameters one token's forward uses: every parameter, except that of each MoE layer's E experts only its
    top_k count (the router, a shared expert and the embeddings count whole). A dense model: total_params."""
    from megatrain.parallel.sharding import is_expert_param

    if not m.moe_experts:
        return total_params(m)
    experts = sum(numel for name, numel, _ in parameter_table(m) if is_expert_param(name))
    assert experts % m.moe_experts == 0  # each expert tensor stacks E equal experts
    return total_params(m) - experts + experts // m.moe_experts * m.moe_top_k


@dataclass
class ModelStates:
    """Bytes on the device and on the host (offload) for one rank."""

    params: tuple[int, int]
    grads: tuple[int, int]
    optimizer: tuple[int, int]  # fp32 master weights and Adam's two moments
    buffers: tuple[int, int]  # ZeRO's gradient bucket
    gathered: int = 0  # ZeRO-3: full parameters gathered while layers run (transient, on the device)

    @property
    def device(self) -> int:
        return self.params[0] + self.grads[0] + self.optimizer[0] + self.buffers[0]

    @property
    def host(self) -> int:
        return self.params[1] + self.grads[1] + self.optimizer[1] + self.buffers[1]


def model_states(P: int, persistent: int, dp: int, zero_stage: int, precision: str, grad_accum: int, pipeline: bool,
                 offload_optimizer: bool, offload_params: bool, reduce_bucket: int) -> ModelStates:
    """What DeepSpeed (0.19) keeps for P parameters on a rank, data-parallel group of dp.

    ZeRO-0: the module's parameters and gradients and the optimizer's states, whole; under bf16/fp16 DeepSpeed's
    mixed-precision optimizer adds fp32 master weights and fp32 gradients (the pipeline's bf16 optimizer partitions
    the master over data parallelism). ZeRO-1/2: the parameters whole, the fp32 master and Adam's moments partitioned
    (12 bytes per parameter over dp); ZeRO-2 keeps only its partition of the gradients, and so does ZeRO-1 when every
    micro-batch ends a step (no accumulation) or under a pipeline; ZeRO-1 accumulating micro-batches keeps the full
    gradients plus its reduce bucket. ZeRO-3 partitions the parameters too, except those below the persistence
    threshold, and keeps one reduce bucket; in fp32 its master is the parameters' partition itself. Under bf16/fp16
    the partition's gradient is converted to fp32 for the step (4 more bytes per parameter over dp). Offloaded states
    live on the host, where the accumulation of several micro-batches keeps an fp32 gradient partition of its own."""
    w = bytes_per_value(precision)
    part = P / dp
    mixed = w == 2
    fp32_grad = FP32 * part if mixed else 0
    opt = 12 * part  # fp32 master (4) + exp_avg (4) + exp_avg_sq (4)
    if zero_stage == 0:
        if not mixed:
            return ModelStates((FP32 * P, 0), (FP32 * P, 0), (8 * P, 0), (0, 0))
        if pipeline and precision == "bf16":  # BF16_Optimizer: fp32 gradient accumulation, master partitioned
            return ModelStates((w * P, 0), (w * P + FP32 * P, 0), (opt, 0), (0, 0))
        return ModelStates((w * P, 0), (w * P + FP32 * P, 0), (12 * P, 0), (0, 0))
    bucket = w * reduce_bucket
    accumulating = grad_accum > 1 and not pipeline
    if zero_stage in (1, 2):
        full_grads = zero_stage == 1 and accumulating
        if offload_optimizer:
            host = opt + FP32 * part + (FP32 * part if accumulating else 0)
            return ModelStates((w * P, 0), (w * P if full_grads else 0, 0), (0, host), (bucket, 0))
        if full_grads:
            return ModelStates((w * P, 0), (w * P + fp32_grad, 0), (opt, 0), (bucket, 0))
        return ModelStates((w * P, 0), (w * part + fp32_grad, 0), (opt, 0), (0, 0))
    gathered = w * min(P - persistent, DEEPSPEED_MAX_LIVE_PARAMETERS)
    params = (w * persistent, w * part) if offload_params else (w * (part + persistent), 0)
    if offload_optimizer:
        host = opt + FP32 * part + (FP32 * part if grad_accum > 1 else 0)
        return ModelStates(params, (0, 0), (0, host), (bucket, 0), gathered)
    if not mixed:  # fp32: the parameters' partition is the master (training/engine.share_fp32_master)
        opt = 8 * part
    return ModelStates(params, (w * part + fp32_grad, 0), (opt, 0), (bucket, 0), gathered)


def stage_states(st: StageParams, dp: int, ep: int, zero_stage: int, precision: str, grad_accum: int,
                 pipeline: bool, offload_optimizer: bool, offload_params: bool, reduce_bucket: int) -> ModelStates:
    """model_states of one rank of a stage: the dense parameters partitioned over the dp data-parallel ranks, the
    experts (E / ep of each MoE layer here) over the dp / ep ranks that hold the same experts. ZeRO-3 gathers both."""
    dense = model_states(st.dense, st.zero3_persistent - st.expert_persistent, dp, zero_stage, precision, grad_accum,
                         pipeline, offload_optimizer, offload_params, reduce_bucket)
    if not st.expert:
        return dense
    ex = model_states(st.expert, st.expert_persistent, dp // ep, zero_stage, precision, grad_accum, pipeline,
                      offload_optimizer, offload_params, 0)

    def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return a[0] + b[0], a[1] + b[1]

    gathered = bytes_per_value(precision) * min(st.local - st.zero3_persistent, DEEPSPEED_MAX_LIVE_PARAMETERS)
    return ModelStates(add(dense.params, ex.params), add(dense.grads, ex.grads), add(dense.optimizer, ex.optimizer),
                       dense.buffers, gathered if zero_stage == 3 else 0)


@dataclass
class Activations:
    """Bytes of one rank's activations at the end of the forward passes it holds before its first backward."""

    saved: int  # what autograd keeps for the backward (every micro-batch in flight), plus the pipeline's buffers
    recompute: int  # activation checkpointing: one block's full activations, alive while it is recomputed
    in_flight: int  # micro-batches whose activations the rank holds at once (pipeline 1F1B: pp - stage)
    buffers: int = 0  # a receiving pipeline stage's activation and gradient buffers, kept from step to step


def per_token_layer_bytes(m: ModelConfig, tp: int, sp: bool, w: int, cp: int = 1) -> dict[str, float]:
    """Bytes per token that one block saves for its backward (fused kernels), by part.

    norm (each of two): its input and the fp32 1/rms; the column-parallel projection after it saves the normed
    input (under sequence parallelism the norm works on 1/tp of the tokens and the projection saves the gathered
    input). norm_placement=post counts the same: the projection saves the residual stream the pre norm would have,
    the post norm its input (the branch output) and 1/rms. post_norm: sandwich's two norms after the sublayers,
    their inputs and 1/rms. attention: the qkv output (v is a view of it), RoPE's rotated q and k, the attention
    output (o_proj's input is a view of it) and the fp32 log-sum-exp per head, all n_heads x head_dim wide;
    qk_norm=head adds the fp32 1/rms of each query and key head (the norm's input is a view of the qkv output);
    qk_norm=full (plain PyTorch) per projection its normed values before the weight, their fp32 copy under
    bf16/fp16, and one fp32 1/rms per token. mlp: swiglu's gate|up output and its product (the down projection's
    input); geglu (plain PyTorch) the same and its GeLU output; gelu's input and output. dropout > 0: a one-byte mask
    on each residual branch. (A sliding-window block's mask is per sequence: window_mask_bytes.) Under context
    parallelism (cp > 1; per token of the rank's slice) attention keeps instead what the all-to-alls make: the
    exchanged q, k and v the kernel saves (KV heads repeated when cp needs it; the qkv output and the rotated copies
    are then not kept), its output, and o_proj's input (that output exchanged back)."""
    h, hd = m.d_model, head_dim(m)
    q, kv, ff, heads = m.n_heads * hd, kv_heads(m) * hd, ffn_width(m), m.n_heads
    seq_share = tp if sp else 1
    norm = (w * h + FP32) / seq_share + w * h
    post_norm = 2 * (w * h + FP32) / seq_share if m.norm_placement == "sandwich" else 0
    attn = w * ((q + 2 * kv) + (q + kv if m.position == "rope" else 0) + q) / tp + FP32 * heads / tp
    if cp > 1:  # the kernel's exchanged q, k, v and its output, and o_proj's input (the output exchanged back)
        repeat = kv_repeat(kv_heads(m) // tp, cp) if kv_heads(m) % tp == 0 else 1
        attn = w * (3 * q + 2 * kv * repeat) / tp + FP32 * heads / tp
    if m.qk_norm == "head":
        attn += FP32 * (heads + kv_heads(m)) / tp
    elif m.qk_norm == "full":
        attn += (w + (FP32 if w != FP32 else 0)) * (q + kv) / tp + 2 * FP32
    mlp = w * {"swiglu": 3, "geglu": 4}.get(m.mlp, 2) * ff / tp
    dropout = 2 * h / seq_share if m.dropout > 0 else 0
    return {"norm": norm, "post_norm": post_norm, "attention": attn, "mlp": mlp, "dropout": dropout}


def moe_mlp_bytes(m: ModelConfig, tp: int, w: int) -> float:
    """Bytes per token a MoE layer's feed-forward saves for its backward (in place of per_token_layer_bytes' mlp),
    dropless (a capacity drops some rows: fewer).

    The router: its logits in fp32 (for the z-loss's log-sum-exp) and the softmax over the E experts, the top_k
    chosen weights (fp32) and indices (int64), the weights' sum and the log-sum-exp (fp32 each). Each of the top_k
    routed copies of a token: the gathered row the experts read, the expert's output and that output weighted (what
    index_add_ keeps), d_model each; the expert's hidden values in plain PyTorch (gated: gate|up, the activation and
    the product, 4 x moe_ffn; gelu: 2 x); its weight in the activations' dtype and two int64 indices (the token, the
    sort). Every TP rank routes every token of its group (each expert is TP-split), so only the hidden width divides
    by tp. The shared MLP saves what a dense one of its width does, its gate the sigmoid and the shared output."""
    d, ff, sff, k = m.d_model, moe_ffn_width(m), shared_ffn_width(m), m.moe_top_k
    gated = m.mlp in ("swiglu", "geglu")
    router = 2 * FP32 * m.moe_experts + (FP32 + 8) * k + 2 * FP32
    per_copy = w * (3 * d + (4 if gated else 2) * ff / tp) + w + 16
    shared = w * {"swiglu": 3, "geglu": 4}.get(m.mlp, 2) * sff / tp + (w * (d + 1) if m.moe_shared_gate and sff else 0)
    return router + k * per_copy + shared


def window_mask_bytes(m: ModelConfig, seq_len: int, w: int) -> int:
    """Bytes the sliding-window blocks' attention keeps, whatever the micro-batch size: the [T, T] additive band
    mask in the activations' dtype, which the kernel that takes a mask (memory-efficient attention; flash attention
    takes none) saves for the backward. One tensor shared by every window block (model.window_bias), so counted once
    per stage. 0 when the window does not cut (T <= window: plain causal attention, no mask). Packed fine-tuning
    examples make a mask per layer; the plan is for pretraining."""
    return w * seq_len * seq_len if m.sliding_window and seq_len > m.sliding_window else 0


def window_blocks(m: ModelConfig, stage_index: int, pp: int) -> int:
    """Sliding-window blocks in a pipeline stage."""
    blocks = blocks_per_stage(m.n_layers, pp)
    first = sum(blocks[:stage_index])
    return sum(is_local_layer(m, i) for i in range(first, first + blocks[stage_index]))


def activations(cfg: Config, stage: StageParams, stage_index: int, tp: int, pp: int, grad_accum: int,
                precision: str) -> Activations:
    """The activation memory of one rank of `stage` (see per_token_layer_bytes for what a block keeps)."""
    m, p = cfg.model, cfg.parallel
    w = bytes_per_value(precision)
    b, s = cfg.train.micro_batch_size, cfg.data.seq_len
    tokens = b * s // p.cp  # a context-parallel rank's slice of each row (its attention's extra: per_token_layer_bytes)
    sp = p.sequence_parallel and tp > 1
    part = per_token_layer_bytes(m, tp, sp, w, p.cp)
    mlps = [(stage.layers - stage.moe_layers, part["mlp"]), (stage.moe_layers, moe_mlp_bytes(m, tp, w))]
    mlps = [(n, mlp) for n, mlp in mlps if n] or mlps[:1]  # (blocks, their feed-forward's bytes per token)

    def whole(mlp: float) -> float:  # a block's bytes per token with this feed-forward
        return 2 * part["norm"] + part["post_norm"] + part["attention"] + mlp + part["dropout"]

    full_block = max(whole(mlp) for _, mlp in mlps)
    # the checkpointed input: split over TP ranks with partition_activations, sequence-sharded under sequence parallel
    ckpt_input = w * m.d_model / (tp if (p.partition_activations or sp) and tp > 1 else 1)
    mode = cfg.train.activation_checkpointing
    # the window blocks' one shared mask: kept for the backward without checkpointing, else while a block recomputes
    windows = window_blocks(m, stage_index, pp)
    mask = window_mask_bytes(m, s, w) if windows else 0
    if mode == "full":  # the block's input only; the block is recomputed in the backward
        blocks, recompute = [(stage.layers, ckpt_input)], full_block
    elif mode == "selective":  # attention recomputed from the normed input it is checkpointed at
        blocks = [(n, 2 * part["norm"] - w * m.d_model + ckpt_input + part["post_norm"] + mlp + part["dropout"])
                  for n, mlp in mlps]
        recompute = part["attention"] + w * m.d_model
    else:
        blocks, recompute = [(n, whole(mlp)) for n, mlp in mlps], 0.0
    per_mb = sum(tokens * n * block for n, block in blocks) + (mask if mode == "none" else 0)
    if stage.first:
        per_mb += 8 * tokens  # the token ids the embedding saves
    if stage.last:
        per_mb += tokens * (w * m.d_model + FP32) / (tp if sp else 1)  # the final norm
        V = m.vocab_size
        if pp == 1 and tp == 1:  # fused LM head + loss: the gradients w.r.t. hidden (per token) and the head (once)
            per_mb += tokens * w * m.d_model + FP32 * V * m.d_model
        else:  # the head's (gathered) input, its vocab slice of the logits, their fp32 log-sum-exp, the labels
            per_mb += tokens * (w * m.d_model + w * V / tp + FP32 + 8)
    in_flight = min(pp - stage_index, grad_accum) if pp > 1 else 1
    pipe_buffers = 0
    if pp > 1 and not stage.last:  # DeepSpeed keeps each micro-batch's stage output until its gradient returns
        pipe_buffers = in_flight * tokens * w * m.d_model / (tp if sp else 1)
    receive = 0
    if pp > 1 and stage_index > 0:  # DeepSpeed's schedule keeps max(2, in flight) buffers: an activation and its grad
        receive = 2 * max(2, in_flight) * tokens * w * m.d_model / (tp if sp else 1)
    recomputed = tokens * recompute + (mask if mode != "none" else 0)
    return Activations(int(per_mb * in_flight + pipe_buffers), int(recomputed), in_flight, int(receive))


def startup_host_bytes(m: ModelConfig, tp: int = 1, pp: int = 1, dp: int = 1, zero_stage: int = 0,
                       precision: str = "fp32", from_weights: bool = False, ep: int = 1) -> int:
    """Host memory a rank's model takes at start-up, before deepspeed.initialize: the model is built on the meta
    device and each rank gets only its TP slice of its pipeline stage, in fp32, every full tensor drawn into one
    buffer of the largest one's size. Under ZeRO-3 each parameter is partitioned (in the run's precision) as soon as
    it is drawn, so the rank holds its partition and that buffer. Starting from weights (checkpoint.init,
    finetune.init) the full tensors are read one at a time instead: one more of them, as read, next to its slice.
    Under expert parallelism a rank holds E / ep of each MoE layer's experts, partitioned over dp / ep ranks."""
    largest = max(numel for _, numel, _ in parameter_table(m))
    stage = max(stage_params(m, tp, pp, 0, ep), key=lambda st: st.local)
    full_tensors = FP32 * largest * (2 if from_weights else 1)
    if zero_stage == 3:
        return bytes_per_value(precision) * (-(-stage.dense // dp) + -(-stage.expert // (dp // ep))) + full_tensors
    return FP32 * stage.local + full_tensors
