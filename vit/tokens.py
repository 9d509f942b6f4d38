"""Images to patch tokens: the plain patch embedding and Shifted Patch Tokenization (Lee et al. 2021).

Both flatten non-overlapping p x p patches into vectors of C*p*p values and project them linearly to
`dim`. SPT first concatenates the image with four copies of itself shifted by `shift` pixels (zeros
shifted in), so each token also sees the pixels just outside its patch, then normalises the longer patch
vector with a LayerNorm before the projection:

    SPT(x) = Linear(LN(patchify([x, S_1 x, S_2 x, S_3 x, S_4 x])))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (dy, dx) unit directions of the four shifted copies; "diagonal" is the paper's, "cardinal" the popular one.
SHIFT_DIRECTIONS = {
    "diagonal": ((-1, -1), (-1, 1), (1, -1), (1, 1)),
    "cardinal": ((-1, 0), (1, 0), (0, -1), (0, 1)),
}


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): row-major patches, each flattened (row, col, channel)."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def shift_image(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zero where that falls outside the image."""
    h, w = x.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad, pad, pad, pad))
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


class PatchEmbedding(nn.Module):
    """Linear projection of flattened p x p patches (equal to a p x p convolution with stride p)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size ** 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size))


class ShiftedPatchTokenization(nn.Module):
    """SPT: patches of the image and its four shifted copies, LayerNorm, linear projection.

    shift: pixels each copy is moved by (the paper: half a patch); directions: "diagonal" (the paper and its
    code) or "cardinal" (left, right, up, down, as in a popular re-implementation, with shift 1).
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, shift: int | None = None,
                 directions: str = "diagonal"):
        super().__init__()
        if directions not in SHIFT_DIRECTIONS:
            raise ValueError(f"spt_directions must be one of {', '.join(SHIFT_DIRECTIONS)}, got {directions!r}")
        self.shift = patch_size // 2 if shift is None else shift
        if self.shift < 1:
            raise ValueError(f"the SPT shift must be at least 1 pixel, got {self.shift}")
        self.patch_size, self.directions = patch_size, directions
        patch_dim = 5 * in_chans * patch_size ** 2
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = [x] + [shift_image(x, dy * self.shift, dx * self.shift)
                        for dy, dx in SHIFT_DIRECTIONS[self.directions]]
        return self.proj(self.norm(patchify(torch.cat(copies, dim=1), self.patch_size)))

    def extra_repr(self) -> str:
        return f"shift={self.shift}, directions={self.directions!r}"
