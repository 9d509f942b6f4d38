"""The FLOP-count contract (common/inspect/flops.py): an op counts its formula, not its implementation, forward
and backward, with unchanged outputs and gradients; nothing changes outside a counter; SDPA counts on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from common.inspect.flops import active_counters, counted_op

def _matmul_macs(x, w, scale=1.0):
    return x.shape[0] * x.shape[1] * w.shape[1]


@counted_op("test_wasteful_matmul", macs=_matmul_macs)
def wasteful_matmul(x, w, scale=1.0):
    """x @ w, computed twice over (an implementation that does more than the math)."""
    return (x @ w + x @ w) * (scale / 2)


def by_op(counter: FlopCounterMode) -> dict[str, int]:
    return {str(op).split(".")[-1]: flops for op, flops in counter.get_flop_counts()["Global"].items()}


def test_forward_counts_the_formula_not_the_implementation():
    x, w = torch.randn(4, 5), torch.randn(5, 6)
    with FlopCounterMode(display=False) as counter:
        out = wasteful_matmul(x, w, scale=3.0)
    assert by_op(counter) == {"test_wasteful_matmul": 2 * 4 * 5 * 6}
    torch.testing.assert_close(out, 3.0 * (x @ w))


def test_backward_counts_twice_the_forward_and_gradients_are_the_ops_own():
    x, w = torch.randn(4, 5, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        wasteful_matmul(x, w).pow(2).sum().backward()
    assert by_op(counter) == {"test_wasteful_matmul": 240, "test_wasteful_matmul_backward": 480}
    counted = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    wasteful_matmul(x, w).pow(2).sum().backward()
    torch.testing.assert_close(counted, (x.grad, w.grad))


def test_gradient_only_for_the_inputs_that_need_one():
    x, w = torch.randn(4, 5, requires_grad=True), torch.randn(5, 6)
    with FlopCounterMode(display=False):
        wasteful_matmul(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


def test_work_around_the_op_is_still_counted_and_attributed_to_modules():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(5, 5, bias=False)
            self.w = torch.nn.Parameter(torch.randn(5, 6))

        def forward(self, x):
            return wasteful_matmul(self.proj(x), self.w)

    with FlopCounterMode(display=False) as counter:
        Net()(torch.randn(4, 5))
    counts = counter.get_flop_counts()
    assert counter.get_total_flops() == 2 * 4 * 5 * 5 + 240
    assert sum(counts["Net"].values()) == counter.get_total_flops()


def test_outside_a_counter_the_op_runs_as_itself_and_the_formula_is_not_evaluated():
    @counted_op("test_uncounted", macs=lambda x: 1 / 0)
    def double(x):
        return 2 * x

    assert active_counters() == []
    torch.testing.assert_close(double(torch.ones(3)), torch.full((3,), 2.0))
    assert double.macs is not None and double.__name__ == "double"


def test_nested_counters_both_count_the_formula():
    x, w = torch.randn(4, 5), torch.randn(5, 6)
    with FlopCounterMode(display=False) as outer:
        with FlopCounterMode(display=False) as inner:
            wasteful_matmul(x, w)
    assert outer.get_total_flops() == inner.get_total_flops() == 240


def test_counts_on_meta_tensors_without_computing():
    x, w = torch.empty(4, 5, device="meta"), torch.empty(5, 6, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = wasteful_matmul(x, w)
    assert out.device.type == "meta" and counter.get_total_flops() == 240


def test_torch_compile_traces_the_op_in_one_graph():
    compiled = torch.compile(lambda x, w: wasteful_matmul(x, w).relu(), backend="eager", fullgraph=True)
    x, w = torch.randn(4, 5), torch.randn(5, 6)
    torch.testing.assert_close(compiled(x, w), (x @ w).relu())


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_counts_torchs_formula_on_the_cpu(mask):
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    attn_mask = ~torch.eye(16, dtype=torch.bool) if mask else None
    with FlopCounterMode(display=False) as counter:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    forward = sdpa_flop_count(q.shape, k.shape, v.shape)
    assert counter.get_total_flops() == forward == 2 * 2 * (2 * 3 * 16 * 16 * 8)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    # torch's formula for fused kernels: the four products of the backward and the recomputed q k^T
    assert counter.get_total_flops() == sdpa_backward_flop_count(q.shape, q.shape, k.shape, v.shape) == 2.5 * forward
