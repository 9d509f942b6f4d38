"""SASA ResNets: the paper's parameter counts, an end-to-end backward, the attention-capture contract."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from common.inspect.capture import record_attention
from common.models.resnet import ResNet
from common.registry import create_model
from sasa import BlockSelfAttention2d, LocalSelfAttention2d
from tests.helpers import assert_learns


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stem", ["imagenet", "attention"])
@pytest.mark.parametrize("name, paper", [("sasa_resnet26", 10.3e6), ("sasa_resnet38", 14.1e6),
                                         ("sasa_resnet50", 18.0e6)])
def test_parameter_counts_match_table_1(name, paper, stem):
    assert abs(n_params(create_model(name, stem=stem)) - paper) / paper < 0.01


def test_every_bottleneck_mixer_is_sasa_and_downsamples_by_pooling():
    model = create_model("sasa_resnet26", stem="cifar", num_classes=10, kernel_size=5, heads=4)
    layers = [m for m in model.modules() if isinstance(m, LocalSelfAttention2d)]
    assert len(layers) == 1 + 2 + 4 + 1
    assert all(m.kernel_size == 5 and m.heads == 4 and isinstance(m.pool, torch.nn.Identity) for m in layers)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_unknown_stem_is_a_user_error():
    with pytest.raises(UserError, match="stem must be one of"):
        create_model("sasa_resnet26", stem="conv")


def tiny(stem="cifar"):
    torch.manual_seed(0)
    return ResNet(block="bottleneck", layers=(1, 1), widths=(8, 16), stem=stem, stem_width=8, num_classes=3,
                  mixer="sasa", mixer_kwargs={"kernel_size": 3, "heads": 2}, downsample="avgpool")


@pytest.mark.parametrize("stem", ["cifar", "attention_cifar", "attention"])
def test_end_to_end_backward_reaches_every_parameter(stem):
    model = tiny(stem)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 2]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and torch.isfinite(loss)


def test_one_recorded_map_per_attention_layer():
    model = tiny("attention_cifar")
    with record_attention(model) as maps:
        model(torch.randn(2, 3, 16, 12))
    attention = [n for n, m in model.named_modules() if isinstance(m, (LocalSelfAttention2d, BlockSelfAttention2d))]
    assert [m.name for m in maps] == attention and len(attention) == 3
    grids = [(16, 12), (16, 12), (16, 12)]  # stem, stage 1, stage 2 (its attention runs before the pool)
    for m, grid, heads in zip(maps, grids, (4, 2, 2)):
        assert m.weights.shape == (2, heads, *grid, *grid)
        assert torch.allclose(m.weights.sum((-2, -1)), torch.ones(1), atol=1e-5)


def test_a_network_of_sasa_layers_learns(write_config, tmp_path):
    # every spatial mixer is a SASA layer: the network can only fit the images through attention and the stem
    assert_learns(write_config, tmp_path, {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16],
                                           "stem_width": 8, "mixer": "sasa", "downsample": "avgpool",
                                           "mixer_kwargs": {"kernel_size": 3, "heads": 2}})
