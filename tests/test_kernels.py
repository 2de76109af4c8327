"""Fused kernels against the PyTorch reference: odd shapes, dtypes, gradcheck, ignore-index, TP, training."""
import os
import subprocess
import sys

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import ops, reference, selfcheck

pytestmark = pytest.mark.skipif(not kernels.built(), reason="megatrain._C not built: fused kernels fall back to the reference")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA kernel parity runs on a GPU machine")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def _run(fn, inputs, up=False):
    """Output and input gradients of fn (inputs cloned; floated when up)."""
    xs = []
    for x in inputs:
        if torch.is_tensor(x) and x.is_floating_point():
            y = x.detach().clone()
            xs.append((y.float() if up else y).requires_grad_(x.requires_grad))
        else:
            xs.append(x)
    y = fn(*xs)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y.float() * w).sum().backward()
    return [y.float()] + [x.grad.float() for x in xs if torch.is_tensor(x) and x.requires_grad]


def _compare(fused, ref, inputs, dtype):
    """Fused op vs the reference, forward and input gradients. In bf16/fp16 both are measured against the
    reference run in float32 on the same inputs: the fused op may be off by at most twice PyTorch's own
    low-precision error (plus a little)."""
    got, want = _run(fused, inputs), _run(ref, inputs)
    if dtype not in (torch.bfloat16, torch.float16):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL[dtype])
        return
    exact = _run(ref, inputs, up=True)
    for g, w, e in zip(got, want, exact):
        assert (g - e).abs().max() <= 2 * (w - e).abs().max() + 1e-2 * e.abs().max().clamp(min=1e-3), (g - e).abs().max()


def _t(*shape, dtype=torch.float32, device="cpu", scale=1.0, grad=True):
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype).requires_grad_(grad)


# (300, 96): the CUDA column reductions (weight and bias gradients) over several chunks of rows, the last one short
SHAPES = [(1, 1), (1, 7), (3, 37), (64, 128), (5, 1000), (300, 96)]


