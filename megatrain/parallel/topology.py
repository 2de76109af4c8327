"""TP x PP x DP process groups, and the `mpu` object DeepSpeed expects.

Ranks are laid out as DeepSpeed's PipeModelDataParallelTopology does: axes (pipe, data, model), tensor
parallel ('model') fastest, so the ranks of one TP group are adjacent (same node: the TP collectives
are the chattiest). The PipelineParallelGrid built on it is the `mpu`: ZeRO shards over its data
group and gradient norms combine over its model group. Context parallelism (parallel/context.py) and expert
parallelism carve their groups out of consecutive data-parallel ranks, so DeepSpeed sees them as data-parallel ranks
(ZeRO shards over them, gradients are averaged over them) and the grid stays DeepSpeed's own.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatrain.config import Config, ConfigError, ffn_width, kv_heads, moe_ffn_width, shared_ffn_width


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int  # DeepSpeed's data-parallel ranks (ZeRO shards over them); with cp > 1, dp / cp samples at a time
    cp: int = 1  # context-parallel ranks: consecutive data-parallel ranks that share a sample, a slice each

    @property
    def replicas(self) -> int:
        """Data-parallel ranks that read their own samples: dp / cp."""
        return self.dp // self.cp

    def cp_rank(self, dp_rank: int) -> int:
        """Which slice of its sample's sequence a data-parallel rank holds."""
        return dp_rank % self.cp

    def replica(self, dp_rank: int) -> int:
        """Which of the `replicas` sample streams a data-parallel rank reads."""
        return dp_rank // self.cp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return pp_rank, dp_rank, tp_rank

    def __str__(self) -> str:
        if self.cp > 1:
            return f"tp {self.tp} x pp {self.pp} x dp {self.replicas} x cp {self.cp}"
        return f"tp {self.tp} x pp {self.pp} x dp {self.dp}"


def check_layout(cfg: Config, world_size: int) -> Layout:
    """Every invalid layout fails here, in one line, before any process group is made."""
    p, m = cfg.parallel, cfg.model
    tp, pp = p.tp, p.pp
    if world_size % (tp * pp):
        raise ConfigError(f"config keys parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp} does not divide "
                          f"the world size {world_size}")
    if m.n_heads % tp:
        raise ConfigError(f"config key parallel.tp: model.n_heads={m.n_heads} is not divisible by tp={tp}")
    if kv_heads(m) % tp:
        raise ConfigError(f"config key parallel.tp: the {kv_heads(m)} KV heads (model.n_kv_heads) are not divisible by "
                          f"tp={tp}")
    if ffn_width(m) % tp:
        raise ConfigError(f"config key parallel.tp: the MLP width {ffn_width(m)} (model.d_ff) is not divisible by tp={tp}")
    if m.moe_experts and moe_ffn_width(m) % tp:
        raise ConfigError(f"config key parallel.tp: the expert width {moe_ffn_width(m)} (model.moe_ffn) is not "
                          f"divisible by tp={tp}")
    if m.moe_experts and shared_ffn_width(m) % tp:
        raise ConfigError(f"config key parallel.tp: the shared expert width {shared_ffn_width(m)} is not divisible by "
                          f"tp={tp}")
    if p.ep > 1:
        check_expert_layout(cfg, world_size // (tp * pp))
    if m.n_layers < pp:
        raise ConfigError(f"config key parallel.pp: {pp} pipeline stages but only {m.n_layers} layers (model.n_layers)")
    if pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"config key parallel.zero_stage: ZeRO-{p.zero_stage} cannot be combined with pipeline "
                          f"parallelism (parallel.pp={pp}); DeepSpeed supports ZeRO-0/1 with pipelines")
    if p.sequence_parallel and tp == 1:
        raise ConfigError("config key parallel.sequence_parallel: needs parallel.tp > 1")
    if p.sequence_parallel and cfg.data.seq_len % tp:
        raise ConfigError(f"config key parallel.sequence_parallel: data.seq_len={cfg.data.seq_len} is not divisible by tp={tp}")
    dp = world_size // (tp * pp)
    if dp % p.cp:
        raise ConfigError(f"config key parallel.cp: {p.cp} does not divide the {dp} data-parallel ranks "
                          f"(world / (tp x pp))")
    return Layout(tp=tp, pp=pp, dp=dp, cp=p.cp)


def check_expert_layout(cfg: Config, dp: int) -> None:
    """parallel.ep against the data-parallel ranks (the ZeRO stage it needs: config.validate)."""
    if dp % cfg.parallel.ep:
        raise ConfigError(f"config key parallel.ep: {cfg.parallel.ep} does not divide the {dp} data-parallel ranks "
                          f"(world / (tp x pp))")


def build_grid(layout: Layout):
    """DeepSpeed's PipelineParallelGrid over our layout (collective: every rank must call it)."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    class Grid(PipelineParallelGrid):
        """DeepSpeed's grid, plus the Megatron-style name deepspeed.checkpointing asks the mpu for."""

        def get_tensor_model_parallel_group(self):
            return self.get_slice_parallel_group()

    topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    return Grid(topology=topo)
