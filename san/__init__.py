"""Exploring Self-attention for Image Recognition (SAN; Zhao, Jia, Koltun, CVPR 2020).

Importing the package registers san10/15/19_pairwise and san10/15/19_patchwise (see san/README.md).
"""

from san.attention import SelfAttention2d
from san.models import SAN, Bottleneck
from san import models  # noqa: F401  (registration)

__all__ = ["SelfAttention2d", "SAN", "Bottleneck"]
