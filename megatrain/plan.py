"""`megatrain plan --config C [--set ...] --gpus N (--gpu NAME | --gpu-memory GB) [--search]`: memory per rank and
time per step of a run before it is launched.

    megatrain plan --config llama-7b --set model.vocab_size=32000 --gpus 8 --gpu h100
    megatrain plan --config llama-70b --set model.vocab_size=32000 --gpus 64 --gpu h100 --search

The plan prints, per rank (per pipeline stage when pp > 1): parameters, gradients and optimizer states as the
config's ZeRO stage and precision keep them (device and, with offload, host), ZeRO-3's gathered parameters, the
activations of the micro-batches in flight (with activation checkpointing and sequence parallelism), the peak, and
the host memory every rank needs at start-up; then the FLOPs per step (the training log's count), the pipeline
bubble, what TP, PP and DP/ZeRO send, and the step time they add up to at an assumed share of the GPUs' peak
(--compute-efficiency, printed as an assumption); the MFU line, shown when the layout spends part of the step on
something other than the model's FLOPs, is that assumption times the share they fill. --search ranks every layout of
the GPUs that fits by predicted step time and prints the best as --set lines.
"""
from __future__ import annotations

import argparse

from megatrain.config import Config, ConfigError, padded_vocab_size

GiB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    from megatrain.planning.timing import KNOWN_GPUS

    p.add_argument("--config", default="tiny", help="a YAML file or preset name (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    p.add_argument("--gpu", choices=sorted(KNOWN_GPUS), help="a known GPU: its memory, bf16 peak and links")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU in GB (overrides --gpu's)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, a divisor of --gpus (default: min(8, --gpus))")
    p.add_argument("--gpu-tflops", type=float, metavar="T", help="dense bf16 peak TFLOP/s per GPU (overrides --gpu's)")
    p.add_argument("--intra-node-gbps", type=float, metavar="B1", help="per-GPU link within a node, Gbit/s one way")
    p.add_argument("--inter-node-gbps", type=float, metavar="B2", help="per-GPU network between nodes, Gbit/s one way")
    p.add_argument("--compute-efficiency", type=float, default=0.6,
                   help="assumed share of the peak a step's matmuls reach (default 0.6); compute time follows from it")
    p.add_argument("--search", action="store_true", help="rank every layout of the GPUs that fits")
    p.add_argument("--top", type=int, default=5, help="--search: layouts to print (default 5)")


def cluster_from_args(args):
    """The --gpu preset with any explicit flag over it."""
    from megatrain.planning.timing import GPU, KNOWN_GPUS, Cluster

    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: must be at least 1")
    base = KNOWN_GPUS.get(args.gpu)
    if base is None and args.gpu_memory is None:
        raise ConfigError(f"give --gpu NAME ({', '.join(sorted(KNOWN_GPUS))}) or --gpu-memory GB")
    for flag, v in (("--gpu-memory", args.gpu_memory), ("--gpu-tflops", args.gpu_tflops),
                    ("--intra-node-gbps", args.intra_node_gbps), ("--inter-node-gbps", args.inter_node_gbps)):
        if v is not None and not v > 0:
            raise ConfigError(f"{flag} {v}: must be above 0")
    if not 0 < args.compute_efficiency <= 1:
        raise ConfigError(f"--compute-efficiency {args.compute_efficiency}: must be in (0, 1]")
    gpu = GPU(base.name if base else "GPU", args.gpu_memory or base.memory_gb,
              args.gpu_tflops or (base.tflops if base else 0.0),
              args.intra_node_gbps or (base.intra_node_gbps if base else 2400.0),
              args.inter_node_gbps or (base.inter_node_gbps if base else 200.0))
    per_node = min(8, args.gpus) if args.gpus_per_node is None else args.gpus_per_node
    if per_node < 1:
        raise ConfigError(f"--gpus-per-node {per_node}: must be at least 1")
    if args.gpus_per_node is not None and args.gpus % per_node:  # the job's nodes each hold the same share
        raise ConfigError(f"--gpus-per-node {per_node} does not divide --gpus {args.gpus}: give the GPUs the job "
                          f"uses on each of its nodes, the same on every node (on one node: --gpus-per-node "
                          f"{args.gpus})")
    return Cluster(gpu, args.gpus, per_node, compute_efficiency=args.compute_efficiency)


