"""The attention weights alpha: relation delta, then gamma (BN-ReLU-1x1-BN-ReLU-1x1).

Both modules map (phi, psi) maps (B, rel, H, W) to weights (B, groups, k*k, H, W), one weight per
channel group (groups = out_planes / share_planes) and footprint offset.

- Pairwise: alpha(x_i, x_j) = softmax_j gamma([delta(x_i, x_j), p_i - p_j]); gamma acts on each
  (i, j) pair alone, a 1x1 conv over a (B, C, k*k, H*W) map; its hidden width is rel_planes. The
  softmax over the footprint is the official code's normalisation.
- Patchwise: alpha(x_R(i)) = gamma(delta(x_R(i))) reshaped to (groups, k*k); gamma acts on each
  pixel's whole-footprint vector, hidden width groups. No softmax, as in the official code.

`update_stats=False` runs the batch norms on batch statistics without touching the running
averages: `san.recompute` calls the module a second time in backward and must not count that
batch twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from san.footprint import windows
from san.position import RelativePosition
from san.relations import pairwise_relation, pairwise_width, patchwise_relation, patchwise_width


def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, update_stats: bool) -> torch.Tensor:
    uses_batch_stats = bn.training or bn.running_mean is None
    if update_stats or not uses_batch_stats:
        return bn(x)
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


class Gamma(nn.Module):
    """gamma = BN-ReLU-1x1 (no bias)-BN-ReLU-1x1 (bias), as the paper and the official code define it."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        x = self.conv1(F.relu(batch_norm(self.bn1, x, update_stats)))
        return self.conv2(F.relu(batch_norm(self.bn2, x, update_stats)))


class PairwiseWeights(nn.Module):
    def __init__(self, relation: str, rel_planes: int, groups: int, kernel_size: int, padding: str,
                 position: bool = True):
        super().__init__()
        self.relation, self.kernel_size, self.padding, self.groups = relation, kernel_size, padding, groups
        self.position = RelativePosition(kernel_size, padding) if position else None
        width = pairwise_width(relation, rel_planes) + (2 if position else 0)
        self.gamma = Gamma(width, rel_planes, groups)

    def forward(self, query: torch.Tensor, key: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        b, c, h, w = query.shape
        delta = pairwise_relation(self.relation, query.reshape(b, c, 1, h * w), windows(key, self.kernel_size,
                                                                                        self.padding))
        if self.position is not None:
            pos = self.position(h, w, query.device).to(delta.dtype)
            delta = torch.cat([delta, pos.expand(b, -1, -1, -1)], dim=1)
        logits = self.gamma(delta, update_stats)  # (B, groups, k*k, H*W)
        return logits.softmax(dim=2).view(b, self.groups, self.kernel_size ** 2, h, w)


class PatchwiseWeights(nn.Module):
    def __init__(self, relation: str, rel_planes: int, groups: int, kernel_size: int, padding: str):
        super().__init__()
        self.relation, self.kernel_size, self.padding, self.groups = relation, kernel_size, padding, groups
        kk = kernel_size * kernel_size
        self.gamma = Gamma(patchwise_width(relation, rel_planes, kernel_size), groups, groups * kk)

    def forward(self, query: torch.Tensor, key: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
        b, c, h, w = query.shape
        delta = patchwise_relation(self.relation, query.reshape(b, c, h * w),
                                   lambda: windows(query, self.kernel_size, self.padding),
                                   windows(key, self.kernel_size, self.padding))
        weights = self.gamma(delta.view(b, -1, h, w), update_stats)  # (B, groups * k*k, H, W), group-major
        return weights.view(b, self.groups, self.kernel_size ** 2, h, w)
