"""Adaptive Attention Span in Computer Vision (Parker, Kumar, Roussy 2020).

Importing the package registers the `adaptive_span` mixer and the models adaptive_span_small/medium/large.
"""

from adaptive_span.mask import AdaptiveSpanMask
from adaptive_span.layer import AdaptiveSpanAttention2d, LocalAttention2d
from adaptive_span import models  # noqa: F401  (registration)

__all__ = ["AdaptiveSpanMask", "AdaptiveSpanAttention2d", "LocalAttention2d"]
