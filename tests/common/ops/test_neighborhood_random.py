"""Every CPU backend against the reference on randomly drawn problems (fixed seeds): odd sizes (maps of one
pixel, heads of one channel, value widths unlike the key width, windows larger than the map), the three input
layouts layers produce, shared and per-head embeddings, masks with exact zeros (windows it empties included),
both borders, and the weights' own gradient. fp64, so that any difference is a bug, not rounding."""

from __future__ import annotations

import random

import pytest
import torch

from common.ops import neighborhood as nb

CPU_BACKENDS = [name for name in nb.BACKENDS if name not in ("reference", "triton")]
CASES = 40


def draw(rng: random.Random) -> dict:
    d = rng.choice([1, 2, 3, 5, 8, 17])
    return dict(batch=rng.choice([1, 2]), heads=rng.choice([1, 2, 3]), d=d, dv=rng.choice([d, 1, 4]),
                h=rng.randint(1, 9), w=rng.randint(1, 19), kernel=rng.choice([1, 3, 5, 7, 13]),
                border=rng.choice(["mask", "zeros"]), layout=rng.choice(["contiguous", "channel_major", "strided"]),
                rel=rng.choice([None, "shared", "per_head"]), mask=rng.choice([None, "zeros", "empty_head"]),
                weights=rng.random() < 0.5)


def make(case: dict, gen: torch.Generator):
    b, heads, h, w = case["batch"], case["heads"], case["h"], case["w"]

    def tensor(c):
        if case["layout"] == "contiguous":
            t = torch.randn(b, heads, h, w, c, generator=gen, dtype=torch.float64)
        elif case["layout"] == "channel_major":  # a convolution output split into heads
            t = torch.randn(b, heads, c, h, w, generator=gen, dtype=torch.float64).permute(0, 1, 3, 4, 2)
        else:  # every other pixel, and one channel more than used
            t = torch.randn(b, heads, h, 2 * w, c + 1, generator=gen, dtype=torch.float64)[:, :, :, ::2, :c]
        return t.requires_grad_()

    k = case["kernel"]
    q, key, v = tensor(case["d"]), tensor(case["d"]), tensor(case["dv"])
    rel = {None: None, "shared": (k, k, case["d"]), "per_head": (heads, k, k, case["d"])}[case["rel"]]
    rel = None if rel is None else torch.randn(rel, generator=gen, dtype=torch.float64).requires_grad_()
    mask = None
    if case["mask"] is not None:
        mask = torch.rand(heads, k, k, generator=gen, dtype=torch.float64)
        mask[mask < 0.3] = 0.0
        if case["mask"] == "empty_head":
            mask[0] = 0.0
        mask.requires_grad_()
    return q, key, v, rel, mask


def results(backend: str, case: dict, inputs, gen: torch.Generator):
    q, k, v, rel, mask = inputs
    out = nb.neighborhood_attention(q, k, v, case["kernel"], rel_pos=rel, window_mask=mask, border=case["border"],
                                    backend=backend, return_weights=case["weights"])
    outs = out if case["weights"] else (out,)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    wrt = [t for t in inputs if t is not None]
    return [*outs, *torch.autograd.grad(loss, wrt)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_problems_match_the_reference(backend):
    rng = random.Random(17)
    for index in range(CASES):
        case = draw(rng)
        inputs = make(case, torch.Generator().manual_seed(index))
        got = results(backend, case, inputs, torch.Generator().manual_seed(1000 + index))
        want = results("reference", case, inputs, torch.Generator().manual_seed(1000 + index))
        names = ["out", "weights"][:1 + case["weights"]] + [
            name for name, t in zip(("dq", "dk", "dv", "d rel_pos", "d window_mask"), inputs) if t is not None]
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"case {index} {case}, {name}: {m}")
