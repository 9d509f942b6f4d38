"""Attention figures (viz, viz_1): panels per layer and head for each family, statistics, errors, TensorBoard."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common import tasks
from common.config import load_config
from common.errors import UserError
from common.inspect import viz
from common.inspect.capture import AttentionLayer, record_attention, windows_to_dense
from common.models.resnet import ResNet
from common.registry import create_model
from tests.helpers import run_main

SASA = {"name": "resnet", "block": "bottleneck", "layers": [1, 1], "widths": [8, 16], "stem": "attention_cifar",
        "stem_width": 8, "mixer": "sasa", "mixer_kwargs": {"kernel_size": 3, "heads": 2}, "downsample": "avgpool"}


@pytest.fixture(autouse=True)
def close_figures():
    """Figures built directly by the tests are closed after each (viz.run closes its own)."""
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def tiny_models() -> dict:
    """One small model per attention family (every attention package of the repository that is here)."""
    from san.models import SAN

    torch.manual_seed(0)
    return {
        "sasa": ResNet(**{k: v for k, v in SASA.items() if k != "name"}, num_classes=3),
        "adaptive_span": ResNet(block="basic", layers=(1, 1), widths=(8, 16), stem_width=8, num_classes=3,
                                mixer="adaptive_span", mixer_kwargs={"heads": 2, "max_span": 2, "span_init": 0.5},
                                downsample="avgpool"),
        "aacn": ResNet(block="basic", layers=(1, 1), widths=(8, 16), stem_width=8, num_classes=3, mixer="aa",
                       mixer_kwargs={"heads": 2, "min_key_head_dim": 2, "max_size": 16}),
        "san_pairwise": SAN((1, 1), widths=(32, 64), kernels=(3, 5), pools=(False, True), num_classes=3),
        "san_patchwise": SAN((1, 1), widths=(32, 64), kernels=(3, 5), pools=(False, True), num_classes=3,
                             mode="patchwise"),
        "sa_conv": create_model("sa_quadratic", num_classes=3, layers=2, heads=4, hidden=8, intermediate=8,
                                image_size=16),
        "vit": create_model("vit", num_classes=3, image_size=16, patch_size=4, dim=8, depth=2, heads=2,
                            spt=True, lsa=True),
    }


@pytest.mark.parametrize("family", list(tiny_models()))
def test_figures_have_one_panel_per_layer_and_head(family):
    model = tiny_models()[family].eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), record_attention(model) as maps:
        model(x)
    expected = [(m.name, h) for m in maps for h in range(m.heads)]
    image = np.zeros((16, 16, 3))
    one = viz.one_query(model, x, (5, 11))
    fig = viz.attention_grid(one, image, viz.FigureText("t"), query=(5, 11), dpi=40)
    assert viz.map_panels(fig) == expected
    for layer, m in zip(one, maps):
        assert layer.maps.shape == (m.heads, *m.key_grid)
    layers, _ = viz.averaged(model, x)
    fig = viz.attention_grid(layers, image, viz.FigureText("t"), dpi=40)
    assert viz.map_panels(fig) == expected
    stats = viz.statistics_figure(layers, "t", dpi=40)
    assert len(stats.axes) == 2
    for layer in layers:
        assert len(layer.mean_distance_px) == len(layer.entropy_nats) == layer.heads


class Uniform(AttentionLayer, nn.Module):
    """Uniform attention: global over the grid, or over a k x k window (out-of-image keys dropped)."""

    def __init__(self, heads=2, window=None):
        super().__init__()
        self.heads, self.window = heads, window

    def forward(self, x):
        b, _, h, w = x.shape
        if self.recording:
            if self.window is None:
                self.record(lambda index: torch.full((b, self.heads, h * w if index is None else len(index), h, w),
                                                     1 / (h * w)), (h, w), (h, w))
            else:
                k = self.window
                valid = F.unfold(torch.ones(1, 1, h, w), k, padding=k // 2).view(1, 1, k * k, h, w)
                weights = (valid / valid.sum(2, keepdim=True)).permute(0, 1, 3, 4, 2).expand(b, self.heads, h, w,
                                                                                             k * k)
                self.record(lambda index: windows_to_dense(weights, k, (h, w), index), (h, w), (h, w))
        return x


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.glob, self.pool, self.local = Uniform(), nn.AvgPool2d(2), Uniform(heads=1, window=3)

    def forward(self, x):
        return self.local(self.pool(self.glob(x)))


def brute_force(grid, image_size, window=None):
    """Mean distance (image pixels) and entropy of uniform attention, summed out query by query."""
    sy, sx = image_size[0] / grid[0], image_size[1] / grid[1]
    cells = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    distances, entropies = [], []
    for qi, qj in cells:
        keys = [(i, j) for i, j in cells if window is None or max(abs(i - qi), abs(j - qj)) <= window // 2]
        distances.append(sum(math.hypot((i - qi) * sy, (j - qj) * sx) for i, j in keys) / len(keys))
        entropies.append(math.log(len(keys)))
    return sum(distances) / len(cells), sum(entropies) / len(cells)


def test_statistics_are_the_brute_force_values_and_chunking_changes_nothing():
    x = torch.randn(2, 4, 8, 6)
    dense, note = viz.averaged(Toy(), x)
    assert note.startswith("all query positions")
    for layer, (grid, window) in zip(dense, [((8, 6), None), ((4, 3), 3)]):
        distance, entropy = brute_force(grid, (8, 6), window)
        assert layer.mean_distance_px == pytest.approx([distance] * layer.heads, rel=1e-9)
        assert layer.entropy_nats == pytest.approx([entropy] * layer.heads, rel=1e-9)
        assert np.allclose(layer.maps.sum((-2, -1)), 1.0) and not layer.signed
    assert dense[1].key_stride == (2.0, 2.0)
    chunked, note = viz.averaged(Toy(), x, budget_bytes=2000)  # forces query chunks on a lattice of every cell
    assert "query pixels" in note
    for a, b in zip(dense, chunked):
        assert a.mean_distance_px == pytest.approx(b.mean_distance_px) and np.allclose(a.maps, b.maps)


def test_adaptive_span_heads_overlay_their_window():
    from matplotlib.patches import Rectangle

    model = tiny_models()["adaptive_span"].eval()
    layer = model.stages[0][0].mix1
    with torch.no_grad():
        layer.span.z.copy_(torch.tensor([0.25, 1.0]))
    assert layer.viz_overlay() == pytest.approx([0.5, 2.0])  # S * z (+ ring_offset 0), in grid pixels
    one = viz.one_query(model, torch.randn(1, 3, 16, 16), (8, 8))
    assert one[0].window_radius == pytest.approx([0.5, 2.0])
    fig = viz.attention_grid(one, np.zeros((16, 16, 3)), viz.FigureText("t"), query=(8, 8), dpi=40)
    squares = [[p.get_width() for p in ax.patches if isinstance(p, Rectangle)]
               for ax in fig.axes if getattr(ax, "panel_key", ("",))[0] == "stages.0.0.mix1"]
    assert one[0].key_stride == (4.0, 4.0)  # the conv stem takes 16x16 to a 4x4 grid
    assert squares == [[2.0 * 4], [5.0 * 4]]  # one square per head, (2r + 1) cells of 4 input pixels


def test_layer_selection():
    layers = [viz.LayerAttention(f"stages.{i // 4}.{i % 4}.mix", (8, 8), (8, 8), (8, 8), np.zeros((1, 8, 8)))
              for i in range(12)]
    shown, note = viz.select_layers(layers, None)
    assert len(shown) == viz.MAX_LAYERS_SHOWN and shown[0] is layers[0] and shown[-1] is layers[-1]
    assert "--layers" in note
    assert viz.select_layers(layers, "all")[0] == layers
    assert [m.name for m in viz.select_layers(layers, "0,-1,stages.1.*")[0]] == \
        ["stages.0.0.mix", "stages.2.3.mix", "stages.1.0.mix", "stages.1.1.mix", "stages.1.2.mix", "stages.1.3.mix"]
    with pytest.raises(UserError, match="no attention layer matches 'head.*'"):
        viz.select_layers(layers, "head.*")
    with pytest.raises(UserError, match="index 12 is out of range"):
        viz.select_layers(layers, "12")


def test_head_selection():
    maps = np.arange(8.0)[:, None, None] * np.ones((8, 8, 8))  # head h's map is all h
    eight = viz.LayerAttention("stages.1.0.mix", (8, 8), (8, 8), (8, 8), maps,
                               window_radius=[float(h) for h in range(8)])
    two = viz.LayerAttention("stages.2.0.mix", (8, 8), (4, 4), (4, 4), np.ones((2, 4, 4)))
    shown, note = viz.select_heads([eight, two], None)  # more than MAX_HEADS_SHOWN heads: one mean panel a layer
    assert [layer.heads for layer in shown] == [1, 1] and "--heads" in note
    assert np.allclose(shown[0].maps[0], 3.5) and shown[0].window_radius is None
    assert shown[0].head_label(0) == "mean of 8 heads" and shown[1].head_label(0) == "mean of 2 heads"
    assert viz.select_heads([two], None) == ([two], None)  # few heads: all of them
    assert viz.select_heads([eight, two], "all") == ([eight, two], None)
    shown, note = viz.select_heads([eight, two], "0,-1")
    assert shown[0].panel_ids == [0, 7] and shown[0].window_radius == [0.0, 7.0] and shown[1].panel_ids == [0, 1]
    assert np.allclose(shown[0].maps[1], 7.0) and note is None
    shown, note = viz.select_heads([eight, two], "5")
    assert [layer.name for layer in shown] == ["stages.1.0.mix"] and "stages.2.0.mix" in note
    with pytest.raises(UserError, match="no layer has those heads"):
        viz.select_heads([eight, two], "8")
    with pytest.raises(UserError, match="give head indices"):
        viz.select_heads([eight], "first")
    fig = viz.attention_grid(viz.select_heads([eight, two], "mean")[0], np.zeros((8, 8, 3)), viz.FigureText("t"),
                             dpi=30)
    assert viz.map_panels(fig) == [("stages.1.0.mix", "mean"), ("stages.2.0.mix", "mean")]
    assert [ax.get_title() for ax in fig.axes if hasattr(ax, "panel_key")] == \
        ["stages.1.0.mix / mean of 8 heads", "stages.2.0.mix / mean of 2 heads"]


@pytest.fixture
def sasa_config(write_config):
    return write_config({"model": SASA, "train": {"epochs": 1}, "log": {"viz_every_epochs": 1}}, name="sasa")


def test_viz_tasks_write_figures_and_statistics(sasa_config, tmp_path):
    cfg = load_config(sasa_config)
    written = tasks.visualize("viz_1", cfg, output=str(tmp_path / "one"), index=3, pixel=(2, 13))
    assert [p.name for p in written] == ["viz_1_test3_y2_x13.png"]
    assert Image.open(written[0]).size[0] > 500
    written = tasks.visualize("viz", cfg, output=str(tmp_path / "avg"))
    assert sorted(p.name for p in written) == ["viz_test0.png", "viz_test0_distance.png", "viz_test0_stats.json"]
    stats = json.loads((tmp_path / "avg" / "viz_test0_stats.json").read_text())
    assert "random init" in stats["title"]
    assert [(layer["name"], layer["heads"]) for layer in stats["layers"]] == \
        [("stem.0", 4), ("stages.0.0.mix", 2), ("stages.1.0.mix.0", 2)]
    assert all(len(layer["mean_distance_px"]) == layer["heads"] for layer in stats["layers"])
    picture = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(picture)
    written = tasks.visualize("viz_1", cfg, output=str(tmp_path / "file"), image=str(picture))
    assert [p.name for p in written] == ["viz_1_photo_y8_x8.png"]  # resized to the 16x16 input, centre query
    result = run_main("--config", str(sasa_config), "--task", "viz_1", "--heads", "1", "--output",
                      str(tmp_path / "head1"))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "head1").iterdir()] == ["viz_1_test0_y8_x8.png"]


def test_viz_errors_are_one_line_and_write_nothing(sasa_config, write_config, tmp_path):
    cfg, out = load_config(sasa_config), tmp_path / "out"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    cases = [(dict(image=str(bad)), "cannot read it as an image"),
             (dict(image=str(tmp_path / "missing.png")), "no such file"),
             (dict(pixel=(16, 0)), "outside the 16x16 input image"),
             (dict(index=60), "outside the test split"),
             (dict(layers="nothing*"), "no attention layer matches")]
    for options, message in cases:
        with pytest.raises(UserError, match=message):
            tasks.visualize("viz_1", cfg, output=str(out), **options)
    with pytest.raises(UserError, match="--pixel chooses the query of viz_1"):
        tasks.visualize("viz", cfg, output=str(out), pixel=(1, 1))
    with pytest.raises(UserError, match="has no attention layers"):
        tasks.visualize("viz", load_config(write_config()), output=str(out))
    assert not out.exists()
    result = run_main("--config", str(sasa_config), "--task", "viz_1", "--pixel", "-1", "3", "--output", str(out))
    assert result.returncode == 2 and result.stderr.startswith("error: --pixel -1 3 is outside"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_training_logs_the_viz_grid_and_viz_loads_the_run(sasa_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    tasks.train(load_config(sasa_config), output=str(run))
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["attention/viz"]
    assert events.Images("attention/viz")[0].width > 200
    written = tasks.visualize("viz_1", None, load=str(run))  # the config comes from the checkpoint
    assert [p.parent for p in written] == [run / "viz"]


def test_an_image_file_for_a_greyscale_model_is_read_as_one_channel(tmp_path):
    from common.config import DataConfig

    path = tmp_path / "shirt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
    image = viz.image_from_file(path, DataConfig(dataset="fashion_mnist"), (1, 28, 28))
    assert image.tensor.shape == (1, 1, 28, 28) and image.display.shape == (28, 28, 3)
    grey = torch.from_numpy(image.display[..., 0].copy())
    assert torch.allclose(image.tensor[0, 0], (grey - 0.2860) / 0.3530, atol=1e-5)  # its own statistics