def _norm_rope_cases(dtype, device):
    out = []
    for rows, D in SHAPES:
        out.append(("rms_norm", ops.rms_norm, reference.rms_norm, (_t(rows, D, dtype=dtype, device=device), _t(D, dtype=dtype, device=device), 1e-5)))
        if D == 1:  # LayerNorm of one feature is 0 by definition; PyTorch's own kernel rounds to ~1e-5 there
            continue
        out.append(("layer_norm", ops.layer_norm, reference.layer_norm,
                    (_t(rows, D, dtype=dtype, device=device), _t(D, dtype=dtype, device=device), _t(D, dtype=dtype, device=device), 1e-5)))
        out.append(("layer_norm_nobias", ops.layer_norm, reference.layer_norm,
                    (_t(rows, D, dtype=dtype, device=device), _t(D, dtype=dtype, device=device), None, 1e-5)))
    for rows, D in SHAPES:
        out.append(("swiglu", ops.swiglu, reference.swiglu, (_t(rows, 2 * D, dtype=dtype, device=device),)))
        out.append(("bias_gelu", ops.bias_gelu, reference.bias_gelu, (_t(rows, D, dtype=dtype, device=device), _t(D, dtype=dtype, device=device))))
    from megatrain.model import rope_tables

    for B, T, H, D in [(1, 1, 1, 2), (2, 5, 3, 10), (2, 9, 4, 64)]:
        cos, sin = (t.to(device) for t in rope_tables(D, 16, 10000.0))
        out.append(("rope", ops.rope, reference.rope, (_t(B, T, H, D, dtype=dtype, device=device), cos, sin)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_parity_forward_backward(dtype):
    torch.manual_seed(0)
    for name, fused, ref, inputs in _norm_rope_cases(dtype, "cpu"):
        _compare(fused, ref, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_calls_give_the_training_forward(dtype):
    """Under no_grad (decoding) each op calls its kernel without autograd's bookkeeping: the same output, bit for bit,
    as the autograd path, and the reference's within the tolerance; the same for inputs that need no gradient."""
    torch.manual_seed(0)
    for name, fused, ref, inputs in _norm_rope_cases(dtype, "cpu"):
        trained = fused(*inputs).detach()
        with torch.no_grad():
            got = fused(*inputs)
        frozen = fused(*[x.detach() if torch.is_tensor(x) else x for x in inputs])
        assert not got.requires_grad and not frozen.requires_grad, name
        assert torch.equal(got, trained) and torch.equal(frozen, trained), name
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref(*inputs).detach(), **TOL[dtype], msg=name)


def test_norms_of_rows_far_from_zero():
    """Rows with mean 1000 and std 1, where float32 keeps only ~4 digits of x - mean: forward and gradients
    of the fused norms stay within twice PyTorch's own float32 error of the float64 answer."""
    torch.manual_seed(0)
    x = (torch.randn(64, 512, dtype=torch.float64) + 1000).requires_grad_()
    w, b = _t(512, dtype=torch.float64), _t(512, dtype=torch.float64)
    for fused, ref, args in ((ops.layer_norm, reference.layer_norm, (w, b, 1e-5)),
                             (ops.rms_norm, reference.rms_norm, (w, 1e-5))):
        exact = _run(ref, (x, *args))
        down = [a.float() if torch.is_tensor(a) else a for a in (x, *args)]
        for g, r, e in zip(_run(fused, down), _run(ref, down), exact):
            assert (g - e).abs().max() <= 2 * (r - e).abs().max() + 1e-5 * e.abs().max(), (g - e).abs().max()


def test_rope_on_strided_qkv_view():
    """The model applies RoPE to views of the fused QKV output: non-contiguous batch/time strides."""
    from megatrain.model import rope_tables

    qkv = _t(2, 6, 3 * 4 * 8, grad=False)
    q = qkv[..., : 4 * 8].view(2, 6, 4, 8).requires_grad_()  # a non-leaf view would do too
    cos, sin = rope_tables(8, 6, 10000.0)
    _compare(ops.rope, reference.rope, (q, cos, sin), torch.float32)


@pytest.mark.parametrize("V", [1, 5, 301, 50257])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_parity(V, smoothing):
    torch.manual_seed(0)
    N = 13
    logits = _t(N, V, scale=4.0)
    labels = torch.randint(0, V, (N,))
    labels[[0, 5]] = -100  # ignored rows
    f = lambda x, y: ops.cross_entropy(x, y, label_smoothing=smoothing)
    r = lambda x, y: reference.cross_entropy(x, y, label_smoothing=smoothing)
    _compare(f, r, (logits, labels), torch.float32)
    # every row ignored: zero loss, zero gradient, no NaN
    x = logits.detach().clone().requires_grad_()
    loss = ops.cross_entropy(x, torch.full((N,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0)


def test_cross_entropy_in_place_backward_reuses_the_logits():
    logits = _t(4, 50, scale=2.0, grad=False)
    h = logits.clone().requires_grad_()
    z = h * 1.0  # the logits tensor the loss sees
    loss = ops.cross_entropy(z, torch.tensor([1, 2, 3, -100]), inplace_backward=True)
    loss.backward()
    ref = logits.clone().requires_grad_()
    reference.cross_entropy(ref, torch.tensor([1, 2, 3, -100])).backward()
    torch.testing.assert_close(h.grad, ref.grad)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_cross_entropy_parity(chunk):
    torch.manual_seed(0)
    h, w = _t(37, 24), _t(513, 24, scale=0.3)
    y = torch.randint(0, 513, (37,))
    y[3] = -100
    _compare(lambda a, b, c: ops.linear_cross_entropy(a, b, c, chunk=chunk), reference.linear_cross_entropy, (h, w, y), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_linear_equals_the_product_for_every_row_count_and_odd_widths(dtype):
    """decode_linear (a decoding step's few rows against a whole weight): each tiling (4 weight rows x 1 row, 2 x 4)
    and each remainder, against x @ w.T."""
    torch.manual_seed(0)
    for M in range(1, 17):
        for N, K in ((1, 1), (7, 37), (130, 96), (257, 5)):
            x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
            torch.testing.assert_close(torch.ops.megatrain.decode_linear(x, w), x @ w.t(), **TOL[dtype])
    x, w = torch.randn(3, 64), torch.randn(64, 80)  # non-contiguous inputs (a transposed weight)
    torch.testing.assert_close(torch.ops.megatrain.decode_linear(x, w.t()), x @ w, **TOL[torch.float32])


@pytest.mark.skipif(not kernels.built(), reason="megatrain._C not built")
def test_fused_cross_entropy_refuses_a_label_outside_the_vocabulary():
    """Before, the fused kernels read such a label as a zero logit and returned a finite loss."""
    logits, hidden, weight = torch.randn(4, 10), torch.randn(4, 8), torch.randn(10, 8)
    for labels in ([1, 2, 10, 3], [1, -5, 2, 3]):
        with pytest.raises(RuntimeError, match=r"a label outside the vocabulary \[0, 10\)"):
            ops.cross_entropy(logits, torch.tensor(labels))
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            ops.linear_cross_entropy(hidden, weight, torch.tensor(labels))
    ops.cross_entropy(logits, torch.tensor([1, 2, -100, 9]))  # ignore_index and the last id are fine


def test_gradcheck_float64():
    from megatrain.model import rope_tables

    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    cos, sin = (t.double() for t in rope_tables(4, 3, 10000.0))
    checks = [
        (ops.rms_norm, (_t(3, 5, **d), _t(5, **d), 1e-5)),
        (ops.layer_norm, (_t(3, 5, **d), _t(5, **d), _t(5, **d), 1e-5)),
        (ops.rope, (_t(1, 3, 2, 4, **d), cos, sin)),
        (ops.swiglu, (_t(2, 6, **d),)),
        (ops.bias_gelu, (_t(2, 5, **d), _t(5, **d))),
        (lambda x: ops.cross_entropy(x, torch.tensor([0, 3, -100, 6]), label_smoothing=0.1), (_t(4, 7, **d),)),
        (lambda h, w: ops.linear_cross_entropy(h, w, torch.tensor([0, 3, -100, 6]), chunk=3), (_t(4, 5, **d), _t(7, 5, **d))),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_linear_cross_entropy_memory_is_chunked():
    """The chunked op never holds [tokens, vocab] logits: its saved state is hidden- and weight-sized."""
    h, w = _t(512, 16), _t(4096, 16)
    y = torch.randint(0, 4096, (512,))
    loss = ops.linear_cross_entropy(h, w, y, chunk=64)
    saved = [t.numel() for t in loss.grad_fn.saved_tensors]
    assert max(saved) <= 4096 * 16 and sum(saved) < 512 * 4096 / 8


def _vocab_parallel(rank, world):
    import torch.distributed as dist

    g = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    logits, labels = torch.randn(11, 64) * 3, torch.randint(0, 64, (11,))
    labels[4] = -100
    for smoothing in (0.0, 0.1):
        shard = logits.chunk(world, -1)[rank].clone().requires_grad_()
        loss = ops.cross_entropy(shard, labels, label_smoothing=smoothing, group=g)
        full = logits.clone().requires_grad_()
        ref = reference.cross_entropy(full, labels, label_smoothing=smoothing)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(shard.grad, full.grad.chunk(world, -1)[rank], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_vocab_parallel_fused_cross_entropy():
    from distributed import run_distributed

    run_distributed(_vocab_parallel, 2, timeout=120)


@pytest.mark.slow
def test_training_losses_equal_with_fused_kernels_on_and_off(tmp_path):
    from distributed import run_distributed
    from training_utils import assert_close_curves, losses, make_byte_dataset, run_configs, small_sets

    data = make_byte_dataset(tmp_path)
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    common = {"train.max_steps": 5, "checkpoint.interval": 0, "train.eval_interval": 5}
    run_distributed(run_configs, 1, [small_sets(data, on, **common, **{"model.fused_kernels": "on"}),
                                     small_sets(data, off, **common, **{"model.fused_kernels": "off"})], timeout=300)
    assert_close_curves(losses(off), losses(on), rtol=1e-5)


@pytest.mark.slow
def test_check_cli_and_reference_fallback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatrain.kernels", "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cpu: implementation cpu" in r.stdout
    assert r.stdout.count("parity ok") == len(ops.SELF_CHECKS) * len(kernels.FUSED_DTYPES["cpu"])  # every op and dtype
    env = {**os.environ, "MEGATRAIN_DISABLE_KERNELS": "1"}
    r = subprocess.run([sys.executable, "-m", "megatrain.kernels", "--check"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "implementation reference (" in r.stdout and "MEGATRAIN_DISABLE_KERNELS" in r.stdout
    assert "nothing to check on cpu" in r.stdout
    code = ("import torch; from megatrain.config import ModelConfig; from megatrain.model import Transformer; "
            "m = Transformer(ModelConfig(vocab_size=50, fused_kernels='auto')); x = torch.randint(0, 50, (2, 9)); "
            "l = m(x[:, :-1], x[:, 1:]); l.backward(); print('trained', m.fused, round(l.item(), 3))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "trained False" in r.stdout, r.stderr
    assert r.stderr.count("fused kernels requested but not built") == 1
    # `on` means on: without the extension it stops in one line (before, it fell back to the reference too)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megatrain.cli", "pretrain", "--config", "tiny", "--set",
                        "model.fused_kernels=on", "--set", "train.max_steps=1", "--set", f"checkpoint.dir={out}"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert not out.exists()  # nothing left behind
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        "megatrain pretrain: error: config key model.fused_kernels: 'on', but megatrain's extension is not built"), r.stderr


# -- the self-check on first use (selfcheck.py), on the CPU kernels with one made wrong on purpose -------------------


class _Faulty:
    """torch.ops.megatrain with the kernel `name` replaced by `fault` (a wrong answer, or an exception)."""

    def __init__(self, name, fault):
        self.name, self.fault = name, fault

    def __getattr__(self, attr):
        return self.fault if attr == self.name else getattr(torch.ops.megatrain, attr)


def _break(monkeypatch, name, fault):
    monkeypatch.setattr(ops, "_ops", lambda: _Faulty(name, fault))


@pytest.fixture
def selfcheck_on(monkeypatch):
    """The self-check as it runs on a GPU, here on the CPU kernels; verdicts forgotten before and after."""
    monkeypatch.setenv("MEGATRAIN_KERNEL_SELFCHECK", "1")
    selfcheck.reset()
    yield
    selfcheck.reset()


def _loss_and_grads(fused_kernels):
    """A tiny Llama-style model (RMSNorm, RoPE, SwiGLU, the chunked LM-head loss): its loss and gradients."""
    from megatrain.config import ModelConfig
    from megatrain.model import Transformer

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, n_layers=2, n_heads=2, d_model=32, max_seq_len=16,
                                fused_kernels=fused_kernels))
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = m(x[:, :-1], x[:, 1:])
    loss.backward()
    return [loss.detach()] + [p.grad for p in m.parameters()]


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_selfcheck_turns_off_a_kernel_that_gives_a_wrong_answer(selfcheck_on, monkeypatch, capsys):
    _break(monkeypatch, "swiglu_fwd", lambda gate_up: torch.ops.megatrain.swiglu_fwd(gate_up) * 1.1)
    reference_run = _loss_and_grads("off")
    monkeypatch.delenv("MEGATRAIN_KERNEL_SELFCHECK")  # unchecked (the CPU default), the fault reaches the gradients
    with pytest.raises(AssertionError):
        _assert_same(_loss_and_grads("on"), reference_run)
    monkeypatch.setenv("MEGATRAIN_KERNEL_SELFCHECK", "1")
    selfcheck.reset()
    capsys.readouterr()
    _assert_same(_loss_and_grads("on"), reference_run)  # checked: swiglu runs the reference, the rest stays fused
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatrain: fused kernel swiglu on cpu float32 disagrees with the "
                                                   "reference (max error "), lines
    cpu = torch.device("cpu")
    assert selfcheck.verdicts() == {(op, cpu, torch.float32): op != "swiglu"
                                    for op in ("rms_norm", "rope", "swiglu", "linear_cross_entropy")}
    _loss_and_grads("on")  # the verdict is kept: no second check, no second line
    assert capsys.readouterr().err == ""


def test_selfcheck_turns_off_a_kernel_that_raises(selfcheck_on, monkeypatch, capsys):
    def fault(*args):
        raise RuntimeError("injected fault\nsecond line")

    _break(monkeypatch, "rms_norm_bwd", fault)  # the forward is right: only the backward fails
    _assert_same(_loss_and_grads("on"), _loss_and_grads("off"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["megatrain: fused kernel rms_norm on cpu float32 raised RuntimeError: injected fault; using "
                     "the PyTorch reference for it in this process"]
    assert [op for (op, _, _), ok in selfcheck.verdicts().items() if not ok] == ["rms_norm"]


def test_selfcheck_stays_out_of_the_callers_graph_and_random_streams(selfcheck_on):
    """The check runs inside the caller's forward: it must add nothing to the caller's graph or saved-tensor hooks,
    work under no_grad, and draw nothing from the global generator (a recomputed forward must replay it)."""
    packed = []
    x = torch.randn(4, 2 * 37, requires_grad=True)
    state = torch.get_rng_state()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = ops.swiglu(x)  # first use: checked here
    assert ("swiglu", torch.device("cpu"), torch.float32) in selfcheck.verdicts()
    assert torch.equal(torch.get_rng_state(), state)
    assert len(packed) == 1  # only swiglu's own saved input
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    reference.swiglu(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    with torch.no_grad():
        assert not ops.rms_norm(torch.randn(3, 8), torch.ones(8), 1e-5).requires_grad  # first use under no_grad
    assert selfcheck.verdicts()[("rms_norm", torch.device("cpu"), torch.float32)]


def test_check_cli_fails_on_a_wrong_kernel(monkeypatch, capsys):
    from megatrain.kernels import __main__ as cli

    _break(monkeypatch, "ce_grad", lambda *a: torch.ops.megatrain.ce_grad(*a) * 0.5)
    assert cli.main(["--check"]) == 1
    failed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "parity FAILED" in line]
    assert failed == ["cross_entropy", "linear_cross_entropy"] * len(kernels.FUSED_DTYPES["cpu"])


def test_check_cli_fails_when_the_extension_is_built_but_does_not_load():
    """An extension that fails to import (built against another torch, say) is a failure, not 'nothing to check'."""
    code = ("import sys, runpy\n"
            "class Broken:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'megatrain._C':\n"
            "            raise ImportError('_C.so: undefined symbol: _ZN3c10')\n"
            "sys.meta_path.insert(0, Broken())\n"
            "sys.argv = ['megatrain.kernels', '--check']\n"
            "runpy.run_module('megatrain.kernels', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout.startswith("megatrain._C is built but does not load: _C.so: undefined "
                                                     "symbol"), (r.stdout, r.stderr)


def _selfcheck_agreed_across_ranks(rank, world):
    """Rank 1's cross-entropy kernel is wrong: both ranks must take the reference vocab-parallel path (their
    collectives differ from the fused path's), and get the reference's loss and gradients."""
    import torch.distributed as dist

    os.environ["MEGATRAIN_KERNEL_SELFCHECK"] = "1"
    if rank == 1:
        ops._ops = lambda: _Faulty("ce_stats", lambda *a: [t * 1.1 for t in torch.ops.megatrain.ce_stats(*a)])
    g = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    logits, labels = torch.randn(11, 64) * 3, torch.randint(0, 64, (11,))
    shard = logits.chunk(world, -1)[rank].clone().requires_grad_()
    loss = ops.cross_entropy(shard, labels, group=g)
    assert selfcheck.verdicts() == {("cross_entropy", torch.device("cpu"), torch.float32): False}
    full = logits.clone().requires_grad_()
    ref = reference.cross_entropy(full, labels)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(shard.grad, full.grad.chunk(world, -1)[rank])


@pytest.mark.slow
def test_selfcheck_verdict_is_agreed_across_a_tensor_parallel_group():
    from distributed import run_distributed

    run_distributed(_selfcheck_agreed_across_ranks, 2, timeout=120)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_parity(dtype):
    assert kernels.implementation("cuda", dtype)[0] == "cuda", kernels.implementation("cuda", dtype)[1]
    torch.manual_seed(0)
    for name, fused, ref, inputs in _norm_rope_cases(dtype, "cuda"):
        _compare(fused, ref, inputs, dtype)
    logits, labels = _t(33, 50257, device="cuda", dtype=dtype, scale=3.0), torch.randint(0, 50257, (33,), device="cuda")
    labels[2] = -100
    _compare(ops.cross_entropy, reference.cross_entropy, (logits, labels), dtype)


@GPU
@pytest.mark.gpu
def test_cuda_column_reductions_over_many_rows():
    """70,001 rows: the weight and bias gradients are summed over chunks of more than 64 rows (float64, so the
    comparison sees the chunking, not fp32 rounding over 70,001 terms)."""
    torch.manual_seed(0)
    dtype, N, D = torch.float64, 70001, 16

    def t(*shape):
        return _t(*shape, dtype=dtype, device="cuda")

    for fused, ref, inputs in [(ops.rms_norm, reference.rms_norm, (t(N, D), t(D), 1e-5)),
                               (ops.layer_norm, reference.layer_norm, (t(N, D), t(D), t(D), 1e-5)),
                               (ops.bias_gelu, reference.bias_gelu, (t(N, D), t(D)))]:
        _compare(fused, ref, inputs, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's answer where there is no GPU")
def test_gpu_bench_script_says_in_one_line_that_there_is_no_gpu():
    """bench/gpu.sh runs the GPU checks unattended where a GPU is; elsewhere it runs nothing and says so."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu.sh")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 2 and r.stdout.strip() == ("bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is "
                                                      "false); nothing to run") and not r.stderr, (r.stdout, r.stderr)
