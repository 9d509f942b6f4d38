"""SASA on CUDA: the layer (backend "auto": the Triton kernels once they pass their self-check) against the same
layer on the CPU, in fp32 and under bf16 autocast, and a SASA ResNet-26 training step in bf16 with channels_last.

Marked `gpu`: `pytest -m gpu` (and bench/gpu_check.py) runs them on a GPU; without one they are skipped, and
GPU_TESTS_ON_CPU=1 dry-runs them on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from common.registry import create_model
from sasa import LocalSelfAttention2d

pytestmark = pytest.mark.gpu


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert torch.isfinite(got).all()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def _outputs_and_grads(layer, x, autocast_dtype=None):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = layer(x)
    g = torch.Generator().manual_seed(1)
    out.float().backward(torch.randn(out.shape, generator=g).to(out.device))
    return [out, x.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("autocast_dtype, tolerance", [(None, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_layer_on_the_device_matches_the_cpu(gpu_device, no_tf32, autocast_dtype, tolerance):
    torch.manual_seed(0)
    cpu_layer = LocalSelfAttention2d(16, 32, kernel_size=7, heads=4)
    device_layer = copy.deepcopy(cpu_layer).to(gpu_device)
    x = torch.randn(2, 16, 13, 18)
    want = _outputs_and_grads(cpu_layer, x)
    got = _outputs_and_grads(device_layer, x.to(gpu_device), autocast_dtype)
    errors = [_relative_error(g, w) for g, w in zip(got, want)]
    assert max(errors) <= tolerance, errors  # output, input gradient, then every parameter's gradient


def test_resnet26_bf16_channels_last_step_gives_finite_gradients_everywhere(gpu_device):
    """(Through 26 layers of random weights bf16 logits drift far from fp32 ones, so this checks the path runs
    and trains, not its numbers; the layer test above checks those.)"""
    torch.manual_seed(0)
    model = create_model("sasa_resnet26", stem="cifar", num_classes=10).to(gpu_device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device=gpu_device).contiguous(memory_format=torch.channels_last)
    with torch.autocast(gpu_device.type, dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == torch.bfloat16
    loss = F.cross_entropy(logits.float(), torch.arange(4, device=gpu_device))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
