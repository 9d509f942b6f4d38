"""The attention-capture contract, with toy global and local attention layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.inspect.capture import AttentionLayer, has_attention, record_attention, windows_to_dense


class GlobalAttention(AttentionLayer, nn.Module):
    def __init__(self, channels=4, heads=2):
        super().__init__()
        self.heads = heads
        self.qk = nn.Conv2d(channels, 2 * channels, 1)
        self.computed_dense = 0

    def forward(self, x):
        b, c, h, w = x.shape
        q, k = self.qk(x).flatten(2).chunk(2, dim=1)
        q = q.view(b, self.heads, c // self.heads, h * w)
        k = k.view(b, self.heads, c // self.heads, h * w)
        probs = torch.einsum("bhdq,bhdk->bhqk", q, k).softmax(-1)
        if self.recording:
            def weights(index):
                self.computed_dense += 1
                p = probs if index is None else probs[:, :, index]
                return p.reshape(*p.shape[:3], h, w)

            self.record(weights, (h, w), (h, w))
        return x


class LocalAttention(AttentionLayer, nn.Module):
    """Uniform attention over a k x k window, border offsets masked: an easy map to predict."""

    def __init__(self, kernel_size=3):
        super().__init__()
        self.k = kernel_size

    def forward(self, x):
        b, _, h, w = x.shape
        ones = torch.ones(1, 1, h, w)
        valid = F.unfold(ones, self.k, padding=self.k // 2).view(1, 1, self.k ** 2, h, w).permute(0, 1, 3, 4, 2)
        weights = (valid / valid.sum(-1, keepdim=True)).expand(b, 2, h, w, self.k ** 2)
        if self.recording:
            self.record(lambda index: windows_to_dense(weights, self.k, (h, w), index), (h, w), (h, w))
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.glob = GlobalAttention()
        self.pool = nn.AvgPool2d(2)
        self.local = LocalAttention()

    def forward(self, x):
        return self.local(self.pool(self.glob(x)))


def test_maps_have_one_entry_per_layer_with_dense_shapes():
    model, x = Net(), torch.randn(3, 4, 8, 6)
    assert has_attention(model) and not has_attention(nn.Conv2d(1, 1, 1))
    with record_attention(model) as maps:
        model(x)
    assert [m.name for m in maps] == ["glob", "local"]
    assert maps[0].weights.shape == (3, 2, 8, 6, 8, 6) and maps[1].weights.shape == (3, 2, 4, 3, 4, 3)
    assert maps[1].image_size == (8, 6) and maps[1].key_stride == (2.0, 2.0)
    for m in maps:
        assert torch.allclose(m.weights.sum((-2, -1)), torch.ones(1))


def test_local_windows_are_scattered_where_they_are():
    model = Net()
    with record_attention(model) as maps:
        model(torch.randn(1, 4, 8, 6))
    local = maps[1].weights[0, 0]  # (4, 3, 4, 3)
    corner = local[0, 0]
    assert torch.allclose(corner[:2, :2], torch.full((2, 2), 0.25)) and corner[2:].sum() == 0
    centre = local[1, 1]
    assert torch.allclose(centre[:3, :3], torch.full((3, 3), 1 / 9))


def test_chosen_query_pixels_are_mapped_to_each_layer_grid():
    model, x = Net(), torch.randn(2, 4, 8, 6)
    with record_attention(model) as full:
        model(x)
    with record_attention(model, queries=[(0, 0), (5, 3)]) as chosen:
        model(x)
    assert chosen[0].weights.shape == (2, 2, 2, 8, 6) and chosen[1].weights.shape == (2, 2, 2, 4, 3)
    assert torch.allclose(chosen[0].weights[:, :, 1], full[0].weights[:, :, 5, 3])
    assert torch.allclose(chosen[1].weights[:, :, 1], full[1].weights[:, :, 2, 1])  # (5, 3) // 2


def test_nothing_is_computed_or_kept_when_not_recording():
    model = Net()
    model(torch.randn(1, 4, 8, 6))
    assert model.glob.computed_dense == 0 and not model.glob.recording
    with record_attention(model):
        model(torch.randn(1, 4, 8, 6))
    assert model.glob.computed_dense == 1
    model(torch.randn(1, 4, 8, 6))
    assert model.glob.computed_dense == 1 and model.glob._attention_recorder is None
    assert not model._forward_pre_hooks
