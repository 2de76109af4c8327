"""model.compile: each block through torch.compile (parallelize.apply_compile), one graph for every block of a shape,
training losses equal to eager; and the layouts it refuses in one line. (A run with model.compile goes through the
same apply_compile, from parallelize.)"""
import pytest
import torch

from megatrain.config import ConfigError, load_config


@pytest.mark.parametrize("over, word", [("parallel.tp=2", "parallel.tp=2"), ("parallel.zero_stage=3", "zero_stage=3"),
                                        ("train.activation_checkpointing=selective", "selective")])
def test_layouts_compile_does_not_cover_are_refused_in_one_line(over, word):
    with pytest.raises(ConfigError, match=f"model.compile: not with .*{word}"):
        load_config("tiny", ["model.compile=true", over])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_blocks_share_one_graph_and_train_as_eager():
    """A 4-block model: the compiled forward and backward equal eager's (fp32, 1e-5), dynamo compiles one frame for
    all four blocks, 10 AdamW steps give eager's losses (1e-5), and a KV-cache decode runs the eager blocks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from megatrain.model import KVCache, Transformer
    from megatrain.parallel.parallelize import apply_compile

    cfg = load_config("tiny", ["model.vocab_size=256", "model.n_layers=4", "model.d_model=64", "model.n_heads=4",
                               "model.max_seq_len=64", "data.seq_len=64", "model.fused_kernels=off",
                               "model.compile=true"]).model
    torch.manual_seed(0)
    eager = Transformer(cfg)
    compiled = Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    apply_compile(compiled)
    tokens = torch.randint(0, 256, (2, 33))
    for model in (eager, compiled):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    torch.testing.assert_close(compiled(tokens[:, :-1], tokens[:, 1:]), eager(tokens[:, :-1], tokens[:, 1:]),
                               rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    with torch.no_grad():  # decoding: the cache path stays eager (no new graph)
        cache = KVCache(cfg, 1, 16, "cpu", torch.float32)
        torch.testing.assert_close(compiled(tokens[:1, :8], cache=cache), eager(tokens[:1, :8]), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(10):  # (one batch, learnt by heart: the loss falls)
            opt.zero_grad()
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            opt.step()
            losses[name].append(float(loss))
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=0)
    assert losses["eager"][-1] < losses["eager"][0]
