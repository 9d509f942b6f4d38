"""On the Relationship between Self-Attention and Convolutional Layers (Cordonnier, Loukas, Jaggi 2020).

Importing the package registers the models `sa_conv` (keyword `attention`), `sa_quadratic`,
`sa_quadratic_aniso`, `sa_learned` and `sa_learned_content`, and the ResNet mixer `gaussian` (sa_conv/mixer.py).
`conv_as_attention` is Theorem 1; `sa_conv.gauss_viz` draws the Gaussian heads (`draw_checkpoints`, `has_gaussian_heads`).
"""

from sa_conv import gauss_viz, mixer, model  # noqa: F401  (registration: models, the `gaussian` mixer, gauss_viz)
from sa_conv.attention import ContentScores, GaussianScores, ImageSelfAttention, LearnedPositionScores
from sa_conv.model import SelfAttentionImageClassifier
from sa_conv.theorem1 import QuadraticAttention2d, conv_as_attention

__all__ = ["ContentScores", "GaussianScores", "ImageSelfAttention", "LearnedPositionScores", "QuadraticAttention2d",
           "SelfAttentionImageClassifier", "conv_as_attention"]
