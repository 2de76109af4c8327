"""One run's wiring, shared by every entrypoint (pretrain, finetune, the checkpoint writer of `convert`).

    run = Run.start(cfg, resolved)   # layout checked, process groups up, grid, accumulation, precision
    model = build_on_meta(run.cfg.model)  # the plain model's shapes, alike on every rank (or a model with values)
    engine = run.engine(model)       # TP/PP applied in one place, each rank's values, then deepspeed.initialize
    state = run.resume(engine)       # from checkpoint.dir/latest, if there is one

An entrypoint adds only what is its own: its data, its task (batches, loss, FLOPs) and what it prints.

The config the user asked for stays as it is (load_config froze it); what the run derives from it and its inputs
(init's shape, the padded vocabulary, the labels, an epochs-long run's steps) is the run's Resolved, and `run.cfg` is
the two together: the config the run trains with. A checkpoint saves both.
"""
from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatrain.checkpoint import async_save, manifest
from megatrain.checkpoint import io as checkpoint
from megatrain.checkpoint.lock import acquire
from megatrain.checkpoint.source import WeightSource
from megatrain.config import (Config, ConfigError, ModelConfig, kv_heads, padded_vocab_size, validate,
                              validate_world)
from megatrain.resolved import Resolved
from megatrain.parallel.context import describe_cp
from megatrain.parallel.parallelize import parallelize
from megatrain.parallel.rng import seed_tp_stream, tp_stream_seed
from megatrain.parallel.topology import Layout, build_grid, check_layout
from megatrain.parameters import numel
from megatrain.training.dist_env import discover, init_distributed, log0, share_cpu_cores
from megatrain.training.engine import build_engine, deepspeed_config, effective_zero_stage, resolve_precision


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


