"""Step time: the FLOPs the training log counts, the pipeline bubble, and what TP, PP and DP/ZeRO send per step,
over the given compute rate and bandwidths.

A first-order model, stated so it can be checked: compute runs at `compute_efficiency` of the GPU's dense bf16
peak; a collective moves its bytes at `comm_efficiency` of the link (ring all-reduce: 2(n-1)/n of the tensor per
rank, reduce-scatter and all-gather (n-1)/n each, all-to-all (n-1)/n of what a rank sends); a TP, EP or DP group
that spans nodes goes at the inter-node rate. Expert and context parallelism's groups are ep (cp) adjacent
data-parallel ranks (tp apart); the ranks holding the same experts, dp / ep of them, are tp x ep apart. TP,
pipeline, expert- and context-parallel transfers are not overlapped with compute (they sit between dependent
matmuls); ZeRO-2/3's reductions overlap the backward (DeepSpeed's overlap_comm), ZeRO-0/1's all-reduce does not;
offloaded states cross PCIe and the host runs Adam, neither overlapped.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatrain.config import Config, ffn_width, head_dim, kv_heads, kv_repeat, shared_ffn_width
from megatrain.flops import block_flops_per_token, mlp_matrices, moe_flops_per_token, train_flops_per_token
from megatrain.planning.memory import FP32, StageParams, bytes_per_value


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # GB (10^9 bytes), as GPUs are sold
    tflops: float  # dense bf16 peak (no sparsity)
    intra_node_gbps: float  # per GPU, one direction, Gbit/s: NVLink/NVSwitch (or PCIe)
    inter_node_gbps: float  # per GPU, one direction, Gbit/s: the network (InfiniBand/RoCE NIC per GPU)
    host_gbps: float = 256  # per GPU, one direction, Gbit/s: PCIe to the host (offloaded states cross it)


# Peaks from the vendors' data sheets (SXM parts, dense); links: NVLink 4 = 450 GB/s per direction (H100/H200),
# NVLink 3 = 300 GB/s (A100), PCIe 4.0 x16 = 32 GB/s (5.0: 64 GB/s); networks: one 400G NIC per GPU (H100/H200),
# 200G (A100).
KNOWN_GPUS = {
    "h100": GPU("H100 80GB SXM", 80, 989.0, 3600, 400, 512),
    "h200": GPU("H200 141GB SXM", 141, 989.0, 3600, 400, 512),
    "a100-80g": GPU("A100 80GB SXM", 80, 312.0, 2400, 200),
    "a100-40g": GPU("A100 40GB SXM", 40, 312.0, 2400, 200),
    "l40s": GPU("L40S 48GB", 48, 362.0, 256, 100),
    "a10g": GPU("A10G 24GB", 24, 125.0, 256, 100),
    "rtx4090": GPU("RTX 4090 24GB", 24, 165.0, 256, 100),
    "v100": GPU("V100 32GB SXM (fp16)", 32, 125.0, 1200, 100, 128),
}
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed's CPU Adam on the host cores one rank gets (order of magnitude)


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus: int  # in the job
    gpus_per_node: int
    compute_efficiency: float = 0.6  # assumed: the share of peak a step's matmuls reach (0.5-0.7 is typical)
    comm_efficiency: float = 0.8  # assumed: the share of a link's rate a collective reaches (NCCL bus bandwidth)

    def link_bytes_per_s(self, ranks_apart: int, group: int) -> float:
        """A group of `group` ranks whose neighbours are `ranks_apart` apart: within a node, or across nodes."""
        within = ranks_apart * group <= self.gpus_per_node
        gbps = self.gpu.intra_node_gbps if within else self.gpu.inter_node_gbps
        return gbps * 1e9 / 8 * self.comm_efficiency


@dataclass
class StepTime:
    flops_per_step: float  # model FLOPs (forward + backward, no recompute): the training log's count
    compute_s: float  # the slowest stage's matmuls, pipeline bubble included
    bubble_s: float  # of compute_s: the pipeline's fill and drain
    tp_s: float
    pp_s: float
    dp_s: float  # exposed (not hidden behind the backward)
    offload_s: float  # offloaded states: PCIe transfers and the host's Adam step
    tp_bytes: float  # per rank per step
    pp_bytes: float
    dp_bytes: float
    step_s: float
    model_share: float  # of the step, the time the model FLOPs take at the assumed rate (bubble, recompute,
    #                     exposed communication and offload are the rest): 1.0 when nothing but the model computes
    mfu: float  # compute_efficiency x model_share: follows from the assumption, measures nothing
    tokens_per_s: float
    ep_s: float = 0.0  # expert parallelism's all-to-alls (not overlapped)
    ep_bytes: float = 0.0  # per rank per step
    cp_s: float = 0.0  # context parallelism's all-to-alls (not overlapped)
    cp_bytes: float = 0.0  # per rank per step


def _all_reduce(nbytes: float, n: int) -> float:
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def all_to_all_bytes(cfg: Config, moe_layers: int, grad_accum: int, precision: str) -> float:
    """What one rank sends per step in expert parallelism's all-to-alls: per MoE layer and micro-batch, the dispatch of
    each token's top_k copies to the ranks holding their experts and their return, forward and backward (4; 6 when
    full activation checkpointing runs the forward again), each of tokens x top_k x d_model values, of which
    (ep - 1) / ep leave the rank. Every TP rank routes every token of its group (the experts are TP-split within
    each), so none of it divides by tp."""
    ep, m, t = cfg.parallel.ep, cfg.model, cfg.train
    if ep == 1 or not moe_layers:
        return 0.0
    rows = t.micro_batch_size * cfg.data.seq_len * m.moe_top_k
    passes = 4 + (2 if t.activation_checkpointing == "full" else 0)
    return passes * moe_layers * grad_accum * rows * m.d_model * bytes_per_value(precision) * (ep - 1) / ep


def context_bytes(cfg: Config, layers: int, tp: int, grad_accum: int, precision: str) -> float:
    """What one rank sends per step in context parallelism's all-to-alls: per block and micro-batch, q, k and v to
    head shards and the output back (each over the rank's b x s / cp tokens, its TP rank's heads: KV heads repeated
    when cp needs it), forward and backward, and again when attention is recomputed (full or selective
    checkpointing); (cp - 1) / cp of each leaves the rank."""
    cp, m, t = cfg.parallel.cp, cfg.model, cfg.train
    if cp == 1:
        return 0.0
    hd, kv = head_dim(m), kv_heads(m) // tp
    width = (2 * m.n_heads // tp + 2 * kv * kv_repeat(kv, cp)) * hd
    passes = 2 + (1 if t.activation_checkpointing != "none" else 0)
    tokens = t.micro_batch_size * cfg.data.seq_len // cp
    return passes * layers * grad_accum * tokens * width * bytes_per_value(precision) * (cp - 1) / cp


def step_time(cfg: Config, stages: list[StageParams], tp: int, pp: int, dp: int, grad_accum: int, precision: str,
              cluster: Cluster) -> StepTime:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    ep = p.ep
    w = bytes_per_value(precision)
    s, b = cfg.data.seq_len, t.micro_batch_size
    tokens_mb = b * s // p.cp  # a context-parallel rank computes its slice's tokens (and its heads' share of attention)
    flops_per_step = train_flops_per_token(m, s) * t.global_batch_size * s
    attention_proj, mlp, mix = block_flops_per_token(m, s, causal=m.objective == "causal")
    proj = attention_proj + mlp
    # recomputed in the backward: the whole block's forward (full), or attention's (selective: its projections too)
    recompute = {"full": proj + mix, "selective": attention_proj + mix, "none": 0.0}[t.activation_checkpointing]
    head = 2 * m.d_model * m.vocab_size
    rate = cluster.gpu.tflops * 1e12 * cluster.compute_efficiency

    def stage_seconds(st: StageParams) -> float:  # one micro-batch, forward + backward (+ recompute) on one rank
        per_token = st.layers * (3 * (proj + mix) + recompute) + (3 * head if st.last else 0)
        if m.moe_experts:  # the stage's own blocks: its MoE ones' feed-forward, the rest dense
            dense = 2 * m.d_model * ffn_width(m) * mlp_matrices(m)
            mlps = st.moe_layers * moe_flops_per_token(m) + (st.layers - st.moe_layers) * dense
            again = 1 if t.activation_checkpointing == "full" else 0  # the MLP recomputed too
            per_token += (3 + again) * (mlps - st.layers * mlp)
        return per_token * tokens_mb / tp / rate

    per_mb = max(stage_seconds(st) for st in stages)
    compute = per_mb * (grad_accum + pp - 1)
    bubble = per_mb * (pp - 1)
    act = tokens_mb * m.d_model * w
    tp_link = cluster.link_bytes_per_s(1, tp)
    # per block: two all-reduces forward (attention, MLP outputs), two backward (their inputs' gradients), two more
    # when the block is recomputed; sequence parallel swaps each for a reduce-scatter + all-gather of the same volume
    layers = max(st.layers for st in stages)
    n_ar = layers * (4 + (2 if t.activation_checkpointing == "full" else 0)) + 2  # + the embedding and the head's input
    if shared_ffn_width(m):  # a MoE layer's shared MLP reduces its own output: one more forward, one more backward
        n_ar += max(st.moe_layers for st in stages) * (2 + (1 if t.activation_checkpointing == "full" else 0))
    tp_bytes = n_ar * _all_reduce(act, tp) * grad_accum
    pp_bytes = 2 * act / (tp if p.sequence_parallel and tp > 1 else 1) * (grad_accum if pp > 1 else 0)
    pp_link = cluster.link_bytes_per_s(tp * dp, 2)
    big = max(stages, key=lambda st: st.local)
    local = big.local

    def zero_bytes(params: int, n: int) -> float:  # what ZeRO sends per rank per step for params over n ranks
        share = (n - 1) / n if n > 1 else 0.0
        if p.zero_stage <= 1:  # one all-reduce (ZeRO-1: reduce-scatter + all-gather) of the gradients per step
            return 2 * share * w * params
        if p.zero_stage == 2:  # reduce-scatter every micro-batch, all-gather the updated parameters once
            return share * w * params * (grad_accum + 1)
        return 3 * share * w * params * grad_accum  # all-gather forward and backward, reduce-scatter, every micro-batch

    hidden = 0.0 if p.zero_stage <= 1 else 2 / 3 * compute
    # the dense parameters over every data-parallel rank, the experts over the dp / ep ranks holding the same ones
    dense_bytes, expert_bytes = zero_bytes(big.dense, dp), zero_bytes(big.expert, dp // ep)
    dp_bytes = dense_bytes + expert_bytes
    dp_total = dense_bytes / cluster.link_bytes_per_s(tp, dp)
    if expert_bytes:
        dp_total += expert_bytes / cluster.link_bytes_per_s(tp * ep, dp // ep)
    tp_s, pp_s = tp_bytes / tp_link, (pp_bytes * (grad_accum + pp - 1) / max(grad_accum, 1)) / pp_link
    dp_s = max(0.0, dp_total - hidden)
    ep_bytes = all_to_all_bytes(cfg, max(st.moe_layers for st in stages), grad_accum, precision)
    ep_s = ep_bytes / cluster.link_bytes_per_s(tp, ep) if ep_bytes else 0.0
    cp_bytes = context_bytes(cfg, layers, tp, grad_accum, precision)
    cp_s = cp_bytes / cluster.link_bytes_per_s(tp, p.cp) if cp_bytes else 0.0  # (cp ranks are tp apart, as EP's)
    offload_s = 0.0
    part = big.dense / dp + big.expert / (dp // ep) if p.zero_stage >= 1 else local
    host_link = cluster.gpu.host_gbps * 1e9 / 8 * cluster.comm_efficiency
    if p.offload_optimizer:  # gradients down, updated parameters up, Adam on the host
        offload_s += (FP32 + w) * part / host_link + part / CPU_ADAM_PARAMS_PER_S
    if p.offload_params:  # every micro-batch reads the partition from the host, forward and backward
        offload_s += 2 * w * part * grad_accum / host_link
    step = compute + tp_s + pp_s + dp_s + offload_s + ep_s + cp_s
    world = tp * pp * dp
    model_share = flops_per_step / (world * rate) / step
    return StepTime(flops_per_step, compute, bubble, tp_s, pp_s, dp_s, offload_s, tp_bytes, pp_bytes, dp_bytes, step,
                    model_share, cluster.compute_efficiency * model_share, t.global_batch_size * s / step, ep_s,
                    ep_bytes, cp_s, cp_bytes)
