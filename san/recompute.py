"""Run a module keeping only its inputs for backward, and run it again in backward.

Used for the attention weights (`san.weights`): everything between (phi, psi) and alpha is
k*k-expanded (the key windows, delta, gamma's hidden maps, the logits), and plain autograd keeps
several such tensors per block. Here forward keeps only phi and psi (not expanded) and returns
alpha, which the aggregation saves anyway; backward recomputes the module with autograd on and
differentiates it. The cost is one extra forward of gamma per block.

The module is called as module(*inputs, update_stats=...): True in forward, False in the
recomputation, so batch norms normalise with the same batch statistics without updating their
running averages twice. Autocast state is restored for the recomputation so it matches forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module: nn.Module, n_inputs: int, *tensors):
        inputs, ctx.params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.module, ctx.n_inputs = module, n_inputs
        ctx.autocast = _autocast_state(inputs[0].device.type)
        ctx.save_for_backward(*inputs)
        return module(*inputs, update_stats=True)  # forward of a Function records no graph

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[2:]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needs)]
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            out = ctx.module(*inputs, update_stats=False)
        wrt = [t for t, need in zip([*inputs, *ctx.params], needs) if need]
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in needs])


def recompute_in_backward(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """module(*inputs) whose intermediate tensors are recomputed in backward instead of saved."""
    params = [p for p in module.parameters() if p.requires_grad]
    return _Recompute.apply(module, len(inputs), *inputs, *params)
