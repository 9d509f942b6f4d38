"""Neighbourhood attention on CUDA: the tiled backend's CUDA code paths and backend="auto" (the Triton kernels
once they pass their self-check) against the reference in float64 on the CPU, forward and every gradient, fp32
and bf16.

Marked `gpu`: `pytest -m gpu` (and bench/gpu_check.py) runs them on a GPU; without one they are skipped, and
GPU_TESTS_ON_CPU=1 dry-runs them on the CPU. The bf16 inputs are rounded first and the reference sees the rounded
values, so the tolerance measures the kernels' arithmetic, not the rounding of their inputs.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch

from common.ops import neighborhood as nb
from common.ops.neighborhood import neighborhood_attention

pytestmark = pytest.mark.gpu

# name -> (B, heads, H, W, d), kernel, border, rel ("shared" | "head" | None), window mask, return_weights
CASES = {
    "k3_mask_relshared_maskgrad_w": ((2, 2, 9, 13, 8), 3, "mask", "shared", True, True),
    "k7_zeros_relhead_d16": ((1, 3, 16, 16, 16), 7, "zeros", "head", False, False),
    "k5_window_wider_than_image": ((2, 2, 5, 4, 4), 5, "mask", "head", True, False),
    "k7_odd_map_several_tiles": ((1, 2, 33, 31, 8), 7, "mask", "shared", False, True),
    "k9_zeros_maskgrad_d32": ((1, 2, 12, 20, 32), 9, "zeros", "shared", True, False),
}
# max |ours - reference| / max(1, max |reference|). The tiled backend computes bf16 in fp32 and rounds the results;
# the Triton kernels (auto on CUDA) also feed P and dS to the bf16 tensor cores, as flash attention does.
TOLERANCE = {(torch.float32, "tiled"): 1e-4, (torch.float32, "auto"): 1e-4,
             (torch.bfloat16, "tiled"): 1e-2, (torch.bfloat16, "auto"): 3e-2}


def _inputs(name: str, device: torch.device, dtype: torch.dtype):
    """Leaves on `device` in `dtype` (the window mask stays fp32, as under autocast) and their exact float64
    copies on the CPU for the reference."""
    shape, kernel, _, rel, mask, _ = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    b, heads, h, w, d = shape
    values = [torch.randn(shape, generator=gen, dtype=torch.float64) * s for s in (0.7, 0.7, 1.0)]
    if rel is not None:
        values.append(torch.randn((kernel, kernel, d) if rel == "shared" else (heads, kernel, kernel, d),
                                  generator=gen, dtype=torch.float64) * 0.5)
    else:
        values.append(None)
    if mask:
        window = torch.rand(heads, kernel, kernel, generator=gen, dtype=torch.float64) * 0.9 + 0.1
        window[0, 0, :] = 0.0  # excluded offsets: their gradients must stay finite and correct
        values.append(window)
    else:
        values.append(None)
    ours, oracle = [], []
    for i, t in enumerate(values):
        if t is None:
            ours.append(None), oracle.append(None)
            continue
        cast = t.to(torch.float32 if i == 4 else dtype)
        ours.append(cast.to(device).requires_grad_())
        oracle.append(cast.double().requires_grad_())
    return ours, oracle


def _forward_backward(backend, inputs, name, upstream_seed):
    """Outputs (out and, if asked, the weights) and the gradients of a random linear loss of them."""
    _, kernel, border, _, _, want_weights = CASES[name]
    q, k, v, rel_pos, window_mask = inputs
    result = neighborhood_attention(q, k, v, kernel, rel_pos=rel_pos, window_mask=window_mask, border=border,
                                    backend=backend, return_weights=want_weights)
    outs = list(result) if want_weights else [result]
    gen = torch.Generator().manual_seed(upstream_seed)
    # The same upstream gradients for both sides, rounded to the outputs' dtype as autograd would.
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    loss = sum((o.double() * g.to(o.device).double()).sum() for o, g in zip(outs, upstream))
    leaves = [t for t in inputs if t is not None]
    return outs, torch.autograd.grad(loss, leaves)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().double().cpu()
    assert torch.isfinite(got).all()
    return ((got - want.detach()).abs().max() / want.detach().abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["tiled", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_float64_reference(gpu_device, no_tf32, name, backend, dtype):
    ours, oracle = _inputs(name, gpu_device, dtype)
    outs, grads = _forward_backward(backend, ours, name, upstream_seed=1)
    ref_outs, ref_grads = _forward_backward("reference", oracle, name, upstream_seed=1)
    for got, want in zip(outs, ref_outs):
        assert got.dtype == dtype and got.device.type == gpu_device.type
    for leaf, grad in zip([t for t in ours if t is not None], grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    errors = {f"out{i}": _relative_error(g, w) for i, (g, w) in enumerate(zip(outs, ref_outs))}
    labels = [label for label, t in zip(("dq", "dk", "dv", "drel_pos", "dwindow_mask"), ours) if t is not None]
    errors.update({label: _relative_error(g, w) for label, g, w in zip(labels, grads, ref_grads)})
    assert max(errors.values()) <= TOLERANCE[dtype, backend], errors


def test_auto_uses_the_triton_kernels_once_they_pass_their_self_check(gpu_device):
    if gpu_device.type != "cuda":
        pytest.skip("the Triton kernels need a CUDA device")
    pytest.importorskip("triton")
    q = torch.randn(2, 4, 16, 16, 16, device=gpu_device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed self-check warns and falls back to "tiled"
        assert nb.select_backend(q, True, kernel_size=7) == "triton"
        assert nb.select_backend(q.bfloat16(), False, kernel_size=7) == "triton"
