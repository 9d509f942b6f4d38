"""The `gaussian` mixer: the paper's Gaussian heads in the ResNet backbone (configs/quickstart/sa_conv.yaml)."""

import torch

import sa_conv  # noqa: F401  (registers the mixer)
from common.inspect.capture import record_attention
from common.registry import create_mixer, create_model
from sa_conv.attention import GaussianScores
from tests.helpers import assert_learns


def test_mixer_maps_channels_and_downsamples_by_pooling_after_the_attention():
    torch.manual_seed(0)
    mixer = create_mixer("gaussian", 8, 12, stride=2, heads=3)
    x = torch.randn(2, 8, 6, 10)
    assert mixer(x).shape == (2, 12, 3, 5)
    assert mixer.attention.value.weight.shape == (12, 3 * 8)  # every head mixes the full 8-channel input
    full = create_mixer("gaussian", 8, 12, heads=3)
    full.load_state_dict(mixer.state_dict())
    assert torch.allclose(mixer(x), torch.nn.functional.avg_pool2d(full(x), 2), atol=1e-6)


def test_mixer_is_the_papers_positional_attention():
    """Every query's output is the value projection of the heads' Gaussian-weighted averages of the input."""
    torch.manual_seed(0)
    mixer = create_mixer("gaussian", 4, 5, heads=2)
    x = torch.randn(1, 4, 5, 6)
    scores = mixer.attention.scores
    assert isinstance(scores, GaussianScores) and not scores.anisotropic
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
    qy, qx = 3, 1
    heads = []
    for h in range(2):
        dy, dx = ys - qy - scores.centres[h, 0], xs - qx - scores.centres[h, 1]
        w = (-0.5 * scores.spreads[h] ** 2 * (dy ** 2 + dx ** 2)).flatten().softmax(0)
        heads.append(x[0].flatten(1) @ w)
    expected = mixer.attention.value(torch.cat(heads))
    assert torch.allclose(mixer(x)[0, :, qy, qx], expected, atol=1e-5)
    assert create_mixer("gaussian", 4, 5, heads=2, anisotropic=True).attention.scores.anisotropic


def test_the_quickstart_network_records_its_attention_for_viz():
    model = create_model("resnet", block="basic", layers=[1, 1], widths=[8, 16], stem_width=8,
                         mixer=["conv", "gaussian"], mixer_kwargs=[{}, {"heads": 3}], downsample="avgpool")
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(2, 3, 16, 16))
    assert [(m.name, tuple(m.weights.shape)) for m in maps] == [
        ("stages.1.0.mix1.0.attention", (2, 3, 16, 16, 16, 16)),  # attends at 16x16, then the 2x2 pool
        ("stages.1.0.mix2.attention", (2, 3, 8, 8, 8, 8))]
    assert torch.allclose(maps[0].weights.flatten(-2).sum(-1), torch.ones(()), atol=1e-5)


def test_the_gaussian_mixer_network_learns(write_config, tmp_path):
    assert_learns(write_config, tmp_path, {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16],
                                           "stem_width": 8, "mixer": "gaussian", "downsample": "avgpool",
                                           "mixer_kwargs": {"heads": 3}})
