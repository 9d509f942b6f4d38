"""Neighbourhood attention: the reference against a per-pixel loop, every CPU backend against the reference
(outputs and all gradients, on a grid and on random problems), border rules, dtypes, memory saved for
backward, dispatch and input checks."""

from __future__ import annotations

import itertools
import random
import sys
import types
import warnings

import pytest
import torch

from common.inspect.memory import SavedTensors
from common.ops import neighborhood as nb
from common.ops.neighborhood import neighborhood_attention, reference_attention

CPU_BACKENDS = [name for name in nb.BACKENDS if name not in ("reference", "triton")]
B, HEADS, D = 2, 2, 4


def make_inputs(h, w, kernel, rel=None, mask=False, dtype=torch.float32, seed=0, dv=D):
    """q, k, v (B, HEADS, h, w, D), optional rel_pos (rel = "shared" | "per_head") and window_mask, all
    requiring grad. The mask has exact zeros (but never on the centre) so the renormalisation is exercised."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, HEADS, h, w, D, generator=gen, dtype=dtype) * 0.7 for _ in range(2))
    v = torch.randn(B, HEADS, h, w, dv, generator=gen, dtype=dtype)
    rel_pos = None
    if rel is not None:
        shape = (kernel, kernel, D) if rel == "shared" else (HEADS, kernel, kernel, D)
        rel_pos = torch.randn(shape, generator=gen, dtype=dtype) * 0.5
    window_mask = None
    if mask:
        window_mask = torch.rand(HEADS, kernel, kernel, generator=gen, dtype=dtype) * 0.9 + 0.1
        if kernel > 1:
            window_mask[0, 0, :] = 0.0
            window_mask[1, :, -1] = 0.0
    tensors = [q, k, v, rel_pos, window_mask]
    for t in tensors:
        if t is not None:
            t.requires_grad_()
    return tensors


def run(backend, inputs, kernel, border, weights_grad=False, seed=1):
    """Forward with return_weights, then the gradients of a random linear loss of the output (and of the
    weights with weights_grad) with respect to every input that requires grad. Returns [out, weights, grads...]."""
    q, k, v, rel_pos, window_mask = inputs
    out, weights = neighborhood_attention(q, k, v, kernel, rel_pos=rel_pos, window_mask=window_mask, border=border,
                                          backend=backend, return_weights=True)
    gen = torch.Generator().manual_seed(seed)  # the same coefficients in any dtype (drawn in float32)
    loss = (out * torch.randn(out.shape, generator=gen).to(out.dtype)).sum()
    if weights_grad:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen).to(out.dtype)).sum()
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    return [out, weights, *torch.autograd.grad(loss, wrt)]


def assert_all_close(got, want, atol, rtol=0.0):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"tensor {i}: {m}")


def brute_force(q, k, v, kernel, rel_pos, window_mask, border, b, h, i, j):
    """out and weights of pixel (i, j) of batch b, head h, by an explicit loop over the window."""
    height, width, r = q.shape[2], q.shape[3], kernel // 2
    logits, values, keep = [], [], []
    for dy, dx in itertools.product(range(-r, r + 1), range(-r, r + 1)):
        y, x = i + dy, j + dx
        inside = 0 <= y < height and 0 <= x < width
        key = k[b, h, y, x] if inside else torch.zeros_like(k[b, h, 0, 0])
        value = v[b, h, y, x] if inside else torch.zeros_like(v[b, h, 0, 0])
        if rel_pos is not None:
            key = key + (rel_pos[dy + r, dx + r] if rel_pos.dim() == 3 else rel_pos[h, dy + r, dx + r])
        logits.append(torch.dot(q[b, h, i, j], key))
        values.append(value)
        keep.append(inside or border == "zeros")
    logits = torch.stack(logits).masked_fill(~torch.tensor(keep), float("-inf"))
    weights = logits.softmax(0)
    if window_mask is not None:
        weights = weights * window_mask[h].reshape(-1)
        weights = weights / weights.sum()
    return weights @ torch.stack(values), weights


# ---------------------------------------------------------------------------------------------------------------
# The reference is the oracle: check it against the definition, pixel by pixel.

@pytest.mark.parametrize("border", ["mask", "zeros"])
@pytest.mark.parametrize("rel,mask", [(None, False), ("shared", False), ("per_head", True)])
@pytest.mark.parametrize("h,w,kernel", [(7, 5, 3), (6, 9, 5), (3, 3, 5)])
def test_reference_matches_brute_force(h, w, kernel, rel, mask, border):
    q, k, v, rel_pos, window_mask = (t.detach() if t is not None else None
                                     for t in make_inputs(h, w, kernel, rel, mask, dtype=torch.float64))
    out, weights = reference_attention(q, k, v, kernel, rel_pos, window_mask, border, return_weights=True)
    pixels = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (1, min(2, w - 1))]
    for b, head, (i, j) in itertools.product(range(B), range(HEADS), pixels):
        want_out, want_weights = brute_force(q, k, v, kernel, rel_pos, window_mask, border, b, head, i, j)
        torch.testing.assert_close(out[b, head, i, j], want_out, atol=1e-12, rtol=0)
        torch.testing.assert_close(weights[b, head, i, j], want_weights, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Every CPU backend against the reference: outputs, weights and all gradients.

SIZES = [(7, 5), (9, 13), (3, 3), (1, 6)]
VARIANTS = [(None, False), ("shared", False), ("per_head", False), (None, True), ("shared", True),
            ("per_head", True)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("border", ["mask", "zeros"])
@pytest.mark.parametrize("kernel", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("h,w", SIZES)
def test_backend_matches_reference_fp32(backend, h, w, kernel, border):
    for rel, mask in VARIANTS:
        inputs = make_inputs(h, w, kernel, rel, mask)
        assert_all_close(run(backend, inputs, kernel, border), run("reference", inputs, kernel, border),
                         atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("border", ["mask", "zeros"])
@pytest.mark.parametrize("h,w,kernel", [(7, 5, 3), (9, 13, 5), (3, 3, 5), (10, 17, 7), (5, 4, 11)])
def test_backend_matches_reference_fp64_with_weight_grads(backend, h, w, kernel, border):
    for rel, mask in VARIANTS:
        inputs = make_inputs(h, w, kernel, rel, mask, dtype=torch.float64)
        assert_all_close(run(backend, inputs, kernel, border, weights_grad=True),
                         run("reference", inputs, kernel, border, weights_grad=True), atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_through_weights_only(backend):
    inputs = make_inputs(6, 7, 5, "per_head", True, dtype=torch.float64)
    grads = []
    for name in (backend, "reference"):
        _, weights = neighborhood_attention(*inputs[:3], 5, rel_pos=inputs[3], window_mask=inputs[4],
                                            backend=name, return_weights=True)
        got = torch.autograd.grad((weights * weights).sum(), inputs, allow_unused=True)
        grads.append([torch.zeros_like(t) if g is None else g for t, g in zip(inputs, got)])
    assert_all_close(grads[0], grads[1], atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_value_width_may_differ(backend):
    inputs = make_inputs(9, 6, 5, "shared", True, dtype=torch.float64, dv=3)
    assert_all_close(run(backend, inputs, 5, "mask"), run("reference", inputs, 5, "mask"), atol=1e-10)


@pytest.mark.parametrize("tile", [1, 2, 3, (2, 5), 16])
def test_tiled_any_tile_size(tile):
    inputs = make_inputs(11, 10, 5, "per_head", True, dtype=torch.float64)
    q, k, v, rel_pos, window_mask = inputs

    def tiled(*args, **kwargs):
        return nb.tiled_attention(*args, **kwargs, tile=tile)

    nb.register_backend("tiled_test", tiled)
    try:
        got = run("tiled_test", inputs, 5, "mask", weights_grad=True)
    finally:
        del nb.BACKENDS["tiled_test"]
    assert_all_close(got, run("reference", inputs, 5, "mask", weights_grad=True), atol=1e-10)


@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_tiled_batch_chunks(monkeypatch, border):
    """On the CPU the batch is processed in cache-sized chunks; force one image per chunk."""
    monkeypatch.setattr(nb, "CHUNK_BYTES", 1)
    for rel, mask in VARIANTS:
        inputs = make_inputs(7, 9, 5, rel, mask, dtype=torch.float64)
        assert_all_close(run("tiled", inputs, 5, border, weights_grad=True),
                         run("reference", inputs, 5, border, weights_grad=True), atol=1e-10)


def test_tiled_fold_paths_agree():
    """The CPU fold (index_add_) and the one used on other devices (strided adds) are the same map."""
    for shape, kernel, tile in [((2, 3, 9, 13, 4), 5, 4), ((1, 2, 8, 8, 3), 7, 8), ((1, 1, 3, 2, 2), 11, None)]:
        g = nb._Tiling(shape, kernel, tile)
        x = torch.randn(2, g.n, g.halo2, 5, dtype=torch.float64)
        torch.testing.assert_close(g._fold_index_add(x), g._fold_pieces(x), atol=1e-12, rtol=0)
        # and it is the adjoint of `halos`: <halos(y), x> == <y, fold(x)>
        y = torch.randn(2, *shape[:4], 5, dtype=torch.float64)
        lhs = (g.halos([y[0], y[1]], torch.float64) * x).sum()
        torch.testing.assert_close(lhs, (y * g.fold_halos(x)).sum(), atol=1e-9, rtol=0)


def test_tiled_workspace_reuse_across_shapes():
    """The per-thread scratch matrices are reused; alternating geometries must not leak stale entries."""
    cases = [(8, 8, 3), (9, 7, 5), (8, 8, 5), (8, 8, 3), (4, 12, 7), (9, 7, 5)]
    for h, w, kernel in cases:
        inputs = make_inputs(h, w, kernel, "shared", False)
        assert_all_close(run("tiled", inputs, kernel, "mask"), run("reference", inputs, kernel, "mask"), atol=1e-5,
                         rtol=1e-5)
    nb.release_workspace()
    inputs = make_inputs(5, 5, 3, None, False)
    assert_all_close(run("tiled", inputs, 3, "zeros"), run("reference", inputs, 3, "zeros"), atol=1e-5, rtol=1e-5)


def test_tiled_trains_after_an_inference_mode_call():
    """The scratch matrices a call under torch.inference_mode allocates are reused by training calls after it
    (the time task interleaves them): they must be ordinary tensors, writable outside inference mode."""
    nb.release_workspace()
    inputs = make_inputs(8, 8, 3, "shared", False)
    with torch.inference_mode():
        neighborhood_attention(*(t.detach() for t in inputs[:3]), 3, backend="tiled")
    assert_all_close(run("tiled", inputs, 3, "mask"), run("reference", inputs, 3, "mask"), atol=1e-5, rtol=1e-5)


def draw_problem(rng: random.Random) -> dict:
    """A random problem: odd sizes (maps of one pixel, heads of one channel, value widths unlike the key width,
    windows larger than the map), the three input layouts layers produce, shared and per-head embeddings, masks
    with exact zeros (whole heads emptied too), both borders, with or without the weights' own gradient."""
    d = rng.choice([1, 2, 3, 5, 8, 17])
    return dict(batch=rng.choice([1, 2]), heads=rng.choice([1, 2, 3]), d=d, dv=rng.choice([d, 1, 4]),
                h=rng.randint(1, 9), w=rng.randint(1, 19), kernel=rng.choice([1, 3, 5, 7, 13]),
                border=rng.choice(["mask", "zeros"]), layout=rng.choice(["contiguous", "channel_major", "strided"]),
                rel=rng.choice([None, "shared", "per_head"]), mask=rng.choice([None, "zeros", "empty_head"]),
                weights_grad=rng.random() < 0.5)


