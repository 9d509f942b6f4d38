"""SAN's self-attention operation (Zhao, Jia, Koltun 2020): the spatial mixer of every SAN block.

    pairwise   y_i = sum_{j in R(i)} alpha(x_i, x_j) (.) beta(x_j)
    patchwise  y_i = sum_{j in R(i)} alpha(x_R(i))_j (.) beta(x_j)

phi, psi (rel_planes channels) and beta (out_planes channels) are 1x1 convs with bias, as in the
official code; alpha comes from `san.weights`, one weight per group of out_planes / share_planes
channels; the sum runs over the k x k footprint R(i) (`san.footprint` for the padding rule).

backend="lean" (default) keeps only phi, psi, alpha and beta for backward (`san.recompute`,
`san.aggregation`); backend="unfold" is the straightforward formulation on plain autograd, the
reference the tests and bench/san.py compare against. Both compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from common.inspect.capture import AttentionLayer, windows_to_dense
from san.aggregation import aggregate, aggregate_unfold
from san.footprint import check_padding, fold_reflected
from san.recompute import recompute_in_backward
from san.relations import PAIRWISE, PATCHWISE
from san.weights import PairwiseWeights, PatchwiseWeights

MODES = {"pairwise": PAIRWISE, "patchwise": PATCHWISE}
DEFAULT_RELATION = {"pairwise": "subtraction", "patchwise": "concatenation"}  # the official models'
BACKENDS = ("lean", "unfold")


class SelfAttention2d(AttentionLayer, nn.Module):
    """(B, in_channels, H, W) -> (B, out_planes, H, W); see the module docstring.

    Recording (`common.inspect.capture`): one map per call, the footprint weights averaged over the channel
    groups (heads = 1) and placed on the image pixels they read (a reflected offset counts for its
    mirrored pixel). Pairwise maps are probabilities; patchwise maps are the raw, signed weights.
    """

    def __init__(self, in_channels: int, rel_planes: int, out_planes: int, kernel_size: int = 7,
                 mode: str = "pairwise", relation: str | None = None, share_planes: int = 8,
                 padding: str = "reflection", position: bool = True, backend: str = "lean"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        relation = relation or DEFAULT_RELATION[mode]
        if relation not in MODES[mode]:
            raise ValueError(f"{mode} relation must be one of {', '.join(MODES[mode])}, got {relation!r}")
        if out_planes % share_planes:
            raise ValueError(f"out_planes ({out_planes}) must be divisible by share_planes ({share_planes})")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        check_padding(padding)
        self.mode, self.relation, self.kernel_size, self.padding, self.backend = \
            mode, relation, kernel_size, padding, backend
        groups = out_planes // share_planes
        self.query = nn.Conv2d(in_channels, rel_planes, 1)  # phi
        self.key = nn.Conv2d(in_channels, rel_planes, 1)  # psi
        self.value = nn.Conv2d(in_channels, out_planes, 1)  # beta
        if mode == "pairwise":
            self.weights = PairwiseWeights(relation, rel_planes, groups, kernel_size, padding, position)
        else:
            self.weights = PatchwiseWeights(relation, rel_planes, groups, kernel_size, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.query(x), self.key(x), self.value(x)
        if self.backend == "unfold":
            alpha = self.weights(query, key)
            out = aggregate_unfold(alpha, value, self.kernel_size, self.padding)
        else:
            lean = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad) \
                and not torch.compiler.is_compiling()
            alpha = recompute_in_backward(self.weights, query, key) if lean else self.weights(query, key)
            out = aggregate(alpha, value, self.kernel_size, self.padding)
        if self.recording:
            grid = tuple(x.shape[-2:])
            self.record(lambda index: self.footprint_maps(alpha.detach(), index), grid, grid)
        return out

    def footprint_maps(self, alpha: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """alpha (B, G, k*k, H, W) -> (B, 1, Q, H, W): group-averaged weights on image coordinates."""
        weights = alpha.float().mean(1, keepdim=True).permute(0, 1, 3, 4, 2)  # (B, 1, H, W, k*k)
        if self.padding == "reflection":
            weights = fold_reflected(weights, self.kernel_size)
        return windows_to_dense(weights, self.kernel_size, tuple(alpha.shape[-2:]), index)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, relation={self.relation!r}, kernel_size={self.kernel_size}, "
                f"padding={self.padding!r}, backend={self.backend!r}")
