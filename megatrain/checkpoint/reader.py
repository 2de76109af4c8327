"""The one checkpoint reader: a checkpoint of any layout megatrain writes -> full tensors, one at a time.

    with CheckpointReader("runs/tiny") as r:      # its `latest`, or tag="step00000100", or a step folder
        r.cfg, r.layout, r.state                   # the run's config, layout ({tp, pp, dp, zero_stage}), step/samples
        for name, t in r.tensors():                # full fp32 master weights under the model's own names
            ...
        r.tensor("layers.0.attn.qkv.weight", "exp_avg")   # Adam's moments the same way ("exp_avg_sq" too)

Where the data lives, by layout (mp = pp_stage * tp + tp_rank, DeepSpeed's model-parallel rank):
    ZeRO-0       mp_rank_{mp}_model_states.pt: the module's weights (PP: layer_{i}-model_{tp}-model_states.pt),
                 and the optimizer (torch's state by parameter index; fp32 masters in `fp32_groups` under bf16/fp16)
    ZeRO-1/2     zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt: each data-parallel rank's contiguous slice of the
                 flat fp32 group (`param_slice_mappings` says which parameter fragments it holds) and Adam's moments
                 over the same slice; parameter order and shapes from mp_rank_{mp}_model_states.pt
    ZeRO-3       the same files per rank, but every parameter is cut into ceil(numel / dp) pieces, one per rank
A tensor-parallel checkpoint holds TP slices under the same names; parallel/sharding.py's table puts them back. Under
expert parallelism (ZeRO-1/2), an expert weight's optimizer group holds this EP rank's experts, partitioned over its
expert-data-parallel ranks: data-parallel rank d holds a piece of EP rank d % ep's, the (d // ep)-th.

Nothing is loaded that is not asked for: each rank file is opened for its metadata only (torch.load onto the meta
device, weights_only, DeepSpeed's three record classes read into plain stand-ins), and a tensor is read from its
exact byte offsets with os.pread. Memory holds the tensor being assembled, whatever the model's size and however it
was sharded.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from megatrain.checkpoint import manifest
from megatrain.checkpoint.io import (DEEPSPEED_RECORDS, STATE_FILE, fall_back, frozen_experts_file,
                                    numpy_scalars, read_latest, why_unreadable)
from megatrain.checkpoint.stream import TORCH_DTYPES, read_header
from megatrain.config import Config, ConfigError, config_from_dict
from megatrain.resolved import Resolved, saved_resolved
from megatrain.data.tokenizer import parse_spec
from megatrain.heads import build_model
from megatrain.parallel.sharding import (EXPERT_DIM, Split, canonical_name, is_expert_param, local_shape, split_of,
                                         unshard)
from megatrain.parameters import decay_groups  # the rule that ordered the optimizer's parameters

KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # what can be read: the fp32 master weights and AdamW's two moments
CONSOLIDATED = "model.safetensors"  # the weights file of `megatrain convert consolidate` (with megatrain.json beside)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read as asked; the message names the file."""


@dataclass(frozen=True)
class Fragment:
    """A run of `numel` elements of a TP-local tensor (of EP rank `ep_rank`'s experts, for an expert weight under
    expert parallelism), starting at flat element `start`, stored in `path` at byte `offset` as `dtype`."""

    tp_rank: int
    start: int
    numel: int
    path: str
    offset: int
    dtype: torch.dtype
    ep_rank: int = 0


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]  # full (unsplit) shape
    split: Split
    fragments: dict[str, list[Fragment]] = field(default_factory=dict)  # key -> fragments, any order
    ep: int = 1  # the EP ranks its experts are spread over (expert weights under expert parallelism), else 1


class _Record:
    """Stands in for DeepSpeed's small record classes while a rank file's metadata is read: their fields land in
    __dict__ and nothing of DeepSpeed is imported or run (a fragment_address's numel and start, a LossScaler's
    scale)."""


class _Stage(int):
    """Stands in for DeepSpeed's ZeroStageEnum (an int)."""


# DeepSpeed's pickled classes that rank files hold (io.DEEPSPEED_RECORDS, the one list), each read into a plain
# stand-in (weights_only stays on)
_DEEPSPEED_RECORDS = [(_Stage if name.endswith("ZeroStageEnum") else _Record, name) for name in DEEPSPEED_RECORDS]