def problem_inputs(case: dict, gen: torch.Generator):
    """fp64 q, k, v, rel_pos, window_mask of a `draw_problem` case, all requiring grad."""
    b, heads, h, w, k = case["batch"], case["heads"], case["h"], case["w"], case["kernel"]

    def tensor(c):
        if case["layout"] == "contiguous":
            return torch.randn(b, heads, h, w, c, generator=gen, dtype=torch.float64)
        if case["layout"] == "channel_major":  # a convolution output split into heads
            return torch.randn(b, heads, c, h, w, generator=gen, dtype=torch.float64).permute(0, 1, 3, 4, 2)
        # every other pixel, and one channel more than used
        return torch.randn(b, heads, h, 2 * w, c + 1, generator=gen, dtype=torch.float64)[:, :, :, ::2, :c]

    q, key, v = tensor(case["d"]), tensor(case["d"]), tensor(case["dv"])
    rel = {None: None, "shared": (k, k, case["d"]), "per_head": (heads, k, k, case["d"])}[case["rel"]]
    rel = None if rel is None else torch.randn(rel, generator=gen, dtype=torch.float64)
    mask = None
    if case["mask"] is not None:
        mask = torch.rand(heads, k, k, generator=gen, dtype=torch.float64)
        mask[mask < 0.3] = 0.0
        if case["mask"] == "empty_head":
            mask[0] = 0.0
    inputs = [q, key, v, rel, mask]
    for t in inputs:
        if t is not None:
            t.requires_grad_()
    return inputs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_problems_match_the_reference(backend):
    """40 drawn problems per backend, fp64, so that any difference is a bug, not rounding."""
    rng = random.Random(17)
    for index in range(40):
        case = draw_problem(rng)
        inputs = problem_inputs(case, torch.Generator().manual_seed(index))
        args = (inputs, case["kernel"], case["border"], case["weights_grad"], 1000 + index)
        names = ["out", "weights"] + [name for name, t in zip(("dq", "dk", "dv", "d rel_pos", "d window_mask"), inputs)
                                      if t is not None]
        for name, got, want in zip(names, run(backend, *args), run("reference", *args)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10,
                                       msg=lambda m: f"case {index} {case}, {name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# Border rule and weights.

@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_mask_border_gives_no_weight_outside_and_weights_sum_to_one(backend):
    h, w, kernel = 6, 9, 5
    q, k, v, rel_pos, window_mask = make_inputs(h, w, kernel, "shared", True)
    for mask in (None, window_mask):
        _, weights = neighborhood_attention(q, k, v, kernel, rel_pos=rel_pos, window_mask=mask, border="mask",
                                            backend=backend, return_weights=True)
        outside = ~nb.inside_image(h, w, kernel)
        assert weights.shape == (B, HEADS, h, w, kernel * kernel)
        assert torch.all(weights[..., outside] == 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(B, HEADS, h, w), atol=1e-6, rtol=0)
    # border="zeros": out-of-image neighbours do get weight, and the weights still sum to one
    _, weights = neighborhood_attention(q, k, v, kernel, rel_pos=rel_pos, border="zeros", backend=backend,
                                        return_weights=True)
    assert torch.all(weights[..., ~nb.inside_image(h, w, kernel)] > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, HEADS, h, w), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_window_gives_zero_output_without_nan(backend):
    q, k, v, rel_pos, _ = make_inputs(5, 6, 3, "shared", False)
    window_mask = torch.ones(HEADS, 3, 3)
    window_mask[1] = 0.0  # head 1 keeps nothing
    out = neighborhood_attention(q, k, v, 3, rel_pos=rel_pos, window_mask=window_mask, backend=backend)
    torch.testing.assert_close(out, reference_attention(q, k, v, 3, rel_pos, window_mask), atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, 1] == 0)
    grads = torch.autograd.grad(out.sum(), [q, k, v, rel_pos])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_window_emptied_by_mask_and_border_has_finite_gradients(backend):
    """Head 0 keeps only the right column of its window, which the border removes at the image's right edge:
    those windows have no weight at all (the reference once divided by a tiny clamp there: inf * 0 = nan)."""
    inputs = make_inputs(5, 6, 3, "shared", True)
    with torch.no_grad():
        inputs[4][0, :, :2] = 0.0
    out, weights, *grads = run(backend, inputs, 3, "mask", weights_grad=True)
    assert torch.all(out[:, 0, :, -1] == 0) and torch.all(weights[:, 0, :, -1] == 0)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel", [1, 3])
