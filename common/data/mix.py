"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of whole training batches, for any loader.

With probability `prob` a batch is mixed with a reordering of itself: the reverse order (sample i with sample
B-1-i, timm's choice; partners="reverse") or a random permutation drawn per batch (torch.randperm in most
official scripts; partners="permutation", where a sample may draw itself). CutMix with probability
`switch_prob` when both are on, else mixup; lam ~ Beta(alpha, alpha):

    mixup:  x = lam x + (1 - lam) x_p                         y = lam y + (1 - lam) y_p
    CutMix: x = x with a box of x_p pasted (area 1 - lam)     y likewise, lam = the exact unpasted area

Targets become class probabilities (B, classes), which cross-entropy takes directly (label smoothing
included). Each batch's draws come from a NumPy generator seeded by (seed, epoch, step), so a resumed run mixes
exactly as the interrupted one would have.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class MixedBatches:
    """Wraps a training loader; yields (mixed images, target probabilities (B, classes))."""

    def __init__(self, loader, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0, partners: str = "reverse"):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixedBatches needs mixup_alpha > 0 or cutmix_alpha > 0")
        if partners not in ("reverse", "permutation"):
            raise ValueError(f"partners must be 'reverse' or 'permutation', got {partners!r}")
        self.partners = partners
        self.loader, self.num_classes = loader, num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.seed = prob, switch_prob, seed
        self.num_samples = loader.num_samples
        self._epoch = self._start = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)
        self._epoch, self._start = epoch, start_step

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for step, (x, y) in enumerate(self.loader, start=self._start):
            yield self.mix(x, y, np.random.default_rng((self.seed, self._epoch, step)))
        self._start = 0

    def mix(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        target = F.one_hot(y, self.num_classes).to(x.dtype)
        if rng.random() >= self.prob:
            return x, target
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = self.partner_index(len(x), rng).to(x.device)
        if use_cutmix:
            top, left, height, width = cutmix_box(x.shape[-2:], lam, rng)
            box = (..., slice(top, top + height), slice(left, left + width))
            x = x.clone()
            x[box] = x[box][partner]
            lam = 1.0 - height * width / (x.shape[-2] * x.shape[-1])
        else:
            x = lam * x + (1.0 - lam) * x[partner]
        return x, lam * target + (1.0 - lam) * target[partner]

    def partner_index(self, batch: int, rng: np.random.Generator) -> torch.Tensor:
        """Sample i is mixed with sample partner[i]."""
        if self.partners == "permutation":
            return torch.from_numpy(rng.permutation(batch))
        return torch.arange(batch - 1, -1, -1)


def cutmix_box(size, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box of area ~(1 - lam) of the image, centred uniformly, clipped."""
    h, w = size
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return top, left, bottom - top, right - left
