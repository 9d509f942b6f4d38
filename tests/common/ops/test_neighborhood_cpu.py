"""The fused CPU kernel ("fused_cpu"): what the shared backend tests in test_neighborhood.py do not cover --
that it is built wherever a compiler exists, kernel sizes 1 and 13, head widths around its channel groups,
row widths around the vector widths, query rows computed together, padding that reads as zero whatever the
heap held before, a window_mask without gradient (whose zero columns the kernel skips), the gradients of any
subset of the inputs, differentiable once (its autograd is C++), fp16/bf16 computed in fp32, a deterministic
backward whatever the thread count, torch's thread count, fork safety of its threads, tracing by torch.compile,
and the fallback to "tiled" (one warning) where it cannot be built."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common.ops import jit_build, neighborhood_cpu
from common.ops import neighborhood as nb
from tests.common.ops.test_neighborhood import HEADS, VARIANTS, D, assert_all_close, make_inputs, run

ROOT = Path(__file__).resolve().parents[3]


def _has_compiler() -> bool:
    try:
        jit_build.find_compiler()
        return True
    except jit_build.BuildError:
        return False


@pytest.fixture(scope="module")
def fused():
    if not _has_compiler():
        pytest.skip("no C++ compiler: the fused kernel falls back to tiled (tested below)")
    assert neighborhood_cpu.ensure_built(), neighborhood_cpu.problem()
    return "fused_cpu"


def test_built_wherever_a_compiler_exists(fused):
    q = torch.zeros(1, 1, 3, 3, 2)
    assert nb.select_backend(q, True) == "fused_cpu" and neighborhood_cpu.problem() is None


def exact(inputs):
    """The same inputs in float64, for an oracle free of float32 round-off."""
    return [None if t is None else t.detach().double().requires_grad_() for t in inputs]


@pytest.mark.parametrize("kernel", [1, 13])
@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_kernel_sizes_1_and_13(fused, kernel, border):
    # With one offset the renormalised weight is 1 whatever the mask, so the mask's gradient is exactly 0; the
    # float32 reference leaves round-off of 1e-5 there, hence the float64 oracle.
    for rel, mask in VARIANTS:
        inputs = make_inputs(9, 14, kernel, rel, mask)
        want = [t.float() for t in run("reference", exact(inputs), kernel, border, weights_grad=True)]
        assert_all_close(run(fused, inputs, kernel, border, weights_grad=True), want, atol=1e-5, rtol=1e-5)


def test_forward_and_backward_agree_bitwise_on_the_logits(fused):
    """With one window offset the weight is 1 (or 0 under a zero mask), so the gradients of q, k, rel_pos and the
    mask are exactly 0 -- if the backward pass recomputes the forward's logits bitwise, as P = exp(s - max) then
    is exactly 1, whichever of its loops (one row, rows together) computed them in either pass: a single plane
    (the forward splits it into bands of rows), and a mask with a zero head (the forward skips its columns)."""
    gen = torch.Generator().manual_seed(0)
    for batch, mask in ((1, torch.tensor([0.5, 0.7])), (3, torch.tensor([0.0, 0.7]))):
        q, k, v = (torch.randn(batch, 2, 9, 16, 8, generator=gen, requires_grad=True) for _ in range(3))
        rel_pos = torch.randn(2, 1, 1, 8, generator=gen, requires_grad=True)
        window_mask = mask.view(2, 1, 1).requires_grad_()
        out = nb.neighborhood_attention(q, k, v, 1, rel_pos=rel_pos, window_mask=window_mask, backend=fused)
        grads = torch.autograd.grad(out, (q, k, rel_pos, window_mask), torch.randn(out.shape, generator=gen))
        assert all(torch.count_nonzero(g) == 0 for g in grads)


def head_inputs(d, dv, kernel=5):
    """q, k (logits of order 1 whatever d), v, a per-head rel_pos and a window_mask, all requiring grad."""
    gen = torch.Generator().manual_seed(d)
    q, k = (torch.randn(2, 2, 7, 11, d, generator=gen) * 1.5 * d ** -0.5 for _ in range(2))
    v = torch.randn(2, 2, 7, 11, dv, generator=gen)
    rel_pos = torch.randn(2, kernel, kernel, d, generator=gen) * 0.5 * d ** -0.5
    mask = torch.rand(2, kernel, kernel, generator=gen) * 0.9 + 0.1
    mask[0, 0, :] = 0.0
    return [t.requires_grad_() for t in (q, k, v, rel_pos, mask)]


@pytest.mark.parametrize("d, dv", [(1, 1), (2, 5), (3, 3), (9, 9), (17, 4), (32, 32), (64, 64)])
def test_any_head_width(fused, d, dv):
    """The kernel works on groups of 8 channels; widths below, at and past a group, and of q.k != of v."""
    inputs = head_inputs(d, dv)
    for border in ("mask", "zeros"):
        want = [t.float() for t in run("reference", exact(inputs), 5, border, weights_grad=True)]
        assert_all_close(run(fused, inputs, 5, border, weights_grad=True), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [3, 5, 7, 9, 13])
def test_window_mask_without_gradient(fused, kernel):
    """A fixed mask (inference, a frozen span): the kernel then skips the mask's zero columns and rows, also where
    neighbouring window rows keep different columns (the backward gathers two key rows at once, over both rows'
    columns)."""
    for rel in (None, "shared", "per_head"):
        q, k, v, rel_pos, mask = make_inputs(9, 13, kernel, rel, True)
        mask = mask.detach().clone()
        mask[0, :, :2] = 0.0
        mask[0, 1, -2:] = 0.0
        mask[1, -1, :] = 0.0
        mask[1, :, kernel // 2 + 1:] = 0.0
        wrt = [t for t in (q, k, v, rel_pos) if t is not None]
        for border in ("mask", "zeros"):
            results = []
            for backend in (fused, "reference"):
                out, weights = nb.neighborhood_attention(q, k, v, kernel, rel_pos=rel_pos, window_mask=mask,
                                                         border=border, backend=backend, return_weights=True)
                gen = torch.Generator().manual_seed(1)
                loss = (out * torch.randn(out.shape, generator=gen)).sum() + (
                    weights * torch.randn(weights.shape, generator=gen)).sum()
                results.append([out, weights, *torch.autograd.grad(loss, wrt)])
            assert_all_close(*results, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rel, mask", [(None, True), ("shared", False), ("per_head", True)])
def test_gradients_of_any_subset_of_the_inputs(fused, rel, mask):
    """Autograd (in C++) asks the kernel only for the gradients wanted, and maps each to its input whichever of
    the optional rel_pos and window_mask are given; every single input alone, and all but one."""
    inputs = [t.detach() if t is not None else None for t in make_inputs(6, 9, 5, rel, mask)]
    given = [i for i, t in enumerate(inputs) if t is not None]
    subsets = [[i] for i in given] + [[j for j in given if j != i] for i in given]
    for wanted in subsets:
        results = []
        for backend in (fused, "reference"):
            tensors = [t.clone().requires_grad_(i in wanted) if t is not None else None for i, t in enumerate(inputs)]
            q, k, v, rel_pos, window_mask = tensors
            out, weights = nb.neighborhood_attention(q, k, v, 5, rel_pos=rel_pos, window_mask=window_mask,
                                                     backend=backend, return_weights=True)
            loss = (out * out).sum() + (weights * weights).sum()
            results.append([out, weights, *torch.autograd.grad(loss, [tensors[i] for i in wanted])])
        assert_all_close(*results, atol=1e-5, rtol=1e-5)


def test_differentiable_once(fused):
    """create_graph=True gives the first gradients (other terms of the loss may need a graph), and differentiating
    through them raises, as a Python once_differentiable function does, rather than returning a wrong zero."""
    q, k, v, rel_pos, _ = make_inputs(5, 6, 3, "shared")
    out = nb.neighborhood_attention(q, k, v, 3, rel_pos=rel_pos, backend=fused)
    want = torch.autograd.grad(nb.reference_attention(q, k, v, 3, rel_pos=rel_pos).sum(), (q, k, v, rel_pos))
    grads = torch.autograd.grad(out.sum(), (q, k, v, rel_pos), create_graph=True)
    assert_all_close(list(grads), list(want), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grads[0].square().sum().backward()


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_half_precision_is_computed_in_float32(fused, dtype, ulp):
    """fp16/bf16 inputs: the output, the weights and every gradient are the exact result (float64 on the same
    low-precision inputs and output gradients) within one unit in the last place of the dtype -- what an fp32
    computation rounded once gives; sums accumulated in the low dtype would be off by several units."""

    def forward_backward(backend, inputs, border):
        q, k, v, rel_pos, mask = inputs
        out, weights = nb.neighborhood_attention(q, k, v, 5, rel_pos=rel_pos, window_mask=mask, border=border,
                                                 backend=backend, return_weights=True)
        gen = torch.Generator().manual_seed(1)  # coefficients representable in the low dtype
        grad_out = torch.randn(out.shape, generator=gen).to(dtype).to(out.dtype)
        grad_weights = torch.randn(weights.shape, generator=gen).to(dtype).to(out.dtype)
        loss = (out * grad_out).sum() + (weights * grad_weights).sum()
        return [out, weights, *torch.autograd.grad(loss, [t for t in inputs if t is not None])]

    for rel, mask in [(None, False), ("shared", True), ("per_head", True)]:
        low = [None if t is None else t.detach().to(dtype).requires_grad_() for t in make_inputs(9, 13, 5, rel, mask)]
        for border in ("mask", "zeros"):
            got = forward_backward(fused, low, border)
            assert all(t.dtype == dtype for t in got)
            want = forward_backward("reference", exact(low), border)
            assert_all_close([t.double() for t in got], want, atol=1e-5, rtol=ulp)


# with 16-float vectors: a half vector (4, 8), one vector (9, 16), one and a half (17, 24), two (25), two and a
# half (33, 40: a pair then a half), three and a half (56: a pair, a single one, a half)
@pytest.mark.parametrize("width", [4, 8, 9, 16, 17, 24, 25, 33, 40, 56])
def test_row_widths_around_the_vector_widths(fused, width):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        for border in ("mask", "zeros"):
            inputs = make_inputs(5, width, 5, "per_head", True, dtype=dtype)
            assert_all_close(run(fused, inputs, 5, border, weights_grad=True),
                             run("reference", inputs, 5, border, weights_grad=True), atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", [3, 7, 11])
def test_rows_computed_together(fused, kernel):
    """The kernel computes up to three query rows at once (the windows of rows at the top and bottom cut short for
    border="mask"), and its backward ring holds one more row for each. Heights whose rows end in a group of three,
    two or one, and windows taller than the image; a window_mask with its gradient, and a fixed one without
    zeros, with which the rows are grouped too (a fixed mask with zero columns is
    test_window_mask_without_gradient's)."""
    r = kernel // 2
    for height in sorted({1, 2, 2 * r, 2 * r + 1, 2 * r + 2, 2 * r + 3, 2 * r + 4, 2 * r + 9}):
        inputs = make_inputs(height, 19, kernel, "per_head", True, dtype=torch.float64)
        fixed = [*inputs[:4], (inputs[4].detach() + 0.1).clamp_max(1.0)]
        for border in ("mask", "zeros"):
            for variant in (inputs, fixed):
                assert_all_close(run(fused, variant, kernel, border, weights_grad=True),
                                 run("reference", variant, kernel, border, weights_grad=True), atol=1e-10, rtol=1e-10)


def test_padding_reads_as_zero_after_other_calls_dirtied_the_heap(fused):
    # The kernel copies only the image into its padded planes and relies on their halo being zeroed when they
    # are allocated. Calls of other geometries with large values leave such values where a later call's
    # buffers are carved from (glibc reuses the freed chunks on one thread: conftest's one_thread), so a halo
    # that is not zeroed shows up as keys and values of 1e3 for border="zeros" (forward) and in the gathers
    # (backward).
    for _ in range(3):
        for h, w in ((9, 9), (11, 7), (7, 11)):
            big = torch.full((1, HEADS, h, w, D), 1e3, requires_grad=True)
            out = nb.neighborhood_attention(big, big, big, 5, border="zeros", backend=fused)
            torch.autograd.grad(out.sum(), big)
        inputs = make_inputs(7, 7, 5, "shared")
        assert_all_close(run(fused, inputs, 5, "zeros"), run("reference", inputs, 5, "zeros"), atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic_whatever_the_thread_count(fused):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 11, 19, 8, generator=gen, requires_grad=True) for _ in range(3))
    rel = torch.randn(4, 7, 7, 8, generator=gen, requires_grad=True)
    mask = torch.rand(4, 7, 7, generator=gen, requires_grad=True)
    grad = torch.randn(3, 4, 11, 19, 8, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2, 3):
            torch.set_num_threads(count)
            out = nb.neighborhood_attention(q, k, v, 7, rel_pos=rel, window_mask=mask, backend=fused)
            results.append([out, *torch.autograd.grad(out, (q, k, v, rel, mask), grad)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_thread_count_is_torchs(tmp_path):
    """The kernel's pool grows to torch.get_num_threads() - 1 workers (the caller is the other), counted as the
    process's threads before and after a call, in a fresh process whose OpenMP team is already started."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("counts threads through /proc")
    if not _has_compiler():
        pytest.skip("no C++ compiler")
    script = textwrap.dedent("""
        import os
        import torch
        from common.ops import neighborhood as nb
        torch.set_num_threads(1)
        x = torch.ones(3, requires_grad=True)
        (x * 2).sum().backward()  # autograd's own threads, if any
        q, k, v = (torch.randn(2, 3, 9, 21, 4, requires_grad=True) for _ in range(3))
        nb.neighborhood_attention(q, k, v, 3, backend="fused_cpu")  # build, load and self-check
        new = []
        for count in (1, 3, 4):
            torch.set_num_threads(count)
            torch.ones(1 << 22).add_(1).sum()  # OpenMP starts (or grows) its team at this size
            before = len(os.listdir("/proc/self/task"))
            nb.neighborhood_attention(q, k, v, 3, backend="fused_cpu").sum().backward()
            new.append(len(os.listdir("/proc/self/task")) - before)
        print(nb.neighborhood_cpu.problem(), new)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None [0, 2, 1]"


def _child_runs_the_kernel(queue):
    torch.set_num_threads(2)
    q, k, v, rel_pos, mask = make_inputs(8, 9, 5, "shared", True)
    out = nb.neighborhood_attention(q, k, v, 5, rel_pos=rel_pos, window_mask=mask, backend="fused_cpu")
    out.sum().backward()
    queue.put(bool(torch.isfinite(q.grad).all()))


def test_its_threads_survive_fork(fused):
    """A DataLoader worker is a fork of a process whose kernel threads exist only in the parent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v, _, _ = make_inputs(8, 9, 5)
        nb.neighborhood_attention(q, k, v, 5, backend=fused).sum().backward()  # starts the worker threads
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_runs_the_kernel, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the fused kernel")
    assert child.exitcode == 0 and queue.get(timeout=5)


def test_torch_compile_traces_through_it(fused):
    q, k, v, rel_pos, mask = make_inputs(6, 7, 5, "shared", True)

    def loss(q, k, v, rel_pos, mask):
        return nb.neighborhood_attention(q, k, v, 5, rel_pos=rel_pos, window_mask=mask, backend="fused_cpu").square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    want = loss(q, k, v, rel_pos, mask)
    got = compiled(q, k, v, rel_pos, mask)
    torch.testing.assert_close(got, want)
    inputs = [q, k, v, rel_pos, mask]
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b)


def test_self_check_catches_a_wrong_kernel(fused, monkeypatch):
    real = neighborhood_cpu.fused_attention

    def wrong(*args, **kwargs):
        out, weights = real(*args, **kwargs)
        return out * 1.01, weights

    monkeypatch.setattr(neighborhood_cpu, "fused_attention", wrong)
    assert "disagrees" in neighborhood_cpu._self_check()


def test_without_a_compiler_it_falls_back_to_tiled_with_one_warning(tmp_path):
    """A fresh process (the library is loaded once per process) with no compiler and an empty cache."""
    script = textwrap.dedent("""
        import warnings
        import torch
        from common.ops import neighborhood as nb
        warnings.simplefilter("always")
        q, k, v = (torch.randn(1, 2, 5, 6, 4) for _ in range(3))
        with warnings.catch_warnings(record=True) as caught:
            print(nb.select_backend(q, True))
            for backend in ("auto", "fused_cpu", "auto"):
                out = nb.neighborhood_attention(q, k, v, 3, backend=backend)
                torch.testing.assert_close(out, nb.reference_attention(q, k, v, 3), atol=1e-5, rtol=1e-5)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(len(messages))
        print(messages[0])
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    backend, count, message = done.stdout.strip().splitlines()[-3:]
    assert backend == "tiled" and count == "1"
    assert "no C++ compiler found" in message and "'tiled'" in message and "set CXX" in message
    assert not (tmp_path / "cache").exists()  # nothing written


def test_first_use_under_no_grad_inference_mode_or_a_flop_counter(tmp_path):
    """The build and self-check may be triggered by any first call; a fresh process makes it the first."""
    script = textwrap.dedent("""
        import warnings
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        from common.ops import neighborhood as nb
        warnings.simplefilter("error")
        q, k, v = (torch.randn(1, 2, 5, 6, 4) for _ in range(3))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            nb.neighborhood_attention(q, k, v, 3)
        print(nb.neighborhood_cpu.problem(), counter.get_total_flops() == 2 * 2 * 30 * 9 * 8)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None True"
