"""Context parallelism (parallel.cp, DeepSpeed-Ulysses): each rank holds a slice of every row's tokens; attention runs
on whole sequences of a share of the heads. Config math, the split model against the whole one in gloo processes
(float64: loss, every gradient, per-token losses of packed documents, no T x T tensor), and pretraining under cp and
tp x cp against one rank (slow)."""
import copy

import pytest
import torch

from distributed import run_distributed
from megatrain.config import Config, ConfigError, ModelConfig, kv_repeat, validate, validate_world
from megatrain.model import Transformer
from megatrain.tasks.base import Batch

# -- config math ----------------------------------------------------------------------------------------------------


def test_kv_heads_are_repeated_only_when_the_split_needs_it():
    assert [kv_repeat(k, 2) for k in (1, 2, 3, 4)] == [2, 1, 2, 1]
    assert [kv_repeat(k, 4) for k in (1, 2, 4, 8)] == [4, 2, 1, 1]


def _cfg(**sets) -> Config:
    cfg = Config()
    cfg.parallel.cp = 2
    for dotted, v in sets.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


@pytest.mark.parametrize("sets, says", [
    ({"parallel__pp": 2}, "pipeline stages"),
    ({"model__moe_experts": 4, "model__moe_ffn": 32}, "Mixture-of-Experts"),
    ({"finetune__task": "sft"}, "fine-tuning"),
    ({"model__n_heads": 6, "model__d_model": 96, "parallel__tp": 2}, "n_heads=6 is not divisible by tp x cp = 2 x 2"),
    ({"data__seq_len": 127}, "data.seq_len: 127 is not divisible by parallel.cp = 2"),
    ({"data__seq_len": 130, "parallel__tp": 2, "parallel__sequence_parallel": True}, "parallel.cp x tp = 4"),
    ({"model__n_heads": 6, "model__d_model": 96, "model__n_kv_heads": 3, "parallel__cp": 4}, "n_heads=6 is not divisible"),
])
def test_impossible_context_parallel_settings_are_refused_in_one_line(sets, says):
    with pytest.raises(ConfigError, match="config key") as e:
        validate(_cfg(**sets))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_cp_must_divide_the_data_parallel_ranks_and_counts_as_one_sample_stream():
    cfg = _cfg(train__global_batch_size=8, train__micro_batch_size=2)
    with pytest.raises(ConfigError, match="parallel.cp: 2 does not divide the 3 data-parallel ranks"):
        validate_world(cfg, 3)
    assert validate_world(cfg, 4) == 2  # 4 ranks = 2 sample streams of 2 slices: 8 / (2 x 2) accumulation steps
    from megatrain.training.engine import deepspeed_config

    ds = deepspeed_config(cfg, 4)  # DeepSpeed counts a sample on each of the cp ranks that share it
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2


def test_a_batch_slice_keeps_the_whole_rows_segments():
    tokens = torch.arange(16).view(2, 8)
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8])
    b = Batch(tokens, tokens + 100, segments).context_slice(1, 2)
    assert b.tokens.tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]] and b.labels[0, 0] == 104
    assert b.segments is segments and b.shard == (1, 2)
    assert b.real_tokens() == 1 + 4  # this slice's tokens that are not padding
    assert Batch(tokens, tokens, segments).context_slice(0, 2).real_tokens() == 4 + 4


# -- the split model against the whole one (gloo processes, float64) --------------------------------------------------

CP_SETS = {
    "plain": dict(),
    "gqa_repeat": dict(n_kv_heads=1),  # one KV head for two ranks: repeated
    "window_softcap": dict(sliding_window=5, attn_softcap=20.0, n_kv_heads=2),
    "qk_norm_full_learned": dict(qk_norm="full", position="learned"),
    "mlm": dict(objective="mlm"),
}


