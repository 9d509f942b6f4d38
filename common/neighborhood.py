"""Neighbourhood (local-window) attention: every query pixel attends to its k x k neighbourhood.

    out[b, h, i, j] = sum_o softmax_o( q[b, h, i, j] . (k[b, h, i+dy_o, j+dx_o] + rel_pos[o]) ) v[b, h, i+dy_o, j+dx_o]

over the window offsets o = (dy, dx) in [-k//2, k//2]^2, per head, with no
implicit scaling (a layer scales q itself if it wants). The window is centred
on the query; at the image border it is clipped, not shifted.

- rel_pos: (k, k, d) shared by all heads, or (heads, k, k, d): a relative
  embedding per window offset, added to the keys.
- window_mask: (heads, k, k), multiplies the softmax weights, which are then
  renormalised (adaptive span). Equivalent to adding log(mask) to the logits.
- border="mask": out-of-image neighbours are excluded from the softmax;
  border="zeros": they are zero keys and values (the public SASA code), so they
  still get the weight exp(q . rel_pos[o]).

Backends share this signature; `reference` is the plain unfold formulation and
the test oracle for the others.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

BORDERS = ("mask", "zeros")


def _window_offsets(kernel_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) of each window position, row-major, as two (k*k,) tensors."""
    r = kernel_size // 2
    ar = torch.arange(-r, r + 1, device=device)
    return ar.repeat_interleave(kernel_size), ar.repeat(kernel_size)


def inside_image(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """(H, W, k*k) bool: is window position o of query (i, j) inside the image?"""
    dy, dx = _window_offsets(kernel_size, device)
    rows = torch.arange(height, device=device)[:, None, None] + dy
    cols = torch.arange(width, device=device)[None, :, None] + dx
    return (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)


def _windows(t: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, heads, H, W, d) -> (B, heads, H, W, k*k, d), zero outside the image."""
    b, heads, h, w, d = t.shape
    r = kernel_size // 2
    padded = F.pad(t, (0, 0, r, r, r, r))
    win = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # (B, heads, H, W, d, k, k)
    return win.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, heads, h, w, kernel_size * kernel_size, d)


def _rel_as_window(rel_pos: torch.Tensor, heads: int, kernel_size: int) -> torch.Tensor:
    """rel_pos as (1, heads or 1, 1, 1, k*k, d), ready to broadcast against the windows."""
    rel = rel_pos if rel_pos.dim() == 4 else rel_pos.unsqueeze(0)
    return rel.reshape(1, rel.shape[0], 1, 1, kernel_size * kernel_size, rel.shape[-1])


def reference_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask",
                        return_weights=False):
    """The unfold formulation: clear and slow; it keeps k*k-expanded keys and values for backward."""
    b, heads, h, w, d = q.shape
    kk = kernel_size * kernel_size
    keys = _windows(k, kernel_size)
    if rel_pos is not None:
        keys = keys + _rel_as_window(rel_pos, heads, kernel_size)
    logits = (q.unsqueeze(-2) * keys).sum(-1)  # (B, heads, H, W, k*k)
    if border == "mask":
        logits = logits.masked_fill(~inside_image(h, w, kernel_size, q.device), float("-inf"))
    weights = logits.softmax(-1)
    if window_mask is not None:
        weights = weights * window_mask.reshape(1, heads, 1, 1, kk).to(weights.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    out = (weights.unsqueeze(-1) * _windows(v, kernel_size)).sum(-2)
    return (out, weights) if return_weights else out


Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {"reference": reference_attention}


def register_backend(name: str, fn: Backend) -> None:
    BACKENDS[name] = fn


def _check(q, k, v, kernel_size, rel_pos, window_mask, border):
    if q.dim() != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q, k, v must be (B, heads, H, W, d) with matching shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    heads, d = q.shape[1], q.shape[-1]
    if rel_pos is not None and tuple(rel_pos.shape) not in ((kernel_size, kernel_size, d),
                                                           (heads, kernel_size, kernel_size, d)):
        raise ValueError(f"rel_pos must be (k, k, d) or (heads, k, k, d) = ({heads}, {kernel_size}, {kernel_size}, "
                         f"{d}), got {tuple(rel_pos.shape)}")
    if window_mask is not None and tuple(window_mask.shape) != (heads, kernel_size, kernel_size):
        raise ValueError(f"window_mask must be (heads, k, k) = ({heads}, {kernel_size}, {kernel_size}), "
                         f"got {tuple(window_mask.shape)}")


def select_backend(q: torch.Tensor, needs_grad: bool) -> str:
    """The fastest correct backend registered for this device."""
    for name in ("triton", "tiled") if q.device.type == "cuda" else ("tiled",):
        if name in BACKENDS:
            return name
    return "reference"


def neighborhood_attention(q, k, v, kernel_size: int, rel_pos=None, window_mask=None, border: str = "mask",
                           backend: str = "auto", return_weights: bool = False):
    """Local-window attention; see the module docstring. Returns out (B, heads, H, W, d) [, weights]."""
    _check(q, k, v, kernel_size, rel_pos, window_mask, border)
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rel_pos, window_mask))
        backend = select_backend(q, needs_grad)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))} or 'auto'")
    return BACKENDS[backend](q, k, v, kernel_size, rel_pos=rel_pos, window_mask=window_mask, border=border,
                             return_weights=return_weights)
