"""The shared ResNet backbone: baselines' parameter counts, stems, downsampling modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.models.resnet import ConvMixer
from common.registry import create_model
from tests.helpers import assert_learns, metafile_entry, paper_gflops


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, kwargs, paper", [
    ("resnet26", {}, 13.7e6),
    ("resnet38", {}, 19.6e6),
    ("resnet50", {}, 25.6e6),
    ("resnet18", {"stem": "cifar", "num_classes": 10}, 11.17e6),
    ("wrn28_10", {"num_classes": 100}, 36.5e6),
])
def test_baseline_parameter_counts_match_the_papers(name, kwargs, paper):
    assert abs(n_params(create_model(name, **kwargs)) - paper) / paper < 0.01


def test_exact_counts_of_the_reference_implementations():
    assert n_params(create_model("resnet50")) == 25_557_032  # torchvision
    assert n_params(create_model("resnet18", stem="cifar", num_classes=10)) == 11_173_962
    assert n_params(create_model("wrn28_10", num_classes=10)) == 36_479_194  # official WRN code, CIFAR-10


@pytest.mark.parametrize("stem, size, feature", [("imagenet", 64, 2), ("cifar", 32, 4)])
def test_stems_set_the_resolution(stem, size, feature):
    model = create_model("resnet18", stem=stem, num_classes=7)
    x = torch.randn(2, 3, size, size)
    assert model.forward_features(x).shape == (2, 512, feature, feature)
    assert model(x).shape == (2, 7)


def test_non_square_inputs_and_generic_resnet():
    model = create_model("resnet", block="bottleneck", layers=[1, 1], widths=[8, 16], stem_width=8, num_classes=3)
    assert model(torch.randn(2, 3, 20, 12)).shape == (2, 3)


def test_downsample_modes_place_the_stride():
    strided = create_model("resnet26", stem="cifar", num_classes=10)
    pooled = create_model("resnet26", stem="cifar", num_classes=10, downsample="avgpool")
    s_mixers = [m for m in strided.modules() if isinstance(m, ConvMixer)]
    p_mixers = [m for m in pooled.modules() if isinstance(m, ConvMixer)]
    assert sorted({m.stride for m in s_mixers}) == [(1, 1), (2, 2)]
    assert {m.stride for m in p_mixers} == {(1, 1)}
    assert n_params(strided) == n_params(pooled)
    x = torch.randn(2, 3, 32, 32)
    assert strided.forward_features(x).shape == pooled.forward_features(x).shape == (2, 2048, 4, 4)


def test_wrn_is_pre_activation_and_mixes_first_conv_only_when_asked():
    model = create_model("wrn28_10", num_classes=10)
    block = model.stages[0][0]
    assert block.preact and isinstance(model.final_act[0], nn.BatchNorm2d)
    assert block.bn1.num_features == 16  # pre-activation: BN on the block input
    small = create_model("resnet", layers=[1], widths=[8], stem_width=8, basic_mixers="first",
                         mixer_kwargs={"kernel_size": 5})
    block = small.stages[0][0]
    assert block.mix1.kernel_size == (5, 5) and block.mix2.kernel_size == (3, 3)


def test_zero_init_residual_makes_blocks_identity_at_init():
    model = create_model("resnet", layers=[1, 1], widths=[8, 8], stem_width=8, strides=[1, 1],
                         zero_init_residual=True).eval()
    x = torch.randn(1, 3, 16, 16)
    stem_out = model.stem(x)
    assert torch.allclose(model.stages(stem_out), stem_out)


def test_mixer_options_can_differ_per_stage():
    model = create_model("resnet", layers=[1, 1], widths=[8, 16], stem_width=8,
                         mixer_kwargs=[{"kernel_size": 5}, {"kernel_size": 1}])
    assert model.stages[0][0].mix1.kernel_size == (5, 5) and model.stages[1][0].mix1.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="one entry per stage"):
        create_model("resnet", layers=[1, 1], widths=[8, 16], mixer_kwargs=[{}])


def test_init_kaiming_or_torch_default():
    torch.manual_seed(0)
    kaiming = create_model("resnet18", stem="cifar", num_classes=10)
    default = create_model("resnet18", stem="cifar", num_classes=10, init="torch_default")
    for model, expect_kaiming in ((kaiming, True), (default, False)):
        conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][5]
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * conv.weight[0, 0].numel()
        std = conv.weight.std().item()
        if expect_kaiming:
            assert std == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
        else:  # PyTorch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))
            assert conv.weight.abs().max() <= fan_in ** -0.5 and std == pytest.approx((3 * fan_in) ** -0.5, rel=0.05)
    with pytest.raises(ValueError, match="init"):
        create_model("resnet18", init="orthogonal")


@pytest.mark.parametrize("name", ["resnet", "resnet18", "resnet26", "resnet38", "resnet50", "wrn28_10"])
def test_head_init_normal_is_mmpretrains_linear_cls_head(name):
    torch.manual_seed(0)
    default = create_model(name, num_classes=100).fc
    normal = create_model(name, num_classes=100, head_init="normal").fc
    bound = default.in_features ** -0.5
    assert default.weight.abs().max() <= bound and default.bias.abs().max() > 0
    assert default.weight.std().item() == pytest.approx((3 * default.in_features) ** -0.5, rel=0.05)
    assert normal.weight.std().item() == pytest.approx(0.01, rel=0.05) and normal.weight.mean().abs() < 1e-3
    assert torch.count_nonzero(normal.bias) == 0
    with pytest.raises(ValueError, match="head_init"):
        create_model(name, head_init="zeros")


@pytest.mark.parametrize("name", ["resnet26", "resnet50"])
def test_imagenet_resnets_count_the_papers_flops(name):
    ours, paper, _ = paper_gflops(metafile_entry("baselines", name))
    assert abs(ours / paper - 1) < 0.10, (ours, paper)


def test_conv_resnet_learns(write_config, tmp_path):
    assert_learns(write_config, tmp_path, {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16],
                                           "stem_width": 8})
