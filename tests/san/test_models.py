"""SAN networks: official parameter counts, the CIFAR layout, training steps, autocast, export, attention capture."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from common.inspect.capture import record_attention
from common.registry import create_model
from san import SAN, SelfAttention2d
from tests.helpers import assert_learns

OFFICIAL = {"san10_pairwise": 10_531_848, "san10_patchwise": 11_841_124, "san15_pairwise": 14_065_436,
            "san15_patchwise": 16_181_310, "san19_pairwise": 17_596_156, "san19_patchwise": 20_518_470}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", OFFICIAL)
def test_imagenet_parameter_count_is_the_official_one(name):
    with torch.device("meta"):  # counts without allocating or initialising 10-20M weights
        model = create_model(name)
    assert n_params(model) == OFFICIAL[name]


@pytest.mark.parametrize("name", OFFICIAL)
def test_cifar_training_step(name):
    torch.manual_seed(0)
    model = create_model(name, stem="cifar", num_classes=10)
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
    logits = model(torch.randn(2, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert sizes == [32, 32, 16, 8, 4]  # never below the window radius 3 + 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_imagenet_layout_cannot_run_at_32x32():
    model = create_model("san10_pairwise", num_classes=10)  # 32 -> 16, 8, 4, 2, 1
    with pytest.raises(ValueError, match="stem='cifar'"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("option, value", [("relation", "star"), ("stem", "conv"), ("padding", "replicate")])
def test_bad_options_are_user_errors(option, value):
    with pytest.raises(UserError, match=f"{option}|{value}"):
        create_model("san10_pairwise", **{option: value})


def tiny(mode="pairwise", **attention):
    torch.manual_seed(0)
    return SAN((1, 1), widths=(32, 64), kernels=(3, 5), pools=(False, True), num_classes=5, mode=mode, **attention)


@pytest.mark.parametrize("name", OFFICIAL)
def test_bf16_autocast_forward(name):
    torch.manual_seed(0)
    model = create_model(name, stem="cifar", num_classes=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(1, 3, 32, 32))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_exports():
    model, x = tiny().eval(), torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_recorded_maps_shape_and_normalisation(mode):
    model = tiny(mode)
    with record_attention(model) as maps:
        model(torch.randn(2, 3, 12, 10))
    layers = [n for n, m in model.named_modules() if isinstance(m, SelfAttention2d)]
    assert [m.name for m in maps] == layers
    for m, grid in zip(maps, [(12, 10), (6, 5)]):
        assert m.weights.shape == (2, 1, *grid, *grid)  # groups averaged: one map per query pixel
        if mode == "pairwise":  # probabilities over the footprint; reflected offsets land on image pixels
            assert torch.allclose(m.weights.sum((-2, -1)), torch.ones(1), atol=1e-5)
    with record_attention(model, queries=[(0, 0), (5, 5)]) as maps:
        model(torch.randn(2, 3, 12, 10))
    assert maps[0].weights.shape == (2, 1, 2, 12, 10)


def test_zero_padding_leaves_mass_outside_the_image():
    model = tiny(padding="zeros")
    with record_attention(model) as maps:
        model(torch.randn(1, 3, 12, 10))
    mass = maps[0].weights.sum((-2, -1))[0, 0]  # 3 x 3 window
    assert torch.allclose(mass[1:-1, 1:-1], torch.ones(1), atol=1e-5)
    assert (mass[0] < 1 - 1e-4).all() and (mass[:, 0] < 1 - 1e-4).all()


def test_maps_are_built_only_when_recording(monkeypatch):
    model = tiny()
    monkeypatch.setattr(SelfAttention2d, "footprint_maps", lambda *a: pytest.fail("built without recording"))
    model(torch.randn(1, 3, 8, 8))


def test_channels_last_gives_the_same_result():
    model, x = tiny().eval(), torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def test_init_torch_default_leaves_pytorch_init_as_the_official_code():
    torch.manual_seed(0)
    official = create_model("san10_pairwise", stem="cifar", num_classes=10, init="torch_default")
    ours = create_model("san10_pairwise", stem="cifar", num_classes=10)
    conv, our_conv = official.stages[1][2].expand, ours.stages[1][2].expand  # the first block's 1x1 expansion
    fan_in = conv.weight[0].numel()
    assert conv.weight.abs().max() <= fan_in ** -0.5 and conv.bias.abs().max() > 0  # PyTorch's U(+-1/sqrt(fan_in))
    assert our_conv.bias.abs().max() == 0
    assert our_conv.weight.std().item() == pytest.approx((2 / conv.weight.shape[0]) ** 0.5, rel=0.1)  # fan_out
    with pytest.raises(UserError, match="init"):
        create_model("san10_patchwise", init="xavier")


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_a_small_san_learns(write_config, tmp_path, mode):
    assert_learns(write_config, tmp_path, {"name": "san", "layers": [1, 1], "widths": [32, 64], "kernels": [3, 3],
                                           "pools": [False, True], "mode": mode})


def test_the_configurable_san_checks_its_options():
    model = create_model("san", layers=[1, 2], widths=[32, 64], kernels=[3, 5], pools=[False, True], num_classes=4,
                         stem_kernel=3)
    assert [len(stage) for stage in model.stages] == [2 + 1 + 2, 2 + 2 + 2]  # pool, 1x1 conv, blocks, BN, ReLU
    assert model.stem[0].kernel_size == (3, 3) and create_model("san").stem[0].kernel_size == (1, 1)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    for options, message in [({"widths": [24, 64]}, "multiple of 16 and of 4 \\* share_planes"),
                              ({"kernels": [3, 4]}, "odd integer"),
                              ({"pools": [True]}, "one entry per stage"),
                              ({"stem_kernel": 2}, "stem_kernel must be an odd integer"),
                              ({"mode": "groupwise"}, "mode must be one of"),
                              ({"relation": "star"}, "pairwise relation must be one of")]:
        kwargs = {"layers": [1, 1], "widths": [32, 64], "kernels": [3, 3], "pools": [False, True], **options}
        with pytest.raises(UserError, match=message):
            create_model("san", **kwargs)