def test_emptied_windows_pass_no_gradient_and_every_backend_agrees(backend, kernel):
    """An emptied window is the constant 0, so it adds nothing to any gradient, the mask's included (the
    renormalisation is 0/0 there: the reference once gave the mask softmax * dP, the fused backends 0).
    Head 0's mask is all zeros; with k=3 head 1 also loses the centre column, emptying no window."""
    inputs = make_inputs(5, 6, kernel, "per_head", True, dtype=torch.float64)
    with torch.no_grad():
        inputs[4][0] = 0.0
        inputs[4][1] = 0.5
        if kernel > 1:
            inputs[4][1, :, 1] = 0.0
    want = run("reference", inputs, kernel, "mask", weights_grad=True)
    assert_all_close(run(backend, inputs, kernel, "mask", weights_grad=True), want, atol=1e-10)
    out, weights, grad_mask = want[0], want[1], want[-1]
    assert torch.all(out[:, 0] == 0) and torch.all(weights[:, 0] == 0)
    assert torch.all(grad_mask[0] == 0)
    if kernel == 1:  # one offset: the renormalised weight is 1 for any positive mask, so no gradient either
        assert torch.all(grad_mask == 0)
    else:
        assert grad_mask[1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Dtypes and layouts.

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_close_to_fp32(backend, dtype):
    inputs = make_inputs(9, 7, 5, "shared", True)
    q, k, v, rel_pos, window_mask = (t.detach() for t in inputs)
    want = reference_attention(q, k, v, 5, rel_pos, window_mask)
    low = [t.to(dtype) for t in (q, k, v, rel_pos, window_mask)]
    for t in low:
        t.requires_grad_()
    got = neighborhood_attention(*low[:3], 5, rel_pos=low[3], window_mask=low[4], backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(got.float().sum(), low)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    """Layers pass permuted views of (B, heads*d, H, W) convolution outputs."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, 3 * HEADS * D, 7, 9, generator=gen, requires_grad=True)
    rel_pos = torch.randn(D, 5, 5, generator=gen).permute(1, 2, 0).requires_grad_()  # also a permuted view

    def split(t):
        q, k, v = t.view(B, 3, HEADS, D, 7, 9).permute(1, 0, 2, 4, 5, 3)
        assert not q.is_contiguous()
        return q, k, v

    span = torch.rand(1, 5, 5, generator=gen).requires_grad_()  # a mask shared by the heads, as an expand
    results = []
    for name in (backend, "reference"):
        out = neighborhood_attention(*split(x), 5, rel_pos=rel_pos, window_mask=span.expand(HEADS, 5, 5),
                                     backend=name)
        results.append([out, *torch.autograd.grad((out * out).sum(), [x, rel_pos, span])])
    assert_all_close(results[0], results[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Memory saved for backward (bytes, not time).

def saved_bytes(fn) -> int:
    with SavedTensors() as saved:
        out = fn()
    del out
    return saved.bytes


def test_tiled_saves_far_less_than_reference_for_backward():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 16, 8, generator=gen, requires_grad=True) for _ in range(3))
    rel_pos = torch.randn(7, 7, 8, generator=gen, requires_grad=True)

    def call(backend):
        return lambda: neighborhood_attention(q, k, v, 7, rel_pos=rel_pos, backend=backend)

    reference, tiled = saved_bytes(call("reference")), saved_bytes(call("tiled"))
    assert tiled <= reference / 4
    # nothing of size B*heads*H*W*k*k*d: at most q, k, v, rel_pos and one value per query and offset
    q_bytes = q.numel() * q.element_size()
    assert tiled <= 3 * q_bytes + rel_pos.numel() * 4 + q.numel() // 8 * 49 * 4 * 1.1


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and input checks.

@pytest.mark.parametrize("built, expected", [(True, "fused_cpu"), (False, "tiled")])
def test_auto_on_cpu_uses_the_fused_kernel_when_it_is_built_else_tiled(monkeypatch, built, expected):
    monkeypatch.setattr(nb.neighborhood_cpu, "ensure_built", lambda warn=True: built)
    q, k, v, _, _ = make_inputs(5, 5, 3)
    assert nb.select_backend(q, True) == expected and nb.select_backend(q, False) == expected
    calls = []
    monkeypatch.setitem(nb.BACKENDS, expected, lambda *a, **kw: calls.append(1) or reference_attention(*a, **kw))
    neighborhood_attention(q, k, v, 3)
    with torch.no_grad():
        neighborhood_attention(q, k, v, 3)
    assert calls == [1, 1]


class _FakeCuda:
    """Stands in for a CUDA tensor in select_backend (only .device and .dtype are read)."""
    device = torch.device("cuda")

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype


def _fake_triton(available=True, supports=None):
    module = types.ModuleType("common.ops.neighborhood_triton")
    module.available = lambda: available
    module.triton_attention = lambda *a, **kw: "triton-called"
    if supports is not None:
        module.supports = supports
    return module


@pytest.fixture
def triton_slot(monkeypatch):
    """A clean slate for the lazy Triton registration, restored afterwards."""
    monkeypatch.setattr(nb, "_TRITON", {"tried": False, "supports": None})
    monkeypatch.setattr(nb, "_triton_verified", lambda device: True)  # the fakes cannot run a self-check
    monkeypatch.delitem(nb.BACKENDS, "triton", raising=False)
    yield lambda module: monkeypatch.setitem(sys.modules, "common.ops.neighborhood_triton", module)
    nb.BACKENDS.pop("triton", None)


def test_triton_registered_lazily_for_cuda(triton_slot):
    triton_slot(_fake_triton())
    assert "triton" not in nb.BACKENDS
    assert nb.select_backend(torch.zeros(1), True) != "triton"  # CPU tensors never trigger the import
    assert not nb._TRITON["tried"]
    assert nb.select_backend(_FakeCuda(), True) == "triton"
    assert nb.BACKENDS["triton"]() == "triton-called"
    assert nb.select_backend(_FakeCuda(torch.bfloat16), True) == "triton"
    assert nb.select_backend(_FakeCuda(torch.float64), True) == "tiled"  # the kernels take no fp64


def test_triton_unavailable_or_missing_falls_back_to_tiled(triton_slot):
    triton_slot(_fake_triton(available=False))
    assert nb.select_backend(_FakeCuda(), True) == "tiled" and "triton" not in nb.BACKENDS
    nb._TRITON["tried"] = False
    triton_slot(None)  # importing it raises ImportError
    assert nb.select_backend(_FakeCuda(), False) == "tiled" and "triton" not in nb.BACKENDS


def test_triton_supports_hook_is_consulted(triton_slot):
    triton_slot(_fake_triton(supports=lambda q, k, v, kernel_size, **kw: not kw["return_weights"]))
    assert nb.select_backend(_FakeCuda(), True, kernel_size=7) == "triton"
    assert nb.select_backend(_FakeCuda(), True, kernel_size=7, return_weights=True) == "tiled"


@pytest.mark.parametrize("kernel, trusted", [
    (reference_attention, True),
    (lambda *a, **kw: reference_attention(*a, **kw) * 1.01, False),  # silently wrong
    (lambda *a, **kw: 1 / 0, False),  # fails to compile or run
])
def test_auto_trusts_a_fused_kernel_only_after_it_matches_the_reference(monkeypatch, kernel, trusted):
    monkeypatch.setitem(nb.BACKENDS, "triton", kernel)
    monkeypatch.setattr(nb, "_TRITON_VERIFIED", {})
    device = torch.device("cpu")  # the check runs on whatever device it is given
    if trusted:
        assert nb._triton_verified(device)
    else:
        with pytest.warns(RuntimeWarning, match="backend='auto' uses 'tiled' instead"):
            assert not nb._triton_verified(device)
    assert nb._TRITON_VERIFIED[device] is trusted  # checked once per device


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_fused_kernel_check_ignores_the_first_callers_grad_mode(monkeypatch, context):
    """Found on the first GPU run: a first call under no_grad (`--task time`, an evaluation) failed the check
    (no gradients to compare) and left auto on 'tiled' for the rest of the process."""
    monkeypatch.setitem(nb.BACKENDS, "triton", reference_attention)
    monkeypatch.setattr(nb, "_TRITON_VERIFIED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with context():
            assert nb._triton_verified(torch.device("cpu"))


def test_clear_errors():
    q, k, v, _, _ = make_inputs(5, 6, 3)
    with pytest.raises(ValueError, match="odd"):
        neighborhood_attention(q, k, v, 4)
    with pytest.raises(ValueError, match="odd"):
        neighborhood_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="unknown backend"):
        neighborhood_attention(q, k, v, 3, backend="nope")
    with pytest.raises(ValueError, match="border"):
        neighborhood_attention(q, k, v, 3, border="reflect")
    with pytest.raises(ValueError, match="matching shapes"):
        neighborhood_attention(q, k[:, :, :4], v, 3)
    with pytest.raises(ValueError, match="matching shapes"):
        neighborhood_attention(q[0], k[0], v[0], 3)
    with pytest.raises(ValueError, match="rel_pos"):
        neighborhood_attention(q, k, v, 3, rel_pos=torch.zeros(5, 5, D))
    with pytest.raises(ValueError, match="window_mask"):
        neighborhood_attention(q, k, v, 3, window_mask=torch.ones(HEADS + 1, 3, 3))
    with pytest.raises(ValueError, match="floating point"):
        neighborhood_attention(q.long(), k.long(), v.long(), 3)


def test_attend_and_record_records_only_while_recording():
    from torch import nn

    from common.inspect.capture import AttentionLayer, record_attention

    class Layer(AttentionLayer, nn.Module):
        def forward(self, q):
            return nb.attend_and_record(self, q, q, q, 3)

    layer, (q, _, _, _, _) = Layer(), make_inputs(4, 5, 3)
    torch.testing.assert_close(layer(q), reference_attention(q, q, q, 3), atol=1e-5, rtol=1e-5)
    with record_attention(layer) as maps:
        layer(q)
    assert len(maps) == 1 and maps[0].weights.shape == (*q.shape[:2], 4, 5, 4, 5)
    torch.testing.assert_close(maps[0].weights.sum((-2, -1)), torch.ones(q.shape[:2] + (4, 5)))


def test_even_head_dim_errors():
    assert nb.even_head_dim(64, 8) == 8
    with pytest.raises(ValueError, match="divisible"):
        nb.even_head_dim(30, 8)
    with pytest.raises(ValueError, match="must be even"):
        nb.even_head_dim(24, 8)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs: every backend counts the docstring's formula under torch.utils.flop_counter, forward and backward, and
# computes exactly what it computes outside the counter.

@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("rel,mask,border,dv", [(None, False, "mask", D), ("shared", True, "zeros", 6),
                                                ("per_head", True, "mask", D)])
def test_flops_are_the_formula_for_every_backend(backend, rel, mask, border, dv):
    from torch.utils.flop_counter import FlopCounterMode

    kernel = 3
    inputs = make_inputs(5, 6, kernel, rel=rel, mask=mask, dv=dv)
    q, k, v, rel_pos, window_mask = inputs
    with FlopCounterMode(display=False) as counter:
        counted = run(backend, inputs, kernel, border, weights_grad=True)
    logit_width = D * (2 if rel else 1)
    macs = B * HEADS * 5 * 6 * kernel * kernel * (logit_width + dv)
    assert nb.neighborhood_macs(q, k, v, kernel, rel_pos=rel_pos) == macs
    assert {str(op): n for op, n in counter.get_flop_counts()["Global"].items()} == {
        "attention_flops.neighborhood_attention": 2 * macs,
        "attention_flops.neighborhood_attention_backward": 4 * macs}
    assert_all_close(counted, run(backend, inputs, kernel, border, weights_grad=True), atol=0.0)


def test_flops_of_a_recording_layer_and_without_grad():
    from torch.utils.flop_counter import FlopCounterMode

    from common.inspect.capture import AttentionLayer, record_attention

    class Layer(AttentionLayer, torch.nn.Module):
        def forward(self, q):
            return nb.attend_and_record(self, q, q, q, 5)

    layer, (q, _, _, _, _) = Layer(), make_inputs(4, 5, 5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter, record_attention(layer) as maps:
        out = layer(q)
    assert counter.get_total_flops() == 2 * B * HEADS * 4 * 5 * 25 * 2 * D
    assert len(maps) == 1
    torch.testing.assert_close(out, reference_attention(q, q, q, 5), atol=1e-5, rtol=1e-5)


def test_a_newly_registered_backend_counts_the_formula_without_code_of_its_own(monkeypatch):
    """The count is the dispatcher's contract: a backend added later (a fused CPU kernel, say) that does twice the
    work through plain aten ops still counts `neighborhood_macs`, and `test_flops_are_the_formula_for_every_backend`
    picks it up from nb.BACKENDS."""
    from torch.utils.flop_counter import FlopCounterMode

    def wasteful(q, k, v, kernel_size, **options):  # matrix products the counter would see, then the real thing
        (q.flatten(0, 3) @ k.flatten(0, 3).t()).sum()
        return reference_attention(q, k, v, kernel_size, **options)

    monkeypatch.setitem(nb.BACKENDS, "test_wasteful", wasteful)
    inputs = make_inputs(4, 5, 3, rel="shared")
    with FlopCounterMode(display=False) as counter:
        counted = run("test_wasteful", inputs, 3, "mask")
    macs = B * HEADS * 4 * 5 * 9 * (2 * D + D)
    assert {str(op): n for op, n in counter.get_flop_counts()["Global"].items()} == {
        "attention_flops.neighborhood_attention": 2 * macs,
        "attention_flops.neighborhood_attention_backward": 4 * macs}
    assert_all_close(counted, run("reference", inputs, 3, "mask"), atol=0.0)
