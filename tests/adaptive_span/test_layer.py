"""The adaptive-span layer: the formula, the shrinking window, gradients to z, the engine hooks, recording."""

from __future__ import annotations

import pytest
import torch

from adaptive_span import AdaptiveSpanAttention2d, LocalAttention2d
from common.inspect.capture import record_attention
from common.models.hooks import ModelHooks
from common.ops import neighborhood
from common.registry import create_mixer


def adaptive(z=(0.2, 0.45), max_span=3, R=1.5, backend="auto", **kwargs):
    torch.manual_seed(0)
    m = AdaptiveSpanAttention2d(4, 8, heads=2, max_span=max_span, R=R, backend=backend, **kwargs).double()
    with torch.no_grad():
        m.span.z.copy_(torch.tensor(z, dtype=torch.double))
    return m


def projections(m, x):
    """q (scaled), k, v as (B, heads, H, W, d), written out from the 1x1 weights."""
    b, _, h, w = x.shape

    def proj(conv):
        t = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
        return t.reshape(b, m.heads, m.head_dim, h, w).permute(0, 1, 3, 4, 2)

    return proj(m.query) * m.head_dim ** -0.5, proj(m.key), proj(m.value)


def by_hand(m, x, i, j):
    """y_ij for batch item 0: softmax over in-image neighbours within S, times the mask, renormalised."""
    q, k, v = projections(m, x)
    height, width = x.shape[-2:]
    S, R, out = m.span.max_span, m.span.ramp, []
    for h in range(m.heads):
        z = m.span.z[h].item()
        logits, masks, values = [], [], []
        for dy in range(-S, S + 1):
            for dx in range(-S, S + 1):
                a, b = i + dy, j + dx
                if 0 <= a < height and 0 <= b < width:
                    rel = torch.cat([m.relative.row[dy + S], m.relative.col[dx + S]])
                    logits.append(q[0, h, i, j] @ (k[0, h, a, b] + rel))
                    masks.append(min(1.0, max(0.0, (S * z - max(abs(dy), abs(dx))) / R + 1)))
                    values.append(v[0, h, a, b])
        w = torch.stack(logits).softmax(0) * torch.tensor(masks, dtype=x.dtype)
        out.append((w / w.sum()) @ torch.stack(values))
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_matches_the_formula_written_out(backend):
    m, x = adaptive(backend=backend), torch.randn(1, 4, 7, 6, dtype=torch.double)
    y = m(x)
    with torch.no_grad():
        for i, j in [(3, 3), (0, 0), (6, 5)]:
            assert torch.allclose(y[0, :, i, j], by_hand(m, x, i, j), atol=1e-10)


def test_window_shrinks_with_the_spans_and_equals_full_window_attention(monkeypatch):
    calls = []
    real = neighborhood.neighborhood_attention

    def spy(q, k, v, kernel_size, **kwargs):
        calls.append(kernel_size)
        return real(q, k, v, kernel_size, **kwargs)

    monkeypatch.setattr(neighborhood, "neighborhood_attention", spy)  # the op the layer's attend_and_record calls
    x = torch.randn(2, 4, 12, 12, dtype=torch.double)
    for z, window in [((1.0, 1.0), 9), ((0.5, 0.2), 7), ((0.2, 0.1), 5), ((0.0, 0.0), 3)]:
        m = adaptive(z=z, max_span=4, R=2.0)
        y = m(x)
        assert calls[-1] == window == m.window(12, 12)
        # the same layer computed over the full 9 x 9 window with the same (zero-padded) mask
        q, k, v = projections(m, x)
        full = real(q, k, v, 9, rel_pos=m.relative(9), window_mask=m.span(4), backend="reference")
        assert torch.allclose(y, full.permute(0, 1, 4, 2, 3).reshape(y.shape), atol=1e-12)


def test_window_is_also_capped_by_the_feature_map():
    m = adaptive(z=(1.0, 1.0), max_span=5)
    assert m.window(32, 32) == 11 and m.window(4, 4) == 7 and m.window(1, 1) == 1
    assert adaptive(z=(1.0, 1.0), max_span=5, border="zeros").window(4, 4) == 11  # zero keys still count


