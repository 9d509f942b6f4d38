"""FLOPs of the math, not of the implementation: how `torch.utils.flop_counter.FlopCounterMode` counts our ops.

The counter adds up a formula per aten op, so left alone it counts what a kernel happens to do: nothing for
element-wise formulations (the neighbourhood op's `reference` backend, SAN's aggregation), 4x the useful work
for GEMMs over key halos (`tiled`), nothing for torch's fused CPU attention kernel, and the padding and one-hot
columns of AACN's fused call. Here every attention op the project defines counts by the formula in its own
docstring, the same for every backend and device.

Convention (also the README's and the `time` table's)
-----------------------------------------------------
- A MAC is one multiply-accumulate of a product that contracts a feature dimension: every convolution and
  matrix product, every attention logit (q . k, and q . r for a relative embedding: one MAC per channel), and
  every weighted sum of values (one MAC per weight and channel). FLOPs = 2 x MACs, the convention of
  torch.utils.flop_counter and of the SASA and AACN papers (SAN reports MACs).
- Not counted: element-wise work. Activations, normalisation, pooling, additions of logit terms, masks, position
  terms that depend on the offset alone, and the softmax (its exp, sum and division), as in torch's own formula
  for scaled_dot_product_attention and in the papers' tables.
- A windowed op counts its whole window for every query, also where the window reaches past the image border
  (`border="zeros"` computes those terms; `border="mask"` discards them).
- Backward: 2 x the forward MACs of each attention op (each product of the forward gives two in the backward, one
  per operand), like torch's formula for attention backward.

How
---
`counted_op(name, macs)` wraps an op function. Outside a FlopCounterMode it adds two cheap checks and nothing
else, so the hot path (eager, autograd, torch.compile) runs the op as it is. Inside one, the op runs as usual
(its outputs and gradients are unchanged; autograd goes through the op's own backward) while its internal aten
ops are kept out of the count, and a marker custom op `attention_flops::<name>` is counted instead, with the
FLOPs of `macs(*args, **kwargs)`: a torch.library custom op with a formula registered through
`torch.utils.flop_counter.register_flop_formula`, so the counter sees it like any other op (module attribution
included). Paper packages wrap their own ops here; `common` never names them.

Registration happens when the op's module is imported; FlopCounterMode snapshots the formula registry when it is
constructed, so import the models before creating the counter (`common.inspect.timing.count_macs` does). Counts
under torch.compile are the compiled graph's, not these: count in eager mode.

Importing this module also gives scaled_dot_product_attention a formula on every device: torch 2.14 has none
for its CPU flash kernel (nor the fused kernel other devices override, nor MPS's), so SDPA counted 0 on the CPU.
They get torch's own formula for the CUDA kernels (the two products q k^T and P v; backward 2x).

Like the capture contract, this module needs only torch, and every layer may import it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.utils.flop_counter as flop_counter
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

NAMESPACE = "attention_flops"

_MARKERS: dict[str, Callable[[torch.Tensor, int], None]] = {}


def _register_formula(target, formula: Callable) -> None:
    if target not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(target)(formula)


def _marker(name: str) -> Callable[[torch.Tensor, int], None]:
    """The custom op `attention_flops::<name>(anchor, flops)`: no work, counted as `flops` FLOPs.

    `anchor` is one of the op's tensors (detached), so the marker dispatches on its device and is
    attributed to the module the op runs in.
    """
    if name not in _MARKERS:
        def mark(anchor: torch.Tensor, flops: int) -> None:
            return None

        mark.__name__ = name
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mark, mutates_args=())
        op.register_fake(lambda anchor, flops: None)
        _register_formula(getattr(getattr(torch.ops, NAMESPACE), name),
                          lambda anchor_shape, flops, out_shape=None: flops)
        _MARKERS[name] = op
    return _MARKERS[name]


def active_counters() -> list[flop_counter.FlopCounterMode]:
    """The FlopCounterModes counting right now (usually none): a length check first, so it costs ~100 ns."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() == 0:
        return []
    return [mode.counter for mode in _get_current_dispatch_mode_stack()
            if isinstance(mode, flop_counter._FlopCounterMode)]