def resolve_model(cfg: Config) -> tuple[Config, int]:
    """What a run would take from elsewhere: the model of checkpoint.init / finetune.init, and model.vocab_size from
    the tokenizer (rounded up as training rounds it) when the config leaves it 0. Returns the config a run would
    train with, and the tokenizer's vocabulary when the model's came from it (else 0: the search pads it again for
    each tp, as training would)."""
    from megatrain.training.runtime import adopt_init

    for key in ("checkpoint.init", "finetune.init"):
        source, resolved = adopt_init(cfg, key)
        if source is not None:
            source.close()
            cfg = resolved.apply(cfg)
    m = cfg.model
    if m.vocab_size:
        return cfg, 0
    if cfg.data.path in (None, "", []) and "data.tokenizer" not in getattr(cfg, "explicit", set()):
        from megatrain.corpus import VOCAB_SIZE as n  # the built-in corpus's tokenizer
    else:
        from megatrain.data import build_tokenizer

        n = build_tokenizer(cfg.data.tokenizer).vocab_size
    return cfg.replaced({"model.vocab_size": padded_vocab_size(n, m.pad_vocab_multiple, cfg.parallel.tp)}), n


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def render(plan, cluster, title: str) -> list[str]:
    from megatrain.planning.search import deepspeed_estimate, usable_bytes

    cfg, t, p = plan.cfg, plan.cfg.train, plan.cfg.parallel
    lines = [title,
             f"layout: tp {plan.tp} x pp {plan.pp} x dp {plan.dp}{f' (ep {plan.ep})' if cfg.model.moe_experts else ''}"
             f"{f' (cp {p.cp}: {plan.dp // p.cp} sample streams of {p.cp} slices)' if p.cp > 1 else ''}"
             f" | ZeRO-{p.zero_stage}"
             f"{' + offload optimizer' if p.offload_optimizer else ''}{' + offload params' if p.offload_params else ''}"
             f" | {plan.precision} | micro-batch {t.micro_batch_size} x {cfg.data.seq_len} tokens, global batch "
             f"{t.global_batch_size} (accumulation {plan.grad_accum}) | activation checkpointing "
             f"{t.activation_checkpointing}{' | sequence parallel' if p.sequence_parallel else ''}"]
    shown = list(range(plan.pp)) if plan.pp <= 4 else sorted({0, plan.pp - 1, max(range(plan.pp), key=plan.stage_peak)})
    head = f"{'memory per rank, GiB':<38}" + "".join(f"{'stage ' + str(s) if plan.pp > 1 else 'device':>10}" for s in shown)
    lines += ["", head + f"{'host':>10}"]

    def row(label, values, host=None):
        lines.append(f"  {label:<36}" + "".join(f"{_gib(v):>10}" for v in values) + (f"{_gib(host):>10}" if host is not None else ""))

    st, a = plan.states, plan.acts
    m = cfg.model
    if m.moe_experts:
        moe = max(x.moe_layers for x in plan.stages)
        lines.insert(2, f"experts: {m.moe_experts // plan.ep} of {m.moe_experts} per MoE layer on each rank (ep "
                        f"{plan.ep}), {moe} MoE layers per stage; expert states partitioned over the "
                        f"{plan.dp // plan.ep} data-parallel ranks holding the same experts, the rest over {plan.dp}")
    row("parameters", [st[s].params[0] for s in shown], max(x.params[1] for x in st))
    row("gradients", [st[s].grads[0] for s in shown], max(x.grads[1] for x in st))
    row("optimizer (fp32 master + Adam)", [st[s].optimizer[0] for s in shown], max(x.optimizer[1] for x in st))
    row("ZeRO reduce bucket", [st[s].buffers[0] for s in shown])
    if p.zero_stage == 3:
        row("ZeRO-3 gathered parameters", [st[s].gathered for s in shown])
    inflight = "/".join(str(a[s].in_flight) for s in shown)
    row(f"activations ({inflight} in flight)", [a[s].saved for s in shown])
    if t.activation_checkpointing != "none":
        row("recomputed block (backward)", [a[s].recompute for s in shown])
    if plan.pp > 1:
        row("pipeline receive buffers", [a[s].buffers for s in shown])
    row("peak", [plan.stage_peak(s) for s in shown])
    limit = usable_bytes(cluster)
    verdict = "fits" if plan.peak <= limit else f"does NOT fit (needs {plan.peak / GiB:.1f} GiB)"
    lines.append(f"  -> {verdict}: usable {limit / GiB:.1f} GiB of a {cluster.gpu.memory_gb:g} GB {cluster.gpu.name}")
    est = deepspeed_estimate(plan, cluster.gpus)
    if est is not None:
        lines.append(f"  DeepSpeed's estimate_zero{p.zero_stage}_model_states_mem_needs: {est / GiB:.2f} GiB per GPU "
                     f"(this plan's model states: {max(x.device + x.gathered for x in st) / GiB:.2f} GiB)")
    from megatrain.planning.memory import startup_host_bytes

    boot = startup_host_bytes(cfg.model, plan.tp, plan.pp, plan.dp, p.zero_stage, plan.precision, ep=plan.ep)
    read = startup_host_bytes(cfg.model, plan.tp, plan.pp, plan.dp, p.zero_stage, plan.precision, from_weights=True,
                              ep=plan.ep)
    share = f"its ZeRO-3 partition in {plan.precision}" if p.zero_stage == 3 else "the rank's share in fp32"
    lines.append(f"  start-up host memory: {boot / GiB:.1f} GiB per rank, {boot * cluster.gpus_per_node / GiB:.1f} GiB per "
                 f"node of {cluster.gpus_per_node} ({share} and one full tensor; starting from weights, checkpoint.init "
                 f"or finetune.init, one more as read: {read / GiB:.1f} GiB per rank)")
    if plan.host:
        lines.append(f"  host memory for offloaded states: {plan.host / GiB:.1f} GiB per rank")
    tm = plan.time
    if tm is None:
        lines.append("\n(no step time: give --gpu or --gpu-tflops)")
        return lines
    lines += ["", f"time per step ({cluster.gpus} x {cluster.gpu.tflops:g} TFLOP/s peak, links "
                  f"{cluster.gpu.intra_node_gbps:g} / {cluster.gpu.inter_node_gbps:g} Gbit/s within / between nodes of "
                  f"{cluster.gpus_per_node})",
              "  " + assumptions(cluster),
              f"  FLOPs per step       {tm.flops_per_step:.3e} (model FLOPs, as the training log counts them)",
              f"  compute              {tm.compute_s:8.3f} s (pipeline bubble {tm.bubble_s:.3f} s)",
              f"  TP all-reduces       {tm.tp_s:8.3f} s ({tm.tp_bytes / 1e9:.2f} GB per rank)",
              f"  PP sends             {tm.pp_s:8.3f} s ({tm.pp_bytes / 1e9:.2f} GB per rank)",
              f"  DP/ZeRO collectives  {tm.dp_s:8.3f} s exposed ({tm.dp_bytes / 1e9:.2f} GB per rank)",
              *([f"  EP all-to-alls       {tm.ep_s:8.3f} s ({tm.ep_bytes / 1e9:.2f} GB per rank)"]
                if m.moe_experts else []),
              *([f"  CP all-to-alls       {tm.cp_s:8.3f} s ({tm.cp_bytes / 1e9:.2f} GB per rank)"] if p.cp > 1 else []),
              *([f"  {'host offload':<21}{tm.offload_s:8.3f} s (PCIe transfers, Adam on the host)"] if tm.offload_s else []),
              f"  step                 {tm.step_s:8.3f} s | {tm.tokens_per_s:,.0f} tokens/s"]
    if tm.model_share < 1 - 1e-6:  # at 1.0 the MFU would only be the assumption read back
        lines.append(f"  MFU                  {tm.mfu:.1%} = the assumed {cluster.compute_efficiency:.0%} x "
                     f"{tm.model_share:.1%}, the step's share in model FLOPs (the rest: bubble, recompute, "
                     f"exposed communication, offload)")
    return lines


