"""Packed and padded rows attend document by document (model.Documents): the same outputs as the dense segment mask,
the same per-token losses as each document run alone, and no tensor of T x T elements on the way."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatrain.config import ModelConfig
from megatrain.model import Documents, Transformer, segment_mask, segment_positions

FEATURES = {"plain": {}, "mlm": dict(objective="mlm"), "window": dict(sliding_window=3),
            "softcap": dict(attn_softcap=5.0), "gqa": dict(n_kv_heads=2)}


def _model(max_seq_len: int = 64, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=max_seq_len, fused_kernels="off",
                      **kw)
    return Transformer(cfg).double()


@pytest.mark.parametrize("rows", ["packed_and_padded", "one_document_each"])
@pytest.mark.parametrize("name", FEATURES)
def test_documents_equal_the_dense_segment_mask_and_so_do_their_gradients(name, rows):
    model = _model(**FEATURES[name])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16] if rows == "packed_and_padded" else [[1] * 16] * 2)
    weights = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = model(tokens, segments=segments)
    got_grads = torch.autograd.grad((got * weights).sum(), list(model.parameters()))
    x, mask = model.embed_tokens(tokens), segment_mask(segments, causal=model.cfg.objective == "causal")
    positions = segment_positions(segments)
    for block in model.layers:  # the dense [B, 1, T, T] mask through the same blocks
        x = block(x, model.rope_of(block, positions, x.dtype), None, 0, 0, mask)
    dense = model.lm_head(model.norm(x))
    torch.testing.assert_close(got, dense, rtol=0, atol=1e-12)
    for g, want in zip(got_grads, torch.autograd.grad((dense * weights).sum(), list(model.parameters()))):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-10)


def test_a_packed_row_has_each_documents_own_losses():
    model = _model()
    docs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 5)]
    packed = torch.cat(docs)[None]
    segments = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    labels = torch.cat(docs)[None].roll(-1, 1)
    got = torch.nn.functional.cross_entropy(model(packed, segments=segments)[0], labels[0], reduction="none")
    at = 0
    for d in docs:
        alone = torch.nn.functional.cross_entropy(model(d[None])[0], labels[0, at:at + len(d)], reduction="none")
        # (each document's last token predicts the next document's first: the packed row's label, the same here)
        torch.testing.assert_close(got[at:at + len(d)], alone, rtol=1e-5, atol=1e-10)
        at += len(d)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_t_by_t_elements():
    """Eight documents in a row of 512 tokens: forward and backward never make a tensor of 512 x 512 elements (the
    largest are the activations), where the dense mask path does."""
    T = 512
    model = _model(max_seq_len=T)
    tokens = torch.randint(0, 64, (1, T))
    segments = torch.arange(T)[None] // 64 + 1
    with _LargestTensor() as seen:
        model(tokens, tokens, segments=segments).backward()
    assert seen.largest < T * T, seen.largest
    assert max(len(row) for row in Documents.of(segments).spans) == 8
    with _LargestTensor() as dense:  # the check sees a [T, T] mask when there is one
        segment_mask(segments, causal=True)
    assert dense.largest >= T * T


def test_pretraining_samples_are_cut_at_end_of_document_tokens():
    from megatrain.tasks import CausalLM

    eod = 0
    sample = [[5, 6, eod, 7, 8, 9, eod, 3, 4]]
    batch = CausalLM(eod).make(sample, [0], "cpu")
    assert batch.tokens.tolist() == [[5, 6, eod, 7, 8, 9, eod, 3]]
    assert batch.segments.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3]]  # the end token belongs to the document it ends
    assert CausalLM().make(sample, [0], "cpu").segments is None


@pytest.mark.slow
def test_pretraining_with_document_attention_under_tp2_has_the_one_rank_losses(tmp_path):
    from distributed import run_distributed
    from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets

    data = make_byte_dataset(tmp_path)  # documents end with the end-of-document token
    over = {"data.document_attention": True, "checkpoint.interval": 0}
    one, tp2 = str(tmp_path / "one"), str(tmp_path / "tp2")
    run_distributed(run_configs, 1, [small_sets(data, one, **over)], timeout=300)
    run_distributed(run_configs, 2, [small_sets(data, tp2, **over, **{"parallel.tp": 2})], timeout=300)
    assert_close_curves(losses(one), losses(tp2), rtol=1e-5)
    assert_close_curves(losses(one, "eval"), losses(tp2, "eval"), rtol=1e-5)
    plain = str(tmp_path / "plain")  # and the documents change what is learned
    run_distributed(run_configs, 1, [small_sets(data, plain, **{"checkpoint.interval": 0})], timeout=300)
    assert losses(plain)[1] != losses(one)[1]