@dataclass
class Run:
    """This process's place in the job: the layout, its process groups and what follows from the world size."""

    asked: Config  # the config as the user gave it (read-only)
    resolved: Resolved  # what the run derived (see derive)
    cfg: Config  # the effective config: `asked` with `resolved` laid over it
    layout: Layout
    grid: Any  # DeepSpeed's PipelineParallelGrid over the layout (the `mpu`)
    launcher: str  # which launcher started the ranks (deepspeed/torchrun, slurm, single)
    rank: int
    grad_accum: int  # micro-batches per optimizer step on each data-parallel rank
    precision: str  # fp32 | bf16 | fp16 (train.precision resolved for this machine)
    ranks_on_node: int = 1  # ranks of the job sharing this machine (they share its CPU cores, for the MFU peak)
    saved: dict | None = None  # megatrain.json of the checkpoint resumed from, if any
    saved_rng: dict | None = None  # that checkpoint's RNG states for this rank, restored by start_rng()
    reshard: Any = None  # latest, saved under another layout (training/elastic.py); found by reshard_source()
    rng_step: int = 0  # the step a run resumed from without RNG states (an elastic resume) seeds from

    @classmethod
    def start(cls, asked: Config, resolved: Resolved | None = None) -> "Run":
        """Check the layout before any process group exists (one line for every impossible one), then start
        torch.distributed and build the TP x PP x DP grid (a collective: every rank calls it). `resolved`: what the
        run derived so far (default: nothing, the config's own values)."""
        # the stage is worked out for this run's layout below: a checkpoint's Resolved (convert's writer) holds the
        # stage of the layout it was saved under, which the layout check must not see
        resolved = (resolved or Resolved.of(asked)).but(zero_stage=None)
        cfg = resolved.apply(asked)
        me = discover()
        layout = check_layout(cfg, me.world_size)
        resolved = resolved.but(zero_stage=effective_zero_stage(cfg, layout.dp, layout.pp))
        cfg = resolved.apply(asked)
        if me.rank == 0:  # one run per checkpoint.dir (a second is refused here, before any process group)
            checkpoint.check_resumable(cfg)  # a checkpoint.dir holding another kind of run, before it is locked
            took_over = acquire(cfg.checkpoint.dir)
            if took_over:
                print(took_over, flush=True)
        info = init_distributed(cfg.parallel.timeout_minutes)
        if not torch.cuda.is_available():
            log0(share_cpu_cores(info.ranks_on_node))
        grad_accum = validate_world(cfg, dist.get_world_size())
        return cls(asked, resolved, cfg, layout, build_grid(layout), info.launcher, dist.get_rank(), grad_accum,
                   resolve_precision(cfg), info.ranks_on_node)

    def derive(self, **changes) -> Config:
        """Record values the run derived after it started (Resolved's fields); returns the new effective config."""
        self.resolved = self.resolved.but(**changes)
        self.cfg = self.resolved.apply(self.asked)
        return self.cfg

    @property
    def world(self) -> int:
        return self.layout.world_size

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group (parallel/expert.py: consecutive data-parallel ranks)."""
        return self.dp_rank % self.cfg.parallel.ep

    @property
    def record(self) -> dict:
        """The layout as a checkpoint records it (and checks it on resume)."""
        p = self.cfg.parallel
        return dict(world_size=self.world, dp=self.layout.dp, tp=self.layout.tp, pp=self.layout.pp,
                    zero_stage=p.zero_stage, sequence_parallel=p.sequence_parallel, ep=p.ep, cp=p.cp)

    def describe(self, n_params: int) -> str:
        cp = ""
        if self.layout.cp > 1:
            cp = f" | {describe_cp(kv_heads(self.cfg.model), self.layout.tp, self.layout.cp)}"
        zero, asked = self.cfg.parallel.zero_stage, self.asked.parallel.zero_stage
        zero = f"ZeRO-{zero}" + (f" (ZeRO-{asked} asked: one data-parallel rank has nothing to partition)"
                                 if zero != asked else "")
        return (f"launcher {self.launcher} | world {self.world} = {self.layout} | "
                f"{zero} | {self.precision} | {n_params / 1e6:.2f}M parameters | "
                f"grad accumulation {self.grad_accum}{cp}")

    def engine(self, model, weights=None, log_ranks: bool = True, release=None):
        """TP split, activation checkpointing and pipeline stages (parallelize), then deepspeed.initialize. A model
        built on the meta device gets this rank's slices of `weights(name)`'s full tensors, or else of its seeded
        initial values; `release()`, if given, is called once they are placed (closing the weights' files before
        DeepSpeed allocates its states: a Hugging Face folder's safetensors are memory-mapped, and every page read
        counts in the rank's resident memory while they stay open)."""
        module = parallelize(model, self.cfg, self.layout, self.grid, weights, deepspeed_config(self.cfg, self.world))
        if release is not None:
            release()
        local_params = sum(numel(p) for p in module.parameters())  # the full sizes, also of ZeRO-3's partitions
        engine, _, _, _ = build_engine(self.cfg, module, self.world, mpu=None if self.layout.pp > 1 else self.grid)
        checkpoint.harden(engine)  # NOTE: before any load or save of a checkpoint
        if log_ranks:
            self.log_rank_table(local_params)
        return engine

    def frozen_engine(self, model, weights):
        """A second, frozen model beside the trained one (dpo's held reference): the same TP cut and ZeRO-3
        partitioning as engine(), filled with `weights(name)`, in eval mode, no gradients, no optimizer. Its
        DeepSpeed engine (stage 3 kept, else 0) gathers a partitioned model's weights in its forwards, as in an
        evaluation. No activation checkpointing: it never runs a backward."""
        import deepspeed

        cfg = self.cfg.replaced({"train.activation_checkpointing": "none"})
        ds = deepspeed_config(cfg, self.world, local_params=None)
        module = parallelize(model, cfg, self.layout, self.grid, weights, ds)
        for p in module.parameters():
            p.requires_grad = False
        if cfg.parallel.zero_stage != 3:
            ds["zero_optimization"] = {"stage": 0}
        engine, _, _, _ = deepspeed.initialize(model=module, config=ds, mpu=self.grid)
        engine.eval()
        return engine

    def will_resume(self) -> bool:
        """checkpoint.dir/latest exists and checkpoint.resume is on."""
        return self.cfg.checkpoint.resume and checkpoint.read_latest(self.cfg.checkpoint.dir) is not None

    def reshard_source(self) -> WeightSource | None:
        """When checkpoint.dir/latest was saved under another layout (and checkpoint.elastic): its weights, for
        engine(); resume() then brings in its optimizer state and saves it under this layout. Collective."""
        from megatrain.training import elastic

        self.reshard = elastic.find(self)
        return self.reshard.source if self.reshard else None

    def verify_init(self, source: WeightSource) -> None:
        """checkpoint.init / finetune.init's files against their manifest's CRC-32s (checkpoint.verify=full; the
        sizes were checked when the source was opened), the ranks sharing the files. Collective."""
        if source.reader is None or self.cfg.checkpoint.verify != "full":
            return
        problem = manifest.verify(source.reader.folder, "full")
        if problem:
            raise ConfigError(f"{problem}; {checkpoint.fall_back(source.reader.dir, source.reader.tag, 'start from')}")

    def resume(self, engine) -> TrainState:
        """checkpoint.dir/latest (if any, and checkpoint.resume) into the engine; the step and samples it reached."""
        if self.reshard is not None:
            from megatrain.training import elastic

            saved = self.saved = elastic.load(self, engine, self.reshard)
            self.reshard = None
        else:
            saved = self.saved = checkpoint.resume(engine, self.cfg, self.record)
        if not saved:
            return TrainState()
        self.saved_rng = saved.pop("rng")
        state = TrainState(saved["step"], saved["consumed_samples"])
        if self.saved_rng is None:
            self.rng_step = state.step
        log0(f"resumed from {self.cfg.checkpoint.dir}/{checkpoint.read_pointer(self.cfg.checkpoint.dir, 'latest')} "
             f"at step {state.step} ({state.consumed_samples:,} samples consumed)")
        return state

    def start_rng(self) -> None:
        """Called right before the first step (NOTE: last, after anything else that draws random numbers, such as
        measuring the MFU peak): the resumed checkpoint's RNG states, so the dropout masks continue exactly; in a
        fresh run a seed of this rank's own. Every data-parallel rank draws its own dropout masks (identical masks
        on every replica would waste the data parallelism's samples); the tensor-parallel ranks of one replica draw
        alike, as the activations between their split layers are replicas that must stay equal, except where each
        holds its own part (attention heads; tokens under sequence parallelism: parallel/rng.py)."""
        if self.saved_rng is not None:
            checkpoint.set_rng_state(self.saved_rng)
            self.saved_rng = None
            return
        replica = self.pp_rank * self.layout.dp + self.dp_rank
        seed = self.cfg.train.seed + 104_729 * self.rng_step  # (rng_step: 0 unless resumed without RNG states)
        torch.manual_seed(seed * 1_000_003 + 7919 * replica + 1)
        if self.layout.tp > 1 and self.cfg.model.dropout > 0:  # attention's (and SP's) own stream per TP rank
            seed_tp_stream(tp_stream_seed(seed, replica, self.tp_rank))

    def save(self, engine, state: TrainState, extra: dict | None = None, best: bool = False) -> str:
        """Save a checkpoint of `state` (`best`: DIR/best names it too). Under checkpoint.async_save the files are
        written in the background: poll_save() at each step boundary commits it once written, finish_saves() before
        the run ends."""
        return checkpoint.save(engine, self.asked, self.resolved, state.step, state.consumed_samples, self.record,
                               extra, best=best, background=self.cfg.checkpoint.async_save)

    def poll_save(self, engine) -> None:
        """At a step boundary: commit the background save in flight once every rank has written it (collective)."""
        async_save.poll(engine)

    def finish_saves(self, engine, before: str = "the end of the run") -> None:
        """Wait for the background save in flight, if any, and commit it (collective)."""
        async_save.wait(engine, before)

    def log_rank_table(self, local_params: int) -> None:
        """Each rank's place in the layout, its parameter count and its memory, printed by rank 0."""
        if torch.cuda.is_available():
            mem = f"{torch.cuda.memory_allocated() / 2**30:.2f} GiB GPU"
        else:
            mem = f"{peak_rss_bytes() / 2**30:.2f} GiB RSS"
        rows = [None] * self.world
        dist.all_gather_object(rows, (self.rank, local_params, mem))
        for r, n, m in rows:
            pp, dp, tp = self.layout.coords(r)
            log0(f"  rank {r:>3}: pp {pp} dp {dp} tp {tp} | {n / 1e6:8.2f}M parameters | {m}")


def proc_status_bytes(key: str, pid: int | str = "self") -> int | None:
    """A memory figure of /proc/PID/status in bytes (VmRSS: resident now, VmHWM: its peak); None where there is no
    /proc (not Linux) or no such key."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory: /proc's VmHWM, which starts afresh at exec (getrusage's ru_maxrss keeps
    the RSS of the process it was forked from: a rank spawned by a 1.2 GB parent reported 1.3 GB before doing a thing)."""
    hwm = proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux (bytes on macOS: close enough)


MAY_DIFFER_FROM_INIT = ("dropout", "fused_kernels", "compile")  # model keys a run may set apart from its checkpoint.init
# with RoPE, the context a model is trained for: no weight depends on these, so a run may raise them over its
# checkpoint.init (long-context continued pretraining: a longer max_seq_len, a larger base or a scaling)
CONTEXT_KEYS = ("max_seq_len", "rope_theta", "rope_scaling", "rope_factor", "rope_original_max_len",
                "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow")


def adopt_init(cfg: Config, key: str = "checkpoint.init") -> tuple[WeightSource | None, Resolved]:
    """checkpoint.init / finetune.init: the model's shape, and the tokenizer unless the config sets one, come from
    those weights (a megatrain checkpoint of any layout, a convert output or a Hugging Face folder); a model.* key the
    config sets to something else is refused (dropout and fused_kernels may differ, and a RoPE model's CONTEXT_KEYS,
    which the config's values then set). Returns the WeightSource
    (nothing loaded yet; None when the key is empty) and the Resolved holding what was taken from it (cfg stays
    as it is)."""
    section, name = key.split(".")
    path = getattr(getattr(cfg, section), name)
    resolved = Resolved.of(cfg)
    if not path:
        return None, resolved
    source = WeightSource(path, cfg.parallel.tp)
    explicit = getattr(cfg, "explicit", set())
    shape = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name in MAY_DIFFER_FROM_INIT:
            continue
        mine, theirs = getattr(cfg.model, f.name), getattr(source.model, f.name)
        if f"model.{f.name}" in explicit and f.name in CONTEXT_KEYS and source.model.position == "rope":
            shape[f.name] = mine
            continue
        if f"model.{f.name}" in explicit and mine != theirs:
            source.close()
            raise ConfigError(f"config key model.{f.name}: {mine!r} contradicts {key} {source.where}, which has "
                              f"{theirs!r}; leave model.* out of the config (the model comes from {key})")
        shape[f.name] = theirs
    model = dataclasses.replace(cfg.model, **shape)
    resolved = resolved.but(model=model,
                            tokenizer=cfg.data.tokenizer if "data.tokenizer" in explicit else source.tokenizer,
                            seq_len=cfg.data.seq_len if "data.seq_len" in explicit else
                            min(cfg.data.seq_len, model.max_seq_len))
    validate(resolved.apply(cfg))
    return source, resolved


def resolve_vocab(cfg: Config, tokenizer) -> ModelConfig:
    """cfg.model with vocab_size from the tokenizer (rounded up to pad_vocab_multiple and to a multiple of tp) when
    0; a set value smaller than the tokenizer's vocabulary is refused."""
    m = cfg.model
    if m.vocab_size == 0:
        return dataclasses.replace(m, vocab_size=padded_vocab_size(tokenizer.vocab_size, m.pad_vocab_multiple,
                                                                   cfg.parallel.tp))
    if m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"config key model.vocab_size: {m.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}")
    return m
