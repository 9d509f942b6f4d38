"""The 2-D adaptive span mask (Parker et al. 2020, after Sukhbaatar et al. 2019's 1-D adaptive span).

Per head h a learnable z_h in [0, 1]; the mask of a window offset (dy, dx) depends only on its ring, the
Chebyshev distance d = max(|dy|, |dx|) from the query:

    m_h(d) = clamp( (S * z_h - (d - ring_offset)) / R + 1, 0, 1 )

S = max_span (the largest span, in pixels), R = ramp (pixels over which the mask falls from 1 to 0).
ring_offset = 0 is the formula of the paper (and of the 1-D method): ring 0 (the query itself) is always
kept. ring_offset = 1 reproduces the public 2-D code, whose mask is shifted out by one ring, so the 3 x 3
neighbourhood (ring 1) is always kept as well.

Window cap: the rings that exist are 0..S, so no window is ever larger than (2S + 1) x (2S + 1). At z = 1
every ring d <= S has m = 1 (with either offset), so a layer at full span is exactly local attention with
kernel 2S + 1; the part of the ramp that would lie beyond ring S is cut. (z is clamped to [0, 1], so a span
can never grow past S and the cut rings could never become fully open anyway.)
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.weight_decay import mark_no_weight_decay


def chebyshev_rings(radius: int, device=None) -> torch.Tensor:
    """(k, k) long, k = 2 * radius + 1: the ring index max(|dy|, |dx|) of each window offset, row-major."""
    offsets = torch.arange(-radius, radius + 1, device=device).abs()
    return torch.maximum(offsets[:, None], offsets[None, :])


class AdaptiveSpanMask(nn.Module):
    """Learnable per-head spans and the soft window mask they define.

    `z` ((heads,), no weight decay) is the only parameter. Calling the module with a window radius r returns
    the (heads, 2r + 1, 2r + 1) mask, differentiable in z: the `window_mask` that
    `common.ops.neighborhood.neighborhood_attention` multiplies into the softmax weights (then renormalises).
    `required_radius()` is the smallest radius whose window holds every head's non-zero mask.
    """

    def __init__(self, heads: int, max_span: int, ramp: float, init: float = 0.3, ring_offset: int = 0):
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if int(max_span) != max_span or max_span < 1:
            raise ValueError(f"max_span must be a whole number of pixels >= 1, got {max_span}")
        if not ramp > 0:
            raise ValueError(f"the ramp R must be > 0 pixels, got {ramp}")
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"the initial span fraction must lie in [0, 1], got {init}")
        if ring_offset not in (0, 1):
            raise ValueError(f"ring_offset must be 0 (the formula) or 1 (the public code), got {ring_offset}")
        self.max_span, self.ramp, self.ring_offset = int(max_span), float(ramp), int(ring_offset)
        self.z = nn.Parameter(torch.full((heads,), float(init)))
        mark_no_weight_decay(self.z)

    @property
    def heads(self) -> int:
        return self.z.shape[0]

    def ring_values(self, radius: int) -> torch.Tensor:
        """(heads, radius + 1): the mask value of rings 0..radius for each head (radius <= max_span)."""
        d = torch.arange(radius + 1, device=self.z.device, dtype=self.z.dtype) - self.ring_offset
        return ((self.max_span * self.z[:, None] - d) / self.ramp + 1).clamp(0.0, 1.0)

    @torch.no_grad()
    def required_radius(self) -> int:
        """The largest ring (<= max_span) where some head's mask is non-zero: one host sync.

        Read from the very values `forward` computes, so the window never cuts a ring with a tiny non-zero
        weight that a separately rounded formula would have called zero.
        """
        alive = (self.ring_values(self.max_span) > 0).any(0)  # (max_span + 1,)
        return int(alive.nonzero().max()) if bool(alive.any()) else 0

    def forward(self, radius: int) -> torch.Tensor:
        if not 0 <= radius <= self.max_span:
            raise ValueError(f"window radius must lie in [0, {self.max_span}], got {radius}")
        return self.ring_values(radius)[:, chebyshev_rings(radius, self.z.device)]

    def spans_px(self) -> torch.Tensor:
        """(heads,): S * z, the span in pixels where each head's mask starts to fall below 1 (ring_offset 0)."""
        return self.max_span * self.z.detach()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.z.clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, max_span={self.max_span}, ramp={self.ramp:g}, ring_offset={self.ring_offset}"
