"""Vision Transformer trained from scratch on small data (Dosovitskiy et al. 2020; Lee et al. 2021).

Importing the package registers the models vit, vit_cifar, vit_cifar_spt_lsa and vit_re.
"""

from vit.model import VisionTransformer
from vit import models  # noqa: F401  (registration)

__all__ = ["VisionTransformer"]
