"""The attention-capture contract shared by every attention layer and every figure.

Usage:

    with record_attention(model) as maps:
        model(images)
    for m in maps:
        m.name, m.weights  # (B, heads, Hq, Wq, Hk, Wk), probabilities over the key grid

or `record_attention(model, queries=[(y, x), ...])` for the maps of chosen query
pixels only (given in input-image coordinates): weights (B, heads, Q, Hk, Wk).

An attention layer takes part by inheriting `AttentionLayer` and, in its
forward, calling

    if self.recording:
        self.record(weights_fn, query_grid=(Hq, Wq), key_grid=(Hk, Wk))

where `weights_fn(query_index)` returns the probabilities (B, heads, Q, Hk, Wk)
for the flat, row-major query indices given (all queries when None). Layers
with local windows build the dense maps with `windows_to_dense`. When nothing
is recording, `self.recording` is one attribute lookup: no maps are built.

A query that is a token without a place in the image (a ViT's CLS token) is
recorded as its own map with `query_grid=(1, 1)` and `query_token="cls"`; the
map is named `<layer>[cls]`, and figures draw it without a query position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

WeightsFn = Callable[[torch.Tensor | None], torch.Tensor]


@dataclass
class AttentionMap:
    name: str  # the layer's module path in the model
    weights: torch.Tensor  # (B, heads, Hq, Wq, Hk, Wk), or (B, heads, Q, Hk, Wk) for chosen queries
    image_size: tuple[int, int]  # (H, W) of the model input
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    queries: list[tuple[int, int]] | None = None  # chosen query pixels, image coordinates
    query_token: str | None = None  # the query is this token (e.g. "cls"), not a grid cell

    @property
    def heads(self) -> int:
        return self.weights.shape[1]

    @property
    def key_stride(self) -> tuple[float, float]:
        """Image pixels per key-grid cell along (y, x): how to place the map over the image."""
        return self.image_size[0] / self.key_grid[0], self.image_size[1] / self.key_grid[1]


class AttentionLayer:
    """Mixin for nn.Modules whose attention can be recorded."""

    _attention_recorder: "_Recorder | None" = None

    @property
    def recording(self) -> bool:
        return self._attention_recorder is not None

    def record(self, weights_fn: WeightsFn, query_grid: tuple[int, int], key_grid: tuple[int, int],
               query_token: str | None = None) -> None:
        self._attention_recorder.add(self, weights_fn, tuple(query_grid), tuple(key_grid), query_token)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AttentionLayer)]


def has_attention(model: nn.Module) -> bool:
    return bool(attention_layers(model))


class _Recorder:
    def __init__(self, names: dict, queries: Sequence[tuple[int, int]] | None):
        self.names, self.queries = names, [tuple(q) for q in queries] if queries is not None else None
        self.image_size: tuple[int, int] | None = None
        self.maps: list[AttentionMap] = []

    def add(self, layer, weights_fn: WeightsFn, query_grid, key_grid, query_token: str | None = None) -> None:
        hq, wq = query_grid
        if self.queries is None:
            w = weights_fn(None)
            w = w.reshape(w.shape[0], w.shape[1], hq, wq, *w.shape[-2:])
        else:
            h, wd = self.image_size
            index = [min(hq - 1, y * hq // h) * wq + min(wq - 1, x * wq // wd) for y, x in self.queries]
            w = weights_fn(torch.tensor(index, dtype=torch.long))
        name = self.names[id(layer)] + (f"[{query_token}]" if query_token else "")
        self.maps.append(AttentionMap(name, w.detach().float(), self.image_size, query_grid, key_grid,
                                      self.queries, query_token))


@contextlib.contextmanager
def record_attention(model: nn.Module, queries: Sequence[tuple[int, int]] | None = None
                     ) -> Iterator[list[AttentionMap]]:
    """Fill the yielded list with one `AttentionMap` per attention-layer call during the block."""
    layers = attention_layers(model)
    recorder = _Recorder({id(m): name for name, m in layers}, queries)

    def note_image_size(_module, args):
        recorder.image_size = tuple(args[0].shape[-2:])

    handle = model.register_forward_pre_hook(note_image_size)
    for _, layer in layers:
        layer._attention_recorder = recorder
    try:
        yield recorder.maps
    finally:
        handle.remove()
        for _, layer in layers:
            layer._attention_recorder = None


def windows_to_dense(weights: torch.Tensor, kernel_size: int, grid: tuple[int, int],
                     query_index: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter local-window weights into the key grid.

    weights: (B, heads, H, W, k*k), the weight of each window offset (row-major,
    window centred on the query). Returns (B, heads, Q, H, W) for the flat query
    indices given (all H*W queries when None); offsets outside the image are dropped.
    """
    b, heads, h, w, kk = weights.shape
    assert (h, w) == tuple(grid) and kk == kernel_size ** 2
    flat = weights.reshape(b, heads, h * w, kk)
    index = torch.arange(h * w) if query_index is None else query_index.to(torch.long)
    flat = flat[:, :, index.to(weights.device)]
    qy, qx = (index // w).to(weights.device), (index % w).to(weights.device)
    r = kernel_size // 2
    padded = weights.new_zeros(b, heads, len(index), h + 2 * r, w + 2 * r)
    q = torch.arange(len(index), device=weights.device)
    for dy in range(kernel_size):
        for dx in range(kernel_size):
            padded[:, :, q, qy + dy, qx + dx] = flat[..., dy * kernel_size + dx]
    return padded[..., r:r + h, r:r + w]
