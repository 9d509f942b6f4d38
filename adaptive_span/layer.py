"""Local self-attention with a fixed window, and with a learned (adaptive) window per head.

    y_ij = sum_{o in window} w_o v_{ij+o},   w = renorm( softmax_o( s q_ij . (k_{ij+o} + r_o) ) * m(o) )

per head, with q, k, v 1x1 projections (no bias), s = d_head**-0.5, r the cropped relative row/column
embedding, and m the adaptive span mask (all ones in the fixed-window layer). Registered as the backbone
mixer `adaptive_span` (`adaptive=False` gives the fixed-window "local" layer).

The adaptive layer computes only the window it needs: the smallest odd square holding every head's
non-zero mask (`AdaptiveSpanMask.required_radius`), at most 2 * max_span + 1, and with border="mask" also
at most 2 * max(H, W) - 1 (larger windows only add out-of-image keys, which that rule drops). The output is
exactly that of the full (2 * max_span + 1) window with the same mask. The radius is a Python int that
changes only when a span crosses a ring boundary, so the attention op sees a new shape only then; under
torch.compile a layer recompiles only at those steps (the cached radius is refreshed eagerly after every
optimiser step and after load_state_dict).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adaptive_span.mask import AdaptiveSpanMask
from adaptive_span.relative import CroppedRelativeEmbedding2d
from common.inspect.capture import AttentionLayer
from common.ops.neighborhood import attend_and_record, even_head_dim, merge_heads, split_heads
from common.registry import register_mixer


class LocalAttention2d(AttentionLayer, nn.Module):
    """Multi-head local self-attention over a fixed k x k window (the paper's "local attention" baseline).

    Heads split the out_channels of q, k and v; a head's logit is a dot product over its d_head channels;
    q is scaled by d_head**-0.5; relative embeddings [row(dy), col(dx)] (d_head/2 each, shared by the heads)
    are added to the keys. border="mask" drops out-of-image neighbours from the softmax, "zeros" treats them
    as zero keys and values (the public code). stride > 1: a stride x stride average pool after the attention.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, heads: int = 4, stride: int = 1,
                 border: str = "mask", backend: str = "auto"):
        super().__init__()
        head_dim = even_head_dim(out_channels, heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.kernel_size, self.heads, self.head_dim = kernel_size, heads, head_dim
        self.border, self.backend = border, backend
        self.scale = head_dim ** -0.5
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        for projection in (self.query, self.key, self.value):
            # The public code's AttentionConv.reset_parameters; it holds whatever init the backbone uses.
            nn.init.kaiming_normal_(projection.weight, mode="fan_out", nonlinearity="relu")
        self.relative = CroppedRelativeEmbedding2d(kernel_size, head_dim)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def window(self, height: int, width: int) -> int:
        """The window side computed for a height x width input."""
        return self.kernel_size

    def window_mask(self, kernel_size: int) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if not torch.compiler.is_compiling():
            self.map_size = (int(height), int(width))  # the figures convert this grid's pixels to the input's
        k_size = self.window(height, width)
        q = split_heads(self.query(x), self.heads) * self.scale
        k = split_heads(self.key(x), self.heads)
        v = split_heads(self.value(x), self.heads)
        rel_pos = self.relative(k_size).to(q.dtype)  # one dtype inside the op under bf16 autocast
        out = attend_and_record(self, q, k, v, k_size, rel_pos=rel_pos, window_mask=self.window_mask(k_size),
                                border=self.border, backend=self.backend)
        return self.pool(merge_heads(out))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, heads={self.heads}, border={self.border!r}, backend={self.backend!r}"


def _refresh_after_load(module: "AdaptiveSpanAttention2d", incompatible_keys) -> None:
    module.refresh_window()


class AdaptiveSpanAttention2d(LocalAttention2d):
    """Local attention whose window is learned per head by an `AdaptiveSpanMask` (Parker et al. 2020).

    Hooks for the training engine (`common.models.hooks`): `extra_loss` = span_penalty * sum_h z_h (summed over the
    layers by the engine), `after_optimizer_step` clamps z to [0, 1], `epoch_metrics` reports each head's
    span S * z_h in pixels and the current window, `training_figures` draws `spans.png`.

    The relative embedding is sized for the largest window, 2 * max_span + 1, and cropped to the current one.
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 4, max_span: int = 5, R: float = 2.0,
                 span_init: float = 0.3, span_penalty: float = 0.0, ring_offset: int = 0, stride: int = 1,
                 border: str = "mask", backend: str = "auto"):
        if span_penalty < 0:
            raise ValueError(f"span_penalty must be >= 0, got {span_penalty}")
        super().__init__(in_channels, out_channels, kernel_size=2 * int(max_span) + 1, heads=heads, stride=stride,
                         border=border, backend=backend)
        self.span = AdaptiveSpanMask(heads, max_span, R, init=span_init, ring_offset=ring_offset)
        self.span_penalty = float(span_penalty)
        self._radius, self._radius_key = 0, None
        self.refresh_window()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ------------------------------------------------------------------ the window

    def _z_key(self) -> tuple:
        z = self.span.z
        return z.device, z.data_ptr(), z._version

    def refresh_window(self) -> None:
        """Recompute the radius from z (one host sync)."""
        self._radius, self._radius_key = self.span.required_radius(), self._z_key()

    @property
    def radius(self) -> int:
        """The smallest radius that holds every head's non-zero mask. Eagerly it follows z (recomputed only when
        z has changed since the last call); under torch.compile it is the value cached after the last step."""
        if not torch.compiler.is_compiling() and self._z_key() != self._radius_key:
            self.refresh_window()
        return self._radius

    def window(self, height: int, width: int) -> int:
        r = self.radius
        if self.border == "mask":  # beyond max(H, W) - 1 every neighbour is outside the image and dropped
            r = min(r, max(height, width) - 1)
        return 2 * r + 1

    def window_mask(self, kernel_size: int) -> torch.Tensor:
        return self.span(kernel_size // 2)

    # ------------------------------------------------------------------ engine hooks

    def extra_loss(self) -> torch.Tensor:
        return self.span_penalty * self.span.z.sum()

    def after_optimizer_step(self) -> None:
        self.span.clamp_()
        self.refresh_window()

    def epoch_metrics(self) -> dict[str, float]:
        """Spans and window in pixels of this layer's own feature map (of side `map_size` when it has run)."""
        out = {f"span_px/head{h}": float(v) for h, v in enumerate(self.span.spans_px().tolist())}
        out["window_px"] = float(2 * self.radius + 1)
        if getattr(self, "map_size", None) is not None:
            out["map_size"] = float(self.map_size[0])
        return out

    def viz_overlay(self) -> list[float]:
        """Each head's effective window radius in pixels of this layer's grid, drawn by the attention figures
        (`common.inspect.viz`): S * z_h + ring_offset, the ring up to which the head's mask is 1 (it then falls to 0
        over R more pixels)."""
        return (self.span.spans_px() + self.span.ring_offset).tolist()

    def training_figures(self, run_dir: Path, history: list[dict]) -> None:
        from adaptive_span.figures import input_height, plot_spans  # matplotlib only when a run ends

        plot_spans(history, Path(run_dir) / "spans.png", max_span=self.span.max_span,
                   input_size=input_height(Path(run_dir)))

    def extra_repr(self) -> str:
        return (f"max_window={self.kernel_size}, heads={self.heads}, span_penalty={self.span_penalty:g}, "
                f"border={self.border!r}, backend={self.backend!r}")


@register_mixer(name="adaptive_span")
def adaptive_span_mixer(in_channels: int, out_channels: int, stride: int = 1, adaptive: bool = True,
                        kernel_size: int | None = None, heads: int = 4, max_span: int = 5, R: float = 2.0,
                        span_init: float = 0.3, span_penalty: float = 0.0, ring_offset: int = 0,
                        border: str = "mask", backend: str = "auto") -> LocalAttention2d:
    """The backbone's mixer slot: adaptive-span attention, or (adaptive=False) fixed-window local attention
    of `kernel_size` (default 5) with no span parameters and no penalty."""
    if adaptive:
        if kernel_size is not None:
            raise ValueError("kernel_size is for fixed-window attention (adaptive=False); the adaptive window is "
                             "learned, at most 2 * max_span + 1")
        return AdaptiveSpanAttention2d(in_channels, out_channels, heads=heads, max_span=max_span, R=R,
                                       span_init=span_init, span_penalty=span_penalty, ring_offset=ring_offset,
                                       stride=stride, border=border, backend=backend)
    return LocalAttention2d(in_channels, out_channels, kernel_size=5 if kernel_size is None else kernel_size,
                            heads=heads, stride=stride, border=border, backend=backend)
