"""model.compile: each block through torch.compile (parallelize.apply_compile), one graph for every block of a shape,
training losses equal to eager; and the layouts it refuses in one line."""
import pytest
import torch

from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets
from distributed import run_distributed

from megatrain.config import ConfigError, load_config


@pytest.mark.parametrize("over, word", [("parallel.tp=2", "parallel.tp=2"), ("parallel.zero_stage=3", "zero_stage=3"),
                                        ("train.activation_checkpointing=selective", "selective")])
def test_layouts_compile_does_not_cover_are_refused_in_one_line(over, word):
    with pytest.raises(ConfigError, match=f"model.compile: not with .*{word}"):
        load_config("tiny", ["model.compile=true", over])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_blocks_share_one_graph_and_match_eager():
    """A 4-block model: the compiled forward and backward equal eager's (fp32, 1e-5), dynamo compiles one frame for
    all four blocks, and a KV-cache decode runs the eager blocks."""
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_compiled_run_logs_the_eager_runs_losses(tmp_path):
    """10 training steps of a 4-block model with model.compile=true log the losses of the same run eagerly (fp32,
    1e-5; both on the plain-PyTorch ops, as compiled blocks run them)."""
    data = make_byte_dataset(tmp_path)
    runs = {}
    for name, on in (("eager", False), ("compiled", True)):
        runs[name] = str(tmp_path / name)
        over = {"model.compile": on, "model.fused_kernels": "off", "model.n_layers": 4, "train.max_steps": 10,
                "checkpoint.interval": 5, "train.eval_interval": 5}
        run_distributed(run_configs, 1, [small_sets(data, runs[name], **over)], timeout=600)
    assert sorted(losses(runs["compiled"])) == list(range(1, 11))
    assert_close_curves(losses(runs["eager"]), losses(runs["compiled"]), rtol=1e-5)
    assert_close_curves(losses(runs["eager"], "eval"), losses(runs["compiled"], "eval"), rtol=1e-5)
