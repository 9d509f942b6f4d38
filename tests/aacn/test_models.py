"""AACN networks: widths from kappa/upsilon, placement, the paper's parameter counts, end-to-end training step."""

from __future__ import annotations

import pytest
import torch

from aacn import AugmentedConv2d
from aacn.mixer import attention_widths
from common.inspect.capture import record_attention
from common.inspect.timing import count_macs
from common.models.resnet import ResNet
from common.registry import create_mixer, create_model
from tests.helpers import assert_learns


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("out_channels, expected", [
    (160, (160, 16)),  # WRN stage 1: kappa gives 32 key channels, the 20-per-head minimum 160
    (640, (160, 64)),
    (128, (160, 16)),  # ResNet-50 stage 2: upsilon 12.8 rounds to 2 per head
    (512, (160, 48)),
])
def test_attention_widths_follow_kappa_upsilon_and_the_key_minimum(out_channels, expected):
    assert attention_widths(out_channels, kappa=0.2, upsilon=0.1, heads=8, min_key_head_dim=20) == expected


def test_attention_widths_without_a_minimum_are_multiples_of_the_heads():
    assert attention_widths(64, kappa=0.2, upsilon=0.1, heads=4) == (12, 8)
    assert attention_widths(8, kappa=2.0, upsilon=1.0, heads=4) == (16, 8)  # dv capped at out_channels


def test_the_mixer_builds_an_augmented_conv_with_those_widths():
    m = create_mixer("aa", 64, 160, stride=2, max_size=16)
    assert isinstance(m, AugmentedConv2d) and (m.dk, m.dv, m.heads, m.stride) == (160, 16, 8, 2)
    assert m.conv.out_channels == 144 and m.relative.height.shape == (31, 20)


def augmented(model):
    return [name for name, m in model.named_modules() if isinstance(m, AugmentedConv2d)]


def test_aa_resnet50_placement_and_parameter_count():
    model = create_model("aa_resnet50")
    names = augmented(model)
    assert len(names) == 4 + 6 + 3 and not any(n.startswith("stages.0.") for n in names)
    assert all(n.endswith(".mix") for n in names)
    assert abs(n_params(model) - 25.8e6) / 25.8e6 < 0.01


def test_aa_wrn28_10_augments_the_first_conv_of_each_block():
    model = create_model("aa_wrn28_10")
    names = augmented(model)
    assert len(names) == 12 and all(n.endswith(".mix1") for n in names)
    assert abs(n_params(model) - 36.2e6) / 36.2e6 < 0.01
    assert n_params(model) < n_params(create_model("wrn28_10"))


def test_cnn3_pair():
    conv, aa = create_model("cnn3"), create_model("aa_cnn3")
    assert n_params(conv) == 316708 and n_params(aa) == 306832
    assert [m.relative.max_height for m in aa.modules() if isinstance(m, AugmentedConv2d)] == [32, 16, 8]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert conv.eval()(x).shape == aa.eval()(x).shape == (2, 100)


@pytest.mark.parametrize("block, basic_mixers, preact", [("bottleneck", "all", False), ("basic", "first", True)])
def test_end_to_end_backward_through_a_small_resnet(block, basic_mixers, preact):
    torch.manual_seed(0)
    model = ResNet(block=block, layers=(1, 1), widths=(8, 16), stem="cifar", stem_width=8, num_classes=3,
                   mixer="aa", mixer_kwargs={"heads": 2, "min_key_head_dim": 2, "kappa": 0.5, "upsilon": 0.5,
                                             "max_size": 12},
                   preact=preact, basic_mixers=basic_mixers)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 12, 10)), torch.tensor([0, 2]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert torch.isfinite(loss) and not missing
    with record_attention(model) as maps:
        model(torch.randn(2, 3, 12, 10))
    assert [m.key_grid for m in maps] == [(12, 10), (6, 5)]  # the stride-2 block attends on the pooled grid


def test_the_time_task_can_count_the_macs_of_an_aa_network():
    # FlopCounterMode's module tracker hooks every module output under no_grad.
    model = ResNet(block="basic", layers=(1,), widths=(8,), stem="cifar", stem_width=8, num_classes=3,
                   mixer="aa", mixer_kwargs={"heads": 2, "min_key_head_dim": 2, "max_size": 8})
    assert count_macs(model, (3, 8, 8)) > 0


def test_a_network_of_augmented_convolutions_learns(write_config, tmp_path):
    assert_learns(write_config, tmp_path, {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16],
                                           "stem_width": 8, "mixer": "aa", "mixer_kwargs": [
                                               {"heads": 2, "min_key_head_dim": 2, "max_size": 16},
                                               {"heads": 2, "min_key_head_dim": 2, "max_size": 8}]})
