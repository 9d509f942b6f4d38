"""Model / mixer / stem registries and their errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.registry import MIXERS, Registry, create_mixer, create_model, list_models


def test_list_models_with_pattern():
    assert {"resnet18", "resnet26", "resnet38", "resnet50", "wrn28_10"} <= set(list_models())
    assert list_models("resnet[235]*") == ["resnet26", "resnet38", "resnet50"]
    assert list_models("nothing*") == []


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown model 'resnet5' \(did you mean 'resnet50'\?\); available: .*wrn28_10"):
        create_model("resnet5")


def test_unknown_keyword_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"model 'resnet50' has no option 'num_class' \(did you mean 'num_classes'\?\)"
                                        r"; valid options: num_classes, stem"):
        create_model("resnet50", num_class=10)


def test_unknown_mixer_and_mixer_option():
    with pytest.raises(UserError, match="unknown mixer 'attn'"):
        create_model("resnet18", mixer="attn")
    with pytest.raises(UserError, match="mixer 'conv' has no option 'heads'"):
        create_model("resnet18", mixer_kwargs={"heads": 4})


def test_registering_twice_is_an_error_and_decorator_keeps_the_class():
    registry = Registry("thing")

    @registry.register
    def thing_a():
        return 1

    assert registry.create("thing_a") == 1
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(lambda: 2, name="thing_a")


def test_a_registered_mixer_builds_a_whole_network():
    """The point of the mixer factory: a new spatial mixer is one registration away from every backbone."""

    @MIXERS.register(name="test_depthwise")
    class DepthwiseMixer(nn.Module):
        def __init__(self, in_channels, out_channels, stride=1, kernel_size=3):
            super().__init__()
            self.dw = nn.Conv2d(in_channels, in_channels, kernel_size, stride, kernel_size // 2, groups=in_channels)
            self.pw = nn.Conv2d(in_channels, out_channels, 1)

        def forward(self, x):
            return self.pw(self.dw(x))

    try:
        model = create_model("resnet26", num_classes=10, stem="cifar", mixer="test_depthwise",
                             mixer_kwargs={"kernel_size": 5}, downsample="avgpool")
        mixers = [m for m in model.modules() if isinstance(m, DepthwiseMixer)]
        assert len(mixers) == 8 and all(m.dw.kernel_size == (5, 5) for m in mixers)
        # avgpool downsampling: the mixer runs at stride 1 and a 2x2 average pool follows it
        assert all(m.dw.stride == (1, 1) for m in mixers)
        assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 3
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert isinstance(create_mixer("test_depthwise", 8, 16, stride=2), DepthwiseMixer)
    finally:
        MIXERS._entries.pop("test_depthwise")
