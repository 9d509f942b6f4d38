"""Theorem 1 made executable: a multi-head self-attention layer with the quadratic encoding that is a conv.

Cordonnier et al. (2020), Theorem 1: a multi-head self-attention layer with N_h heads of dimension D_h,
output dimension D_out and a relative positional encoding of dimension >= 3 can express any convolution
with a sqrt(N_h) x sqrt(N_h) kernel and min(D_h, D_out) output channels.

The layer (`QuadraticAttention2d`), on the pixels of a (B, D_in, H, W) image:

    MHSA(X)_q = sum_h  sum_k softmax_k( v_h . r_{k - q} )  X_k W_val^(h) W_out^(h)  + b_out
    r_delta   = (||delta||^2, delta_y, delta_x)                            (the quadratic encoding)

There are no content terms. The keys are the pixels of the image zero-padded by `padding` on each side
(zero keys still take part in the softmax with value 0), the queries are the image's own pixels.

The construction (`conv_as_attention`): head h gets the shift Delta_h of the K x K kernel (row-major) and
v_h = -alpha (1, -2 Delta_h,y, -2 Delta_h,x), so v_h . r_delta = -alpha ||delta - Delta_h||^2 + alpha ||Delta_h||^2:
the softmax of head h tends to a one-hot on the pixel q + Delta_h as alpha grows (the next-best key is
exp(-alpha) behind). W_val^(h) W_out^(h) = W_conv[:, :, Delta_h]^T then gives the cross-correlation that
F.conv2d computes, with zero padding K // 2. With D_h < D_out each head passes only D_h channels: the layer
is exactly the conv on its first D_h output channels, and the other output channels are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quadratic_encoding(height: int, width: int, padding: int, dtype=None, device=None) -> torch.Tensor:
    """r_delta = (||delta||^2, dy, dx) for every (query pixel, padded key pixel): (H*W, Hp*Wp, 3)."""
    qy, qx = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(-padding, height + padding, device=device),
                            torch.arange(-padding, width + padding, device=device), indexing="ij")
    dy = (ky.reshape(1, -1) - qy.reshape(-1, 1)).to(dtype)
    dx = (kx.reshape(1, -1) - qx.reshape(-1, 1)).to(dtype)
    return torch.stack([dy ** 2 + dx ** 2, dy, dx], dim=-1)


class QuadraticAttention2d(nn.Module):
    """Multi-head self-attention with the quadratic relative encoding and no content term.

    Parameters: v (heads, 3), the positional query of each head; value (heads, D_in, D_h), W_val^(h);
    out Linear(heads * D_h -> D_out), W_out and b_out. Input and output: (B, C, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int, head_dim: int, padding: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.heads, self.head_dim, self.padding = heads, head_dim, padding
        self.v = nn.Parameter(torch.zeros(heads, 3))
        self.value = nn.Parameter(torch.zeros(heads, in_channels, head_dim))
        self.out = nn.Linear(heads * head_dim, out_channels)

    def attention(self, height: int, width: int) -> torch.Tensor:
        """(heads, H*W, Hp*Wp) softmax over the padded key pixels of every query pixel."""
        r = quadratic_encoding(height, width, self.padding, self.v.dtype, self.v.device)
        return torch.einsum("qkd,hd->hqk", r, self.v).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        p = self.padding
        keys = F.pad(x, (p, p, p, p)).flatten(2).transpose(1, 2)  # (B, Hp*Wp, D_in), zero-padded pixels
        values = torch.einsum("bkc,hcd->bhkd", keys, self.value)  # (B, heads, Hp*Wp, D_h)
        mixed = torch.einsum("hqk,bhkd->bqhd", self.attention(height, width), values)
        out = self.out(mixed.reshape(b, height * width, self.heads * self.head_dim))
        return out.transpose(1, 2).reshape(b, self.out_channels, height, width)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, heads={self.heads}, "
                f"head_dim={self.head_dim}, padding={self.padding}")


def kernel_shifts(kernel_size: int) -> list[tuple[int, int]]:
    """The K x K shifts (dy, dx) in row-major kernel order, one per head."""
    r = kernel_size // 2
    return [(a - r, b - r) for a in range(kernel_size) for b in range(kernel_size)]


@torch.no_grad()
def conv_as_attention(conv: nn.Conv2d, alpha: float, head_dim: int | None = None) -> QuadraticAttention2d:
    """The attention layer of Theorem 1 for `conv`: K*K heads, quadratic encoding, output -> conv(x) as alpha grows.

    conv: odd K x K kernel, stride 1, no dilation, one group, zero padding K // 2 (as in the paper's
    construction), any channels. head_dim (D_h) defaults to conv.out_channels; a smaller one expresses the
    conv's first D_h output channels exactly and outputs 0 on the others (min(D_h, D_out) of Theorem 1).
    The layer has conv's dtype and device; in float64 the error reaches round-off by alpha ~ 40.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv_as_attention takes an nn.Conv2d, got {type(conv).__name__}")
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        raise ValueError(f"Theorem 1 needs an odd square kernel (sqrt(N_h) x sqrt(N_h)), got {kh}x{kw}")
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        raise ValueError(f"Theorem 1 covers stride 1, dilation 1, groups 1; got stride {conv.stride}, "
                         f"dilation {conv.dilation}, groups {conv.groups}")
    if conv.padding not in ((kh // 2, kh // 2), "same") or conv.padding_mode != "zeros":
        raise ValueError(f"the construction uses zero padding K // 2 = {kh // 2}; the conv has padding "
                         f"{conv.padding!r} ({conv.padding_mode}): build it with padding={kh // 2}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    d_in, d_out = conv.in_channels, conv.out_channels
    d_h = d_out if head_dim is None else head_dim
    if d_h < 1:
        raise ValueError(f"head_dim must be >= 1, got {d_h}")
    kept = min(d_h, d_out)
    weight = conv.weight
    layer = QuadraticAttention2d(d_in, d_out, kh * kh, d_h, padding=kh // 2).to(weight.device, weight.dtype)
    layer.out.weight.zero_()
    layer.out.bias.zero_()
    for h, (dy, dx) in enumerate(kernel_shifts(kh)):
        layer.v[h] = -alpha * torch.tensor([1.0, -2.0 * dy, -2.0 * dx], dtype=weight.dtype)
        # W_val^(h) carries W_conv[Delta_h] (first `kept` output channels), W_out^(h) is the identity on them.
        layer.value[h, :, :kept] = weight[:kept, :, dy + kh // 2, dx + kh // 2].t()
        layer.out.weight[torch.arange(kept), h * d_h + torch.arange(kept)] = 1.0
    if conv.bias is not None:
        layer.out.bias[:kept] = conv.bias[:kept]
    return layer


def relative_error(conv: nn.Conv2d, layer: nn.Module, x: torch.Tensor, channels: int | None = None) -> float:
    """max |layer(x) - conv(x)| / max |conv(x)| over the first `channels` output channels (all when None)."""
    with torch.no_grad():
        want, got = conv(x)[:, :channels], layer(x)[:, :channels]
        return ((got - want).abs().max() / want.abs().max()).item()