def assumptions(cluster) -> str:
    """The rates the step time rests on: chosen, not measured."""
    return (f"assumed: {cluster.compute_efficiency:.0%} of peak in matmuls (--compute-efficiency), "
            f"{cluster.comm_efficiency:.0%} of a link's rate in collectives")


def command(args: argparse.Namespace) -> int:
    from megatrain.config import load_config
    from megatrain.planning.memory import active_params, total_params
    from megatrain.planning.search import plan_layout, resolve_precision, search

    cfg = load_config(args.config, args.set)
    cluster = cluster_from_args(args)
    cfg, tokenizer_vocab = resolve_model(cfg)
    precision = resolve_precision(cfg, for_gpus=True)
    timed = cluster if cluster.gpu.tflops > 0 else None  # no peak rate: memory only
    m = cfg.model
    active = f", {active_params(m) / 1e9:.2f}B active per token" if m.moe_experts else ""
    title = (f"megatrain plan: {args.config} ({total_params(m) / 1e9:.2f}B parameters{active}, vocab "
             f"{cfg.model.vocab_size}) on {args.gpus} x {cluster.gpu.name}, {cluster.gpus_per_node} per node")
    if not args.search:
        print("\n".join(render(plan_layout(cfg, args.gpus, timed, precision), cluster, title)))
        return 0
    if timed is None:
        raise ConfigError("--search ranks layouts by step time: give --gpu NAME or --gpu-tflops")
    fits, smallest = search(cfg, cluster, precision, tokenizer_vocab)
    if not fits:
        from megatrain.planning.search import usable_bytes

        raise ConfigError(f"no layout of {args.gpus} GPUs fits (offload included): the smallest needs "
                          f"{smallest / GiB:.1f} GiB per GPU of {usable_bytes(cluster) / GiB:.1f} GiB usable; add GPUs "
                          f"or shorten data.seq_len")
    print(title)
    print(assumptions(cluster) + "; 'model' below: the step's share in model FLOPs (MFU = the assumed "
          f"{cluster.compute_efficiency:.0%} x it)")
    print(f"{len(fits)} layouts fit; fastest first:")
    moe = cfg.model.moe_experts > 0  # an ep column for a MoE model, a cp column for a dense one
    ep_head = f" {'ep':>3}" if moe else f" {'cp':>3}"
    print(f"  {'#':>2} {'tp':>3} {'pp':>3} {'dp':>4}{ep_head} {'ZeRO':>4} {'offload':>8} {'mb':>3} {'ckpt':>9} "
          f"{'sp':>3} {'peak GiB':>9} {'step s':>8} {'model':>6}")
    for i, pl in enumerate(fits[: args.top], 1):
        c = pl.cfg
        off = "+".join(k for k, on in (("opt", c.parallel.offload_optimizer), ("param", c.parallel.offload_params)) if on)
        ep_col = f" {pl.ep:>3}" if moe else f" {c.parallel.cp:>3}"
        print(f"  {i:>2} {pl.tp:>3} {pl.pp:>3} {pl.dp:>4}{ep_col} {c.parallel.zero_stage:>4} {off or '-':>8} "
              f"{c.train.micro_batch_size:>3} "
              f"{c.train.activation_checkpointing:>9} {'y' if c.parallel.sequence_parallel else '-':>3} "
              f"{pl.peak / GiB:>9.1f} {pl.time.step_s:>8.2f} {pl.time.model_share:>6.1%}")
    print("\nbest layout:\n  " + fits[0].sets())
    print("\n".join([""] + render(fits[0], cluster, "plan of the best layout:")[1:]))
    return 0