def _model(T: int, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=T, fused_kernels="off", **kw)
    return Transformer(cfg).double()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _check_cp(rank, world):
    import deepspeed
    import torch.distributed as dist

    from megatrain.parallel.context import apply_cp

    deepspeed.init_distributed("gloo")
    group = dist.new_group(list(range(world)))
    T = 16
    tokens = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]
    packed = torch.tensor([[1] * 5 + [2] * 7 + [3] * 4, [1] * 3 + [2] * 13])
    mine = slice(rank * T // world, (rank + 1) * T // world)
    for name, kw in CP_SETS.items():
        for segments in (None, packed):
            if segments is not None and kw.get("objective") == "mlm":
                continue
            where = f"{name} documents={segments is not None}"
            ref = _model(T, **kw)
            split = copy.deepcopy(ref)
            apply_cp(split, group)
            want = _loss(ref(x, segments=segments), y)  # (in float64: the model's own loss is computed in float32)
            got = _loss(split(x[:, mine], segments=segments), y[:, mine])  # the slice's mean: 1/cp of the whole
            total = got.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total / world, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{where}: {m}")
            want.backward()
            (got / world).backward()
            for (n, p), (_, q) in zip(split.named_parameters(), ref.named_parameters()):
                grad = p.grad.clone()
                dist.all_reduce(grad)  # as DeepSpeed sums (averages) over the data-parallel ranks holding the slices
                torch.testing.assert_close(grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"{where}: {n}")


@pytest.mark.slow
def test_context_parallel_model_equals_the_whole_model():
    """cp=2: the slices' losses and summed gradients equal the whole sequence's, float64, every attention feature."""
    run_distributed(_check_cp, 2, timeout=300)


def _check_documents_under_cp(rank, world):
    """A packed row under cp=2: each document's per-token losses equal the document run alone, and no tensor of T x T
    elements is made in the forward or the backward."""
    import deepspeed
    import torch.distributed as dist

    from megatrain.parallel.context import apply_cp
    from test_documents import _LargestTensor

    deepspeed.init_distributed("gloo")
    group = dist.new_group(list(range(world)))
    docs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 5, 8)]
    T = sum(len(d) for d in docs)
    model = _model(T)
    whole = copy.deepcopy(model)
    apply_cp(model, group)
    packed = torch.cat(docs)[None]
    labels = packed.roll(-1, 1)
    segments = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    mine = slice(rank * T // world, (rank + 1) * T // world)
    logits = model(packed[:, mine], segments=segments)[0]
    got = torch.nn.functional.cross_entropy(logits, labels[0, mine], reduction="none")
    parts = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(parts, got)
    got = torch.cat(parts)
    at = 0
    for d in docs:
        alone = torch.nn.functional.cross_entropy(whole(d[None])[0], labels[0, at:at + len(d)], reduction="none")
        torch.testing.assert_close(got[at:at + len(d)], alone, rtol=1e-5, atol=1e-10)
        at += len(d)
    T = 256  # eight documents: forward and backward under cp make nothing of T x T elements
    model = _model(T)
    apply_cp(model, group)
    tokens = torch.randint(0, 64, (1, T), generator=torch.Generator().manual_seed(0))
    segments = torch.arange(T)[None] // 32 + 1
    mine = slice(rank * T // world, (rank + 1) * T // world)
    with _LargestTensor() as seen:
        model(tokens[:, mine], tokens[:, mine], segments=segments).backward()
    assert seen.largest < T * T, seen.largest


@pytest.mark.slow
def test_packed_documents_under_cp_have_their_own_losses_and_no_t_by_t_tensor():
    run_distributed(_check_documents_under_cp, 2, timeout=300)


# -- slow tier: pretraining under cp and tp x cp, against one rank ---------------------------------------------------

CP_RUN = {"train.max_steps": 10, "train.eval_interval": 5, "checkpoint.interval": 5, "train.precision": "fp32"}


@pytest.fixture(scope="module")
def cp_data(tmp_path_factory):
    from training_utils import make_byte_dataset

    return make_byte_dataset(tmp_path_factory.mktemp("cp"))


def _pretrain(tmp_path, data, name: str, world: int, **over) -> str:
    from training_utils import run_configs, small_sets

    ckpt = str(tmp_path / name)
    run_distributed(run_configs, world, [small_sets(data, ckpt, **{**CP_RUN, **over})], timeout=420)
    return ckpt


@pytest.mark.slow
@pytest.mark.parametrize("documents", [False, True], ids=["plain", "documents"])
def test_pretraining_under_cp_has_the_one_rank_losses(tmp_path, cp_data, documents):
    """fp32, 10 steps: cp=2 (ZeRO-1) and tp=2 x cp=2 (sequence parallel, ZeRO-3, GQA's one KV head per TP rank
    repeated, activation checkpointing) give one rank's train and validation losses (1e-5); a cp=2 run resumed from
    step 5 continues bit for bit."""
    from training_utils import assert_close_curves, losses

    over = {"data.document_attention": documents}
    one = _pretrain(tmp_path, cp_data, "one", 1, **over)
    runs = {"cp2": (2, {"parallel.cp": 2}),
            "tp2_cp2": (4, {"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True,
                            "parallel.zero_stage": 3, "train.activation_checkpointing": "full"})}
    for name, (world, sets) in runs.items():
        got = _pretrain(tmp_path, cp_data, name, world, **over, **sets)
        assert sorted(losses(got)) == list(range(1, 11)), name
        assert_close_curves(losses(one), losses(got), rtol=1e-5)
        assert_close_curves(losses(one, "eval"), losses(got, "eval"), rtol=1e-5)
    if documents:
        return
    first = losses(str(tmp_path / "cp2"))
    (tmp_path / "cp2" / "latest").write_text("step00000005")
    resumed = losses(_pretrain(tmp_path, cp_data, "cp2", 2, **over, **runs["cp2"][1]))
    assert {s: resumed[s] for s in range(6, 11)} == {s: first[s] for s in range(6, 11)}


# -- long-context continued pretraining: the context keys over an imported model ---------------------------------------

def test_a_rope_models_context_keys_may_be_raised_over_its_init(tmp_path):
    """checkpoint.init from a Hugging Face Llama folder: model.max_seq_len, rope_theta and the RoPE scaling set in the
    config win over the folder's (no weight depends on them), data.seq_len follows; a shape key still contradicts."""
    from megatrain.config import load_config
    from megatrain.training.runtime import adopt_init
    from test_hf_families import tiny_hf

    src = tiny_hf("llama", str(tmp_path / "hf"), max_position_embeddings=64)
    sets = [f"checkpoint.init={src}", "model.max_seq_len=256", "model.rope_theta=500000", "model.rope_scaling=yarn",
            "model.rope_factor=4", "model.rope_original_max_len=64", "data.seq_len=256", "data.tokenizer=byte"]
    source, resolved = adopt_init(load_config(None, sets))
    m = resolved.apply(load_config(None, sets)).model
    assert (m.max_seq_len, m.rope_theta, m.rope_scaling, m.rope_factor, m.rope_original_max_len) == (
        256, 500000.0, "yarn", 4.0, 64)
    assert m.d_model == source.model.d_model and m.n_layers == source.model.n_layers  # the shape is the folder's
    assert resolved.apply(load_config(None, sets)).data.seq_len == 256
    source.close()
    with pytest.raises(ConfigError, match="model.n_layers: 7 contradicts checkpoint.init"):
        adopt_init(load_config(None, [*sets, "model.n_layers=7"]))
