"""Stand-Alone Self-Attention in Vision Models (Ramachandran et al. 2019).

Importing the package registers the `sasa` mixer, the `attention` and
`attention_cifar` stems and the models sasa_resnet26/38/50.
"""

from sasa.layer import LocalSelfAttention2d
from sasa.block_attention import BlockSelfAttention2d
from sasa import models, stem  # noqa: F401  (registration)

__all__ = ["LocalSelfAttention2d", "BlockSelfAttention2d"]