def _load_meta(path: str):
    """A rank file's structure, its tensors on the meta device (each knows its byte offset in the file): no tensor
    data is read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: rank file missing")
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_RECORDS + numpy_scalars()):
            return torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:
        why = why_unreadable(path, e)  # None: an intact file and another error (an incompatibility, a bug), raised
        if why is None:
            raise
        raise CheckpointError(f"{path}: unreadable: {why}") from None


def _where(t: torch.Tensor) -> tuple[int, torch.dtype]:
    """Byte offset in its file of a meta tensor's first element (it must be contiguous), and its dtype."""
    if not t.is_contiguous():
        raise CheckpointError("a non-contiguous tensor in a checkpoint file (not written by DeepSpeed's save)")
    return t.untyped_storage()._checkpoint_offset + t.storage_offset() * t.element_size(), t.dtype


class CheckpointReader:
    def __init__(self, path: str, tag: str | None = None, merge_lora: bool = False, verify: str = "size"):
        """`verify`: compare the step folder's files with its manifest first (checkpoint.verify's modes: full,
        size, none; `convert` reads in full, the model readers check sizes); a difference is refused naming the
        file."""
        path = os.path.abspath(path)
        self.consolidated = os.path.isfile(os.path.join(path, CONSOLIDATED)) and tag is None
        if self.consolidated:  # `megatrain convert consolidate`'s output
            self.dir, self.tag, self.folder = path, None, path
        else:
            if tag is None and os.path.isfile(os.path.join(path, STATE_FILE)):  # a step folder
                path, tag = os.path.dirname(path), os.path.basename(path)
            if tag is None:
                if not os.path.isdir(path):
                    raise CheckpointError(f"{path}: no such checkpoint directory")
                tag = read_latest(path)
                if tag is None:
                    raise CheckpointError(f"{path}: not a megatrain checkpoint (no 'latest' file and no {STATE_FILE}); "
                                          f"pass a checkpoint.dir of a training run, one of its step folders, or the "
                                          f"output of `megatrain convert consolidate`")
            self.dir, self.tag, self.folder = path, tag, os.path.join(path, tag)
        state_path = os.path.join(self.folder, STATE_FILE)
        if not os.path.isfile(state_path) and os.path.isfile(os.path.join(self.folder, "config.json")):
            raise CheckpointError(f"{self.folder}: a Hugging Face model folder (config.json, no {STATE_FILE}), not a "
                                  f"megatrain checkpoint; import it with `megatrain convert from-hf {self.folder} "
                                  f"--output DIR` first")
        if not os.path.isfile(state_path):
            raise CheckpointError(f"{self.folder}: not a complete checkpoint (no {STATE_FILE}); pick another step "
                                  f"folder")
        problem = None if self.consolidated else manifest.check(self.folder, verify)
        if problem:
            raise CheckpointError(f"{problem}; {fall_back(self.dir, self.tag, 'read')}")
        try:
            with open(state_path) as f:
                self.state = json.load(f)
            # the config as the run was given it, and what the run derived (the model's shape among it: from the
            # config itself in a checkpoint saved without `resolved`)
            self.asked: Config = config_from_dict(self.state["config"])
            self.resolved: Resolved = saved_resolved(self.state)
        except (ValueError, KeyError, TypeError) as e:
            why = str(e).splitlines()[0]
            raise CheckpointError(f"{state_path}: not a valid megatrain state file ({why})") from None
        if self.consolidated:  # its tokenizer files sit beside the weights
            self.resolved = self.resolved.but(tokenizer=resolve_spec(self.resolved.tokenizer, self.folder))
        self.cfg: Config = self.resolved.apply(self.asked).freeze()  # the effective config the run trained with
        lay, p = self.state.get("layout") or {}, self.cfg.parallel
        self.layout = dict(tp=1, pp=1, dp=1, zero_stage=0) if self.consolidated else dict(
            tp=lay.get("tp", p.tp), pp=lay.get("pp", p.pp), dp=lay.get("dp", 1),
            zero_stage=lay.get("zero_stage", p.zero_stage))
        if lay.get("ep", 1) > 1:  # expert parallelism (parallel/expert.py)
            self.layout["ep"] = lay["ep"]
        self._fds: dict[str, int] = {}
        self._params = self._expected_params()
        self._meta0 = None  # the first model-states file (LR scheduler, engine counters)
        self._owner: dict[tuple[str, int, int], int] = {}  # (name, tp rank, ep rank) -> the mp rank whose files hold it
        self._step: Fragment | None = None  # where AdamW's step count is stored (the same in every group)
        try:
            self._index()
        except CheckpointError:  # a rank file missing or damaged: the manifest names what changed since the save
            problem = None if self.consolidated else manifest.check(self.folder, "full")
            if problem:
                raise CheckpointError(f"{problem}; {fall_back(self.dir, self.tag, 'read')}") from None
            raise
        self.lora_scale = None  # with merge_lora on a LoRA run: names() and tensor() give W + (alpha / r) B @ A
        if merge_lora and self.asked.finetune.lora_rank:
            f = self.asked.finetune
            self.lora_scale = f.lora_alpha / f.lora_rank
            # what the merged weights are: the same model without adapters
            self.asked = self.asked.replaced({"finetune.lora_rank": 0})
            self.cfg = self.resolved.apply(self.asked).freeze()

    @property
    def where(self) -> str:
        """The checkpoint in words, for logs."""
        if self.consolidated:
            return f"{self.folder} (consolidated)"
        lay = self.layout
        ep = f", ep {lay['ep']}" if lay.get("ep", 1) > 1 else ""
        return f"{self.folder} (tp {lay['tp']} x pp {lay['pp']} x dp {lay['dp']}{ep}, ZeRO-{lay['zero_stage']})"

    # -- what the checkpoint should hold -------------------------------------------------------------------

    def _expected_params(self) -> dict[str, _Param]:
        """The model's parameters (names, full shapes) from the saved config, built on the meta device."""
        cfg = self.cfg.replaced({"model.fused_kernels": "off"})
        with torch.device("meta"):
            model = build_model(cfg)  # a fine-tuned model's head and adapters too
        ep = self.layout.get("ep", 1)
        return {n: _Param(n, tuple(p.shape), split_of(n, self.cfg.model), ep=ep if is_expert_param(n) else 1)
                for n, p in model.named_parameters()}

    def _local_shape(self, p: _Param) -> tuple[int, ...]:
        """The shape one rank holds: its TP slice (of its EP rank's experts)."""
        shape = list(local_shape(p.shape, p.split, self.layout["tp"]))
        shape[EXPERT_DIM] //= p.ep
        return tuple(shape)

    def names(self) -> list[str]:
        return [n for n in self._params if not (self.lora_scale and "lora_" in n)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._params[name].shape

    # -- the index: where each fragment of each tensor lives -----------------------------------------------

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _add(self, mp: int, name: str, key: str, tp_rank: int, start: int, numel: int, path: str, t: torch.Tensor,
             skip: int = 0, ep_rank: int = 0) -> None:
        """Record that elements [start, start+numel) of `name`'s TP slice are elements [skip, skip+numel) of `t`,
        found in model-parallel rank `mp`'s files. A slice is taken from one pipeline stage only: the first that
        has it (a tied embedding's copy on the last stage is skipped)."""
        canon = canonical_name(name, self.cfg.model.n_layers)
        p = self._params.get(canon)
        if p is None:
            raise CheckpointError(f"{path}: holds parameter {name!r}, which the saved model config has no place for; "
                                  f"the checkpoint and its {STATE_FILE} disagree")
        ep_rank = ep_rank if p.ep > 1 else 0
        if self._owner.setdefault((canon, tp_rank, ep_rank), mp) != mp:
            return
        offset, dtype = _where(t)
        at = offset + skip * t.element_size()
        p.fragments.setdefault(key, []).append(Fragment(tp_rank, start, numel, path, at, dtype, ep_rank))

    def _check_local_shape(self, name: str, shape, path: str) -> None:
        canon = canonical_name(name, self.cfg.model.n_layers)
        p = self._params.get(canon)
        if p is None:
            return  # reported by _add
        want = self._local_shape(p)
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"{path}: {name} has shape {tuple(shape)}, but the saved config makes its "
                                  f"tp={self.layout['tp']} slice {tuple(want)}; the checkpoint's shards disagree in "
                                  f"shape")

    def _index(self) -> None:
        tp, pp, dp, stage = (self.layout[k] for k in ("tp", "pp", "dp", "zero_stage"))
        if self.consolidated:
            self._index_consolidated()
        for pp_rank in range(0 if self.consolidated else pp):
            for tp_rank in range(tp):
                mp = pp_rank * tp + tp_rank
                if stage == 0:
                    self._index_zero0(mp, tp_rank, pp_rank)
                else:
                    self._index_zero(mp, tp_rank, dp, stage)
        missing = [n for n, p in self._params.items() if "fp32" not in p.fragments]
        if missing:
            raise CheckpointError(f"{self.folder}: no weights found for {', '.join(missing[:3])}"
                                  f"{' ...' if len(missing) > 3 else ''}; the checkpoint is incomplete")
        for p in self._params.values():
            ranks = [0] if p.split.replicated else range(tp)  # every TP rank holds a replicated one: read rank 0's
            want = math.prod(self._local_shape(p))
            for key, frags in p.fragments.items():
                p.fragments[key] = [f for f in frags if f.tp_rank in ranks]
                for r in ranks:
                    for e in range(p.ep):
                        have = sum(f.numel for f in frags if f.tp_rank == r and f.ep_rank == e)
                        if have != want:
                            where = f"tp rank {r}" + (f", ep rank {e}" if p.ep > 1 else "")
                            raise CheckpointError(f"{self.folder}: {p.name} ({key}, {where}) has {have} of its {want} "
                                                  f"elements across the rank files; the checkpoint's shards disagree")

    def _note_step(self, path: str, t) -> None:
        if self._step is None and torch.is_tensor(t):
            self._step = Fragment(0, 0, 1, path, *_where(t))

    def _index_consolidated(self) -> None:
        path = os.path.join(self.folder, CONSOLIDATED)
        try:
            header, data = read_header(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        for name, p in self._params.items():
            h = header.get(name)
            if h is None:
                continue  # reported as missing weights
            if tuple(h["shape"]) != p.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(h['shape'])}, the saved config makes it "
                                      f"{p.shape}")
            begin, end = h["data_offsets"]
            dtype = TORCH_DTYPES[h["dtype"]]
            p.fragments["fp32"] = [Fragment(0, 0, (end - begin) // dtype.itemsize, path, data + begin, dtype)]

    def _model_states(self, mp: int, stage: int) -> str:
        name = f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if stage == 3 else f"mp_rank_{mp:02d}_model_states.pt"
        return self._file(name)

    def _index_zero(self, mp: int, tp_rank: int, dp: int, stage: int) -> None:
        path = self._model_states(mp, stage)
        meta = _load_meta(path)
        if self._meta0 is None:
            self._meta0 = meta
        shapes = meta.get("param_shapes")
        if not shapes:
            raise CheckpointError(f"{path}: no param_shapes; not a ZeRO-{stage} checkpoint file")
        for group in shapes:
            for name, shape in group.items():
                self._check_local_shape(name, shape, path)
        ep = self.layout.get("ep", 1)
        done: dict[tuple[int, str, int], int] = {}  # (group, name, EP rank) -> elements seen in earlier dp ranks
        for dp_rank in range(dp):
            opath = self._file(f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt")
            osd = _load_meta(opath)["optimizer_state_dict"]
            if stage == 3:
                flats, moments = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
            else:
                flats, moments = osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"]
            for g, group in enumerate(shapes):
                tensors = {"fp32": flats[g], **{k: moments[g][k] for k in KEYS[1:] if g in moments}}
                if g in moments and "step" in moments[g]:
                    self._note_step(opath, moments[g]["step"])
                if stage == 3:
                    at = 0
                    for name, shape in group.items():
                        numel, k = math.prod(shape), math.ceil(math.prod(shape) / dp)
                        lo, hi = dp_rank * k, min(numel, (dp_rank + 1) * k)
                        if hi > lo:
                            for key, t in tensors.items():
                                self._add(mp, name, key, tp_rank, lo, hi - lo, opath, t, skip=at)
                        at += k
                    if at > flats[g].numel():
                        raise CheckpointError(f"{opath}: flat group {g} holds {flats[g].numel()} elements, its "
                                              f"parameters need {at}; the checkpoint's shards disagree")
                else:
                    for name, frag in osd["param_slice_mappings"][g].items():
                        e = dp_rank % ep if is_expert_param(canonical_name(name, self.cfg.model.n_layers)) else 0
                        start = done.get((g, name, e), 0)
                        for key, t in tensors.items():
                            self._add(mp, name, key, tp_rank, start, frag.numel, opath, t, skip=frag.start, ep_rank=e)
                        done[(g, name, e)] = start + frag.numel
        if stage == 3:  # frozen parameters (LoRA's base, finetune.freeze): each rank's piece in its model states
            for dp_rank in range(dp):
                mpath = self._file(f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_model_states.pt")
                frozen = (_load_meta(mpath) if dp_rank else meta).get("frozen_param_fragments") or {}
                for name, t in frozen.items():
                    numel = math.prod(meta["frozen_param_shapes"][name])
                    k = math.ceil(numel / dp)
                    lo, hi = dp_rank * k, min(numel, (dp_rank + 1) * k)
                    if hi > lo:
                        self._add(mp, name, "fp32", tp_rank, lo, hi - lo, mpath, t)
        else:  # parameters the optimizer never held (frozen: LoRA's base, finetune.freeze) are in the module
            for e in range(ep if ep > 1 else 0):  # (frozen experts: each EP rank's in a file of its own, io.save)
                self._index_frozen_experts(mp, tp_rank, e)
            for name, t in (meta.get("module") or {}).items():
                canon = canonical_name(name, self.cfg.model.n_layers)
                p = self._params.get(canon)
                if p is not None and not any(f.tp_rank == tp_rank for f in p.fragments.get("fp32", [])):
                    self._check_local_shape(name, t.shape, path)
                    self._add(mp, name, "fp32", tp_rank, 0, t.numel(), path, t)

    def _index_frozen_experts(self, mp: int, tp_rank: int, e: int) -> None:
        path = self._file(frozen_experts_file(e, mp))
        if not os.path.isfile(path):
            return  # none frozen (or saved before these files: reported as an expert's missing elements)
        try:
            header, data = read_header(path)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        for name, h in header.items():
            self._check_local_shape(name, h["shape"], path)
            canon = canonical_name(name, self.cfg.model.n_layers)
            if canon not in self._params:
                raise CheckpointError(f"{path}: holds parameter {name!r}, which the saved model config has no place "
                                      f"for; the checkpoint and its {STATE_FILE} disagree")
            if self._owner.setdefault((canon, tp_rank, e), mp) == mp:
                begin, end = h["data_offsets"]
                dtype = TORCH_DTYPES[h["dtype"]]
                self._params[canon].fragments.setdefault("fp32", []).append(
                    Fragment(tp_rank, 0, (end - begin) // dtype.itemsize, path, data + begin, dtype, e))

    def _index_zero0(self, mp: int, tp_rank: int, pp_rank: int) -> None:
        path = self._file(f"mp_rank_{mp:02d}_model_states.pt")
        meta = _load_meta(path)
        if self._meta0 is None:
            self._meta0 = meta
        # (name as the engine's module has it, meta tensor, file): in the module's parameter order
        if meta.get("module"):
            named = [(n, t, path) for n, t in meta["module"].items()]
        else:
            named = self._pipeline_stage(tp_rank, pp_rank)
        if self.cfg.model.tie_embeddings:  # the head is the embedding under a second name
            named = [x for x in named if not x[0].endswith("lm_head.weight")]
        for name, t, src in named:
            self._check_local_shape(name, t.shape, src)
        opt = meta.get("optimizer") or {}
        inner = opt.get("optimizer_state_dict", opt)  # bf16/fp16: torch's state, with fp32 masters beside it
        masters = [t for group in opt.get("fp32_groups", []) for t in group]
        order = [i for group in decay_groups([(n, t.dim()) for n, t, _ in named]) for i in group]
        for pos, i in enumerate(order):  # torch numbers the optimizer's parameters group by group
            name, t, src = named[i]
            fp32, fp32_path = (masters[pos], path) if masters else (t, src)
            self._add(mp, name, "fp32", tp_rank, 0, t.numel(), fp32_path, fp32)
            state = inner.get("state", {}).get(pos, {})
            if "step" in state:
                self._note_step(path, state["step"])
            for key in KEYS[1:]:
                if key in state:
                    self._add(mp, name, key, tp_rank, 0, t.numel(), path, state[key])

    def _pipeline_stage(self, tp_rank: int, pp_rank: int) -> list[tuple[str, torch.Tensor, str]]:
        """One ZeRO-0 pipeline stage's parameters, in the order of its PipelineModule: the tied embedding first
        (tied_modules), then its layers by index. The weights are in layer_{i}-model_{tp}-model_states.pt."""
        from deepspeed.runtime.utils import partition_balanced

        L, tied = self.cfg.model.n_layers, self.cfg.model.tie_embeddings
        parts = partition_balanced(weights=[0] + [1] * L + [0, 0], num_parts=self.layout["pp"])  # type:BlockPipe

        def layer(i: int) -> dict:
            return _load_meta(self._file(f"layer_{i:02d}-model_{tp_rank:02d}-model_states.pt"))

        mine = range(parts[pp_rank], parts[pp_rank + 1])
        named = []
        if tied and (0 in mine or L + 2 in mine):
            named += [(f"tied_modules.embed.{k}", t, self._file(f"layer_00-model_{tp_rank:02d}-model_states.pt"))
                      for k, t in layer(0).items()]
        for i in mine:
            if not (tied and i in (0, L + 2)):
                named += [(f"{i}.{k}", t, self._file(f"layer_{i:02d}-model_{tp_rank:02d}-model_states.pt"))
                          for k, t in layer(i).items()]
        return named

    # -- reading ---------------------------------------------------------------------------------------------

    def _read(self, frag: Fragment) -> torch.Tensor:
        fd = self._fds.get(frag.path)
        if fd is None:
            fd = self._fds[frag.path] = os.open(frag.path, os.O_RDONLY)
        out = torch.empty(frag.numel, dtype=frag.dtype)
        buf = memoryview(out.view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], frag.offset + done)
            if n <= 0:
                raise CheckpointError(f"{frag.path}: ends early (truncated); the checkpoint is damaged")
            done += n
        return out

    def tensor(self, name: str, key: str = "fp32", dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The full tensor `name` (a canonical parameter name), reassembled from every rank that holds a piece."""
        # a linear layer's `X.weight` has `X.lora_A`; an expert weight `experts.w` has `experts.w_lora_A`
        adapter = name.removesuffix(".weight") + ".lora_A" if name.endswith(".weight") else name + "_lora_A"
        if self.lora_scale and key == "fp32" and adapter in self._params:
            a, b = self._tensor(adapter, key, torch.float32), self._tensor(adapter[:-1] + "B", key, torch.float32)
            merged = self._tensor(name, key, torch.float32) + self.lora_scale * (b @ a)
            return merged.to(dtype) if dtype else merged
        return self._tensor(name, key, dtype)

    def _tensor(self, name: str, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        p = self._params[name]
        frags = p.fragments.get(key)
        if not frags:
            raise CheckpointError(f"{self.folder}: holds no {key} for {name} (saved without optimizer state?)")
        tp = 1 if p.split.replicated else self.layout["tp"]
        shape = self._local_shape(p)
        experts = []
        for e in range(p.ep):  # (one piece unless EP spread the experts: then EP rank e's, in order)
            slices = []
            for r in range(tp):
                flat = torch.empty(math.prod(shape), dtype=dtype or frags[0].dtype)
                for f in (f for f in frags if f.tp_rank == r and f.ep_rank == e):
                    flat[f.start: f.start + f.numel] = self._read(f)
                slices.append(flat.view(shape))
            experts.append(unshard(slices, p.split))
        return experts[0] if p.ep == 1 else torch.cat(experts, dim=EXPERT_DIM)

    def tensors(self, key: str = "fp32", dtype: torch.dtype | None = torch.float32
                ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name, key, dtype)

    def has_optimizer_state(self) -> bool:
        """Adam's moments are there (for every trained parameter; frozen ones have none)."""
        return any("exp_avg" in p.fragments for p in self._params.values())

    def has(self, name: str, key: str) -> bool:
        return key in self._params[name].fragments

    def optimizer_step(self) -> float | None:
        """AdamW's step count (its bias correction), when the checkpoint has optimizer state."""
        return float(self._read(self._step)[0]) if self._step else None

    @property
    def lr_scheduler_state(self) -> dict | None:
        return self._meta0.get("lr_scheduler") if self._meta0 else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_spec(spec: str, base: str) -> str:
    """A tokenizer spec whose path is relative to `base` (a consolidated checkpoint's folder) made absolute."""
    kind, path = parse_spec(spec)
    if path is None or os.path.isabs(path):
        return spec
    full = os.path.join(base, path)
    return f"{kind}:{full}" if kind else full
