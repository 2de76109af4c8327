"""Tier 1: cpu_linear, the linear layers' products through oneDNN on a CPU in fp32 (forward, both gradients, the
LoRA update's products and the chunked LM head + cross-entropy), each against the same formula in float64."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatrain import cpu_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _ran_onednn(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.key == "mkldnn::_linear_pointwise" for e in prof.key_averages())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("grads", ["all", "input-only", "weight-only"])
@pytest.mark.parametrize("layout", ["2d", "3d", "strided"])
def test_linear_has_f_linears_output_and_gradients(bias, grads, layout):
    """Output and each gradient asked for equal float64 F.linear's (fp32 summation order aside); a gradient not
    asked for is not computed (a frozen weight gets none)."""
    g = torch.Generator().manual_seed(0)
    shape = {"2d": (37, 48), "3d": (3, 11, 48), "strided": (48, 37)}[layout]
    x = torch.randn(*shape, generator=g)
    x = x.t() if layout == "strided" else x  # [37, 48] with strides (1, 37)
    w, b = torch.randn(29, 48, generator=g), torch.randn(29, generator=g) if bias else None
    x.requires_grad_(grads in ("all", "input-only"))
    w.requires_grad_(grads in ("all", "weight-only"))
    if b is not None:
        b.requires_grad_(grads == "all")
    leaves = [t for t in (x, w, b) if t is not None]
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    up = torch.randn(*x.shape[:-1], 29, generator=g)
    y = cpu_linear.linear(x, w, b)
    assert _ran_onednn(lambda: cpu_linear.linear(x, w, b))
    y_ref = F.linear(*ref)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    y.backward(up)
    y_ref.backward(up.double())
    for t, r in zip(leaves, ref):
        if r.requires_grad:
            torch.testing.assert_close(t.grad, r.grad.float(), rtol=1e-5, atol=1e-4)
        else:
            assert t.grad is None


def test_linear_is_f_linear_where_onednn_does_not_run():
    """float64, a ZeRO-3 partitioned weight (ds_id) and an empty input take F.linear, bit for bit."""
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(cpu_linear.linear(x, w), F.linear(x, w))
    x, w = x.float(), w.float()
    w.ds_id = 0
    assert not cpu_linear.runs_here(x, w) and torch.equal(cpu_linear.linear(x, w), F.linear(x, w))
    assert cpu_linear.linear(torch.empty(0, 8), torch.randn(3, 8)).shape == (0, 3)


def test_the_environment_switch_keeps_torchs_own_product():
    code = "import torch; from megatrain import cpu_linear; print(cpu_linear.BACKEND, cpu_linear.runs_here(torch.ones(2, 2), torch.ones(2, 2)))"
    env = dict(os.environ, MEGATRAIN_CPU_LINEAR="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["torch.mm", "False"]


def test_the_lora_update_through_onednn_has_its_formulas_gradients():
    """y + s u B^T: the forward's fused sum and u's gradient go through oneDNN in fp32; against float64 autograd."""
    from megatrain.heads import add_lora_update

    g = torch.Generator().manual_seed(1)
    y, u, B = torch.randn(4, 9, 40, generator=g), torch.randn(4, 9, 8, generator=g), torch.randn(40, 8, generator=g)
    leaves = [t.requires_grad_() for t in (y, u, B)]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    up = torch.randn(4, 9, 40, generator=g)
    out = add_lora_update(y, u, B, 2.0)
    out_ref = ref[0] + 2.0 * ref[1] @ ref[2].t()
    torch.testing.assert_close(out, out_ref.float(), rtol=1e-5, atol=1e-5)
    assert _ran_onednn(lambda: add_lora_update(y, u, B, 2.0))
    out.backward(up)
    out_ref.backward(up.double())
    for t, r in zip(leaves, ref):
        torch.testing.assert_close(t.grad, r.grad.float(), rtol=1e-5, atol=1e-4)


def test_the_chunked_lm_head_through_onednn_has_the_references_loss_and_gradients():
    """Three chunks (the weight's gradient summed in the product's epilogue), fp32 against float64."""
    from megatrain.kernels import ops, reference

    if not ops.use_fused(torch.empty(1)):
        pytest.skip("megatrain's extension is not built")
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(70, 32, generator=g), 0.2 * torch.randn(300, 32, generator=g)
    labels = torch.randint(0, 300, (70,), generator=g)
    labels[::7] = -100
    h.requires_grad_(), w.requires_grad_()
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    loss = ops.linear_cross_entropy(h, w, labels, chunk=32)
    loss64 = reference.linear_cross_entropy(h64, w64, labels)
    torch.testing.assert_close(loss.double(), loss64.double(), rtol=1e-5, atol=1e-6)
    loss.backward()
    loss64.backward()
    torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-4, atol=1e-6)


def test_a_frozen_layer_keeps_no_input_for_its_backward():
    """As F.linear: x is saved only for the weight's gradient, the weight only for x's (LoRA's frozen base layers
    would otherwise hold every projection's input until the backward)."""
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(5, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cpu_linear.linear(x, w)
    assert [t.shape for t in saved] == [w.shape]
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(6, 8))