@contextlib.contextmanager
def uncounted(counters: list[flop_counter.FlopCounterMode]) -> Iterator[None]:
    """Whatever runs inside leaves the counters' figures as they were (torch does the same for `cond` branches)."""
    saved = [{module: dict(ops) for module, ops in counter.flop_counts.items()} for counter in counters]
    try:
        yield
    finally:
        for counter, counts in zip(counters, saved):
            counter.flop_counts.clear()
            for module, ops in counts.items():
                counter.flop_counts[module].update(ops)


def counted_op(name: str, macs: Callable[..., int]) -> Callable[[Callable], Callable]:
    """Decorator: under a FlopCounterMode the op counts `2 * macs(*args, **kwargs)` FLOPs in forward and twice
    that in backward, whatever its implementation does (see the module docstring). `name` must be a Python
    identifier, unique in the project; ops that compute the same function (backends of one op) may share it.
    The decorated function keeps its name, signature and docstring, and gets `.macs` (the formula)."""
    forward_marker, backward_marker = _marker(name), _marker(f"{name}_backward")

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def op(*args, **kwargs):
            counters = active_counters()
            if not counters:
                return fn(*args, **kwargs)
            return _run_counted(fn, macs, forward_marker, backward_marker, counters, args, kwargs)

        op.macs = macs
        return op

    return decorate


def _run_counted(fn, macs, forward_marker, backward_marker, counters, args, kwargs):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise TypeError(f"{fn.__qualname__}: a counted op needs at least one tensor argument")
    anchor = leaves[tensors[0]].detach()
    needs_grad = torch.is_grad_enabled() and any(leaves[i].requires_grad for i in tensors)
    if not needs_grad:
        with uncounted(counters):
            out = fn(*args, **kwargs)
        forward_marker(anchor, 2 * int(macs(*args, **kwargs)))  # after the op: its own checks speak first
        return out

    def run(inner: list[torch.Tensor]):
        filled = list(leaves)
        for i, tensor in zip(tensors, inner):
            filled[i] = tensor
        inner_args, inner_kwargs = pytree.tree_unflatten(filled, spec)
        return fn(*inner_args, **inner_kwargs)

    state = {"anchor": anchor, "marker": backward_marker}
    outputs = _WithCountedBackward.apply(run, state, *(leaves[i] for i in tensors))
    flops = 2 * int(macs(*args, **kwargs))
    state["flops"] = 2 * flops
    forward_marker(anchor, flops)
    return pytree.tree_unflatten(list(outputs), state["out_spec"])


class _WithCountedBackward(torch.autograd.Function):
    """Runs the op on detached copies of its inputs, keeping its own autograd graph, and differentiates that
    graph in backward: the op's own backward (no recomputation), kept out of the count, which gets the backward
    marker instead. Only used inside a FlopCounterMode, when an input needs a gradient."""

    @staticmethod
    def forward(ctx, run, state, *tensors):
        counters = active_counters()
        inner = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        with uncounted(counters), torch.enable_grad():
            out = run(inner)
        flat, state["out_spec"] = pytree.tree_flatten(out)
        ctx.inner, ctx.outputs, ctx.state = inner, flat, state
        return tuple(t.detach() for t in flat)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        pairs = [(out, grad) for out, grad in zip(ctx.outputs, grads) if grad is not None and out.requires_grad]
        wanted = [i for i, t in enumerate(ctx.inner) if t.requires_grad and ctx.needs_input_grad[2 + i]]
        result = [None] * len(ctx.inner)
        if pairs and wanted:
            with uncounted(active_counters()):
                found = torch.autograd.grad([o for o, _ in pairs], [ctx.inner[i] for i in wanted],
                                            [g for _, g in pairs], allow_unused=True)
            for i, grad in zip(wanted, found):
                result[i] = grad
        state = ctx.state
        state["marker"](state["anchor"], state["flops"])
        return (None, None, *result)


# --------------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention on every device


def _sdpa_formulas() -> None:
    aten = torch.ops.aten
    forward = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable",
               "_scaled_dot_product_attention_math_for_mps"]
    backward = ["_scaled_dot_product_flash_attention_for_cpu_backward",
                "_scaled_dot_product_fused_attention_overrideable_backward"]
    for names, formula in ((forward, flop_counter.sdpa_flop), (backward, flop_counter.sdpa_backward_flop)):
        for name in names:
            packet = getattr(aten, name, None)
            if packet is not None and packet not in flop_counter.flop_registry:
                # torch's formulas are already wrapped to read shapes off the tensors: register them as they are.
                flop_counter.register_flop_formula(packet, get_raw=True)(formula)


_sdpa_formulas()
