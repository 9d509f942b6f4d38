"""The aggregation y_i = sum_{j in R(i)} alpha_ij (.) beta(x_j) with channel-shared weights.

weights (B, G, k*k, H, W) and values (B, C, H, W), C = share_planes * G. Sharing is interleaved,
as in the official code: value channel c uses weight group c mod G. Viewing the values as
(B, share, G, H, W) makes that a broadcast over the share dimension.

`aggregate` never builds the k*k-expanded values (B, C, k*k, H, W): it accumulates one offset at a
time from a padded copy of the values, in forward and in backward, and saves only the weights and
the (unexpanded) values. `aggregate_unfold` is the straightforward unfold formulation, kept as the
test oracle and the benchmark's reference.

Cost: B * C * H * W * k^2 multiply-accumulates (one per value channel and footprint offset), for both
formulations: torch.utils.flop_counter counts this formula (`aggregation_macs`, registered through
`common.inspect.flops`), not the element-wise ops that compute it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from common.inspect.flops import counted_op
from san.footprint import offsets, pad, pad_adjoint, windows


def _shared(values: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, ...) -> (B, C // groups, groups, ...): channel c lands in group c mod groups."""
    return values.reshape(values.shape[0], values.shape[1] // groups, groups, *values.shape[2:])


def _accumulate(weights: torch.Tensor, padded: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """sum over offsets of weights[:, :, o] times the shifted window of `padded` (B, S, G, H+2r, W+2r)."""
    b, groups, _, h, w = weights.shape
    dtype = torch.promote_types(weights.dtype, padded.dtype)
    out = torch.zeros(b, padded.shape[1], groups, h, w, dtype=dtype, device=weights.device)
    for o, (a, c) in enumerate(offsets(kernel_size)):
        out.addcmul_(padded[..., a:a + h, c:c + w], weights[:, None, :, o])
    return out


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, values, kernel_size: int, padding: str):
        ctx.setup = (kernel_size, padding)
        ctx.save_for_backward(weights, values)
        groups = weights.shape[1]
        padded = _shared(pad(values, kernel_size // 2, padding), groups)
        return _accumulate(weights, padded, kernel_size).flatten(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weights, values = ctx.saved_tensors
        kernel_size, padding = ctx.setup
        r = kernel_size // 2
        b, groups, _, h, w = weights.shape
        grad = _shared(grad, groups)  # (B, S, G, H, W)
        padded = _shared(pad(values, r, padding), groups)
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[0] else None
        grad_padded = torch.zeros(padded.shape, dtype=grad.dtype, device=grad.device) \
            if ctx.needs_input_grad[1] else None
        for o, (a, c) in enumerate(offsets(kernel_size)):
            window = (slice(None),) * 3 + (slice(a, a + h), slice(c, c + w))
            if grad_weights is not None:  # d/d alpha_o = sum over the channels sharing the group
                grad_weights[:, :, o] = (grad * padded[window]).sum(1)
            if grad_padded is not None:  # d/d beta: each offset's contribution, shifted back
                grad_padded[window].addcmul_(grad, weights[:, None, :, o])
        grad_values = None
        if grad_padded is not None:
            grad_values = pad_adjoint(grad_padded.flatten(1, 2), r, padding).to(values.dtype)
        return grad_weights, grad_values, None, None


def aggregation_macs(weights: torch.Tensor, values: torch.Tensor, kernel_size: int, padding: str) -> int:
    """Multiply-accumulates of the aggregation: B * C * H * W * k^2 (FLOPs: twice that)."""
    return values.numel() * kernel_size * kernel_size


@counted_op("san_aggregation", macs=aggregation_macs)
def aggregate(weights: torch.Tensor, values: torch.Tensor, kernel_size: int, padding: str) -> torch.Tensor:
    """(B, G, k*k, H, W), (B, C, H, W) -> (B, C, H, W), without a k*k-expanded copy of the values."""
    needs_grad = torch.is_grad_enabled() and (weights.requires_grad or values.requires_grad)
    if needs_grad and not torch.compiler.is_compiling():
        return _Aggregate.apply(weights, values, kernel_size, padding)
    # Inference, export and torch.compile: the same accumulation as plain ops (the compiler
    # derives its own backward).
    padded = _shared(pad(values, kernel_size // 2, padding), weights.shape[1])
    return _accumulate(weights, padded, kernel_size).flatten(1, 2)


@counted_op("san_aggregation", macs=aggregation_macs)
def aggregate_unfold(weights: torch.Tensor, values: torch.Tensor, kernel_size: int, padding: str) -> torch.Tensor:
    """The straightforward formulation: unfold the values to (B, C, k*k, H*W), multiply, sum."""
    b, groups, kk, h, w = weights.shape
    expanded = _shared(windows(values, kernel_size, padding), groups)  # (B, S, G, k*k, H*W)
    out = (weights.reshape(b, 1, groups, kk, h * w) * expanded).sum(3)
    return out.reshape(b, -1, h, w)