def test_window_follows_z_after_in_place_changes_and_loading():
    m = adaptive(z=(0.0, 0.0), max_span=4, R=2.0)
    assert m.radius == 1
    with torch.no_grad():
        m.span.z.fill_(1.0)
    assert m.radius == 4
    state = adaptive(z=(0.25, 0.0), max_span=4, R=2.0).state_dict()
    m.load_state_dict(state)
    assert m._radius == 2 and m.radius == 2


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_gradients_reach_z_from_the_penalty_and_through_the_mask(backend):
    m, x = adaptive(backend=backend, span_penalty=0.1), torch.randn(2, 4, 6, 6, dtype=torch.double)
    m.extra_loss().backward()
    assert torch.allclose(m.span.z.grad, torch.full((2,), 0.1, dtype=torch.double))
    m.zero_grad()
    (m(x) ** 2).sum().backward()
    grad = m.span.z.grad
    assert grad is not None and (grad.abs() > 1e-6).all()
    # against a finite difference of the attention loss in z (heads on the ramp, away from its kinks)
    eps, head = 1e-6, 1
    with torch.no_grad():
        def loss_at(dz):
            m.span.z[head] += dz
            value = (m(x) ** 2).sum()
            m.span.z[head] -= dz
            return value
        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert numeric.item() == pytest.approx(grad[head].item(), rel=1e-4)


def test_optimizer_step_then_clamp_through_the_engine_hooks():
    m = adaptive(z=(0.05, 0.95), span_penalty=1.0)
    hooks = ModelHooks.collect(m)
    assert hooks.loss_terms == [m] and hooks.after_step == [m]
    opt = torch.optim.SGD([m.span.z], lr=0.1)
    m.span.z.grad = torch.tensor([1.0, -1.0], dtype=torch.double)  # push below 0 and above 1
    opt.step()
    assert m.span.z.tolist() == pytest.approx([-0.05, 1.05])
    hooks.after_optimizer_step()
    assert m.span.z.tolist() == [0.0, 1.0] and m._radius == 3


def test_metrics_in_pixels():
    m = adaptive(z=(0.25, 0.5), max_span=4, R=2.0)
    assert m.epoch_metrics() == {"span_px/head0": 1.0, "span_px/head1": 2.0, "window_px": 7.0}


def test_local_mode_has_no_spans_no_penalty_no_hooks():
    local = create_mixer("adaptive_span", 8, 8, adaptive=False, kernel_size=3, heads=2)
    assert type(local) is LocalAttention2d and local.kernel_size == 3
    assert not any("span" in name for name, _ in local.named_parameters())
    hooks = ModelHooks.collect(local)
    assert not hooks.loss_terms and not hooks.after_step and not hooks.metrics and not hooks.figures
    assert local(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(ValueError, match="kernel_size is for fixed-window"):
        create_mixer("adaptive_span", 8, 8, kernel_size=3)


def test_recorded_maps_show_the_masked_window():
    m = adaptive(z=(0.0, 1.0), max_span=3, R=1.0)
    with record_attention(m) as maps:
        m(torch.randn(1, 4, 9, 9, dtype=torch.double))
    weights = maps[0].weights  # (1, heads, 9, 9, 9, 9)
    centre = weights[0, :, 4, 4]
    assert torch.allclose(weights.sum((-2, -1)), torch.ones(1, dtype=weights.dtype))
    # head 0 (z = 0, R = 1): only the query itself; head 1 (z = 1): the whole 7 x 7 window
    assert centre[0, 4, 4] == pytest.approx(1.0) and centre[0].sum() == pytest.approx(1.0)
    assert (centre[1, 1:8, 1:8] > 0).all() and centre[1].sum() == pytest.approx(1.0)
    assert centre[1, 0].sum() == 0 and centre[1, :, 0].sum() == 0


def test_stride_pools_after_attention_and_bf16_autocast_runs():
    m = AdaptiveSpanAttention2d(8, 8, heads=2, max_span=2, stride=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(2, 8, 6, 10))
    assert y.shape == (2, 8, 3, 5) and torch.isfinite(y.float()).all()


def test_flops_count_the_window_the_layer_computes():
    """The adaptive layer runs the smallest window that holds every head's mask; its FLOPs are that window's
    (counted on real tensors: the window size is read from z, which meta tensors do not hold)."""
    from common.inspect.timing import count_macs

    m = adaptive(z=(0.2, 0.45)).float()
    h, w, c_in, c_out = 9, 9, 4, 8
    window = m.window(h, w)
    assert window < 2 * m.span.max_span + 1
    macs = 3 * h * w * c_in * c_out + h * w * window * window * 3 * c_out  # projections; q.k, q.r, sum of v
    assert count_macs(m, (c_in, h, w)) == macs
