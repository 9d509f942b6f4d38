"""The memory-lean backend against the straightforward unfold one: same function, same gradients, less memory."""

from __future__ import annotations

import pytest
import torch

from common.inspect.memory import SavedTensors
from san import Bottleneck


def pair(channels=64, kernel_size=3, dtype=torch.float64, **attention):
    torch.manual_seed(0)
    lean = Bottleneck(channels, kernel_size, backend="lean", **attention).to(dtype)
    unfold = Bottleneck(channels, kernel_size, backend="unfold", **attention).to(dtype)
    unfold.load_state_dict(lean.state_dict())
    return lean, unfold


def run(block, x):
    x = x.clone().requires_grad_()
    with SavedTensors() as saved:
        y = block(x)
    y.square().mean().backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return y.detach(), x.grad, grads, saved


@pytest.mark.parametrize("mode, relation, padding", [
    ("pairwise", "subtraction", "reflection"), ("pairwise", "dot", "zeros"),
    ("patchwise", "concatenation", "reflection"), ("patchwise", "clique", "zeros")])
def test_same_outputs_gradients_and_running_statistics(mode, relation, padding):
    lean, unfold = pair(mode=mode, relation=relation, padding=padding)
    x = torch.randn(2, 64, 6, 7, dtype=torch.float64)
    (y_lean, dx_lean, g_lean, _), (y_ref, dx_ref, g_ref, _) = run(lean, x), run(unfold, x)
    assert torch.allclose(y_lean, y_ref, atol=1e-10)
    assert torch.allclose(dx_lean, dx_ref, atol=1e-10)
    for name, g in g_ref.items():
        assert torch.allclose(g_lean[name], g, atol=1e-10), name
    # the recomputation in backward must not update the running averages a second time
    for (name, b_lean), b_ref in zip(lean.named_buffers(), unfold.buffers()):
        assert torch.allclose(b_lean, b_ref.to(b_lean.dtype), atol=1e-12), name
    assert all(b.item() == 1 for name, b in lean.named_buffers() if name.endswith("num_batches_tracked"))


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_saves_at_most_half_and_never_the_expanded_values(mode):
    lean, unfold = pair(kernel_size=7, dtype=torch.float32, mode=mode)
    x = torch.randn(2, 64, 12, 12)
    saved_lean, saved_ref = run(lean, x)[3], run(unfold, x)[3]
    expanded_values = 2 * 16 * 49 * 12 * 12  # (B, mid, k*k, H*W)
    assert saved_ref.largest >= expanded_values  # the measurement sees the unfold's copy ...
    assert saved_lean.largest < expanded_values  # ... and the lean backend keeps none
    assert saved_lean.bytes <= 0.5 * saved_ref.bytes


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_trains_under_bf16_autocast(mode):
    lean, _ = pair(dtype=torch.float32, mode=mode)
    x = torch.randn(2, 64, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lean(x)
    y.float().square().mean().backward()
    with torch.no_grad():
        y32 = lean(x)
    assert (y.float() - y32).abs().max() < 0.05 * y32.abs().max()  # bf16 precision, not a different function
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lean.parameters())
