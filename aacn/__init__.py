"""Attention Augmented Convolutional Networks (Bello et al. 2019).

Importing the package registers the mixer `aa` and the
models aa_resnet50, aa_wrn28_10, cnn3 and aa_cnn3.
"""

from aacn.layer import AugmentedConv2d
from aacn import cnn3, mixer, models  # noqa: F401  (registration)

__all__ = ["AugmentedConv2d"]
