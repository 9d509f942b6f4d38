"""Adaptive span on CUDA: the layer (its learned window mask goes through the neighbourhood op's window_mask, the
Triton kernels on a GPU) against the same layer on the CPU, outputs and every gradient, span parameters included.

Marked `gpu`: `pytest -m gpu` (and bench/gpu_check.py) runs them on a GPU; without one they are skipped, and
GPU_TESTS_ON_CPU=1 dry-runs them on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adaptive_span import AdaptiveSpanAttention2d

pytestmark = pytest.mark.gpu


def test_layer_on_the_device_matches_the_cpu(gpu_device, no_tf32):
    torch.manual_seed(0)
    cpu_layer = AdaptiveSpanAttention2d(16, 32, heads=4, max_span=4, R=2.0, span_init=0.5, span_penalty=0.1)
    with torch.no_grad():
        cpu_layer.span.z.copy_(torch.tensor([0.2, 0.45, 0.8, 1.0]))
    device_layer = copy.deepcopy(cpu_layer).to(gpu_device)
    x = torch.randn(2, 16, 11, 14)
    g = torch.randn(2, 32, 11, 14)
    results = []
    for layer, inp in ((cpu_layer, x), (device_layer, x.to(gpu_device))):
        inp = inp.clone().requires_grad_()
        out = layer(inp)
        ((out * g.to(out.device)).sum() + layer.extra_loss()).backward()
        results.append([out, inp.grad, *(p.grad for p in layer.parameters())])
    assert device_layer.span.z.grad is not None and device_layer.span.z.grad.abs().sum() > 0
    for got, want in zip(results[1], results[0]):
        got = got.detach().cpu()
        assert torch.isfinite(got).all()
        assert ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item() <= 1e-4
