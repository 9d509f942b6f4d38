"""gauss_viz: one PNG per checkpoint in saved-epoch order, a panel per layer, a clear error without Gaussians."""

from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from common.registry import create_model
from common.train.checkpoint import save_checkpoint
from sa_conv.gauss_viz import draw_checkpoints, draw_current, draw_gaussian_heads, ellipse, has_gaussian_heads


def tiny(name="sa_quadratic", layers=3, **kwargs):
    torch.manual_seed(0)
    return create_model(name, layers=layers, heads=4, hidden=8, intermediate=8, image_size=16, **kwargs)


def write(path, model, epoch, step=0, ema=None):
    save_checkpoint(path, {"model": model.state_dict(), "ema": ema,
                           "state": {"epoch": epoch, "step_in_epoch": step, "global_step": 10 * epoch + step}})
    return path


def test_one_png_per_checkpoint_in_epoch_order(tmp_path):
    model = tiny()
    files = []
    for epoch in (3, 1, 2):  # given out of order
        with torch.no_grad():
            model.layers[0].attention.scores.centres.add_(1.0)
        files.append(write(tmp_path / f"copy_{epoch}.ckpt", model, epoch))
    pngs = draw_checkpoints(tiny(), files, tmp_path / "out", dpi=30)
    assert [p.name for p in pngs] == ["gauss_epoch_0001.png", "gauss_epoch_0002.png", "gauss_epoch_0003.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert len({p.read_bytes() for p in pngs}) == 3  # each drawn from its own weights


def test_a_run_folder_gives_one_png_per_saved_position(tmp_path):
    model = tiny(layers=1)
    run = tmp_path / "run"
    write(run / "epochs" / "epoch_0001.ckpt", model, 1)
    write(run / "best.ckpt", model, 2)
    write(run / "last.ckpt", model, 2)  # the same epoch as best.ckpt: drawn once
    write(tmp_path / "mid.ckpt", model, 2, step=7)  # an interrupted epoch
    pngs = draw_checkpoints(model, [run, tmp_path / "mid.ckpt"], tmp_path / "out", dpi=30)
    assert [p.name for p in pngs] == ["gauss_epoch_0001.png", "gauss_epoch_0002.png",
                                      "gauss_epoch_0002_step000007.png"]


def test_current_weights_without_a_checkpoint(tmp_path):
    assert draw_current(tiny(layers=1), tmp_path, dpi=30) == tmp_path / "gauss_init.png"
    assert (tmp_path / "gauss_init.png").stat().st_size > 1000


def test_a_panel_per_layer():
    for layers in (1, 4, 6):
        fig = draw_gaussian_heads(tiny(layers=layers), dpi=30)
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == [f"layer {i + 1}" for i in range(layers)]
        # per head: a 50% and a 90% contour (+ the centre dot when it lies on the grid)
        assert all(len(ax.lines) >= 2 * 4 for ax in panels)


def test_ema_weights_are_drawn_when_present(tmp_path):
    model, ema = tiny(layers=1), tiny(layers=1)
    with torch.no_grad():
        ema.layers[0].attention.scores.centres.fill_(3.0)
    path = write(tmp_path / "a.ckpt", model, 1, ema=ema.state_dict())
    with_ema = draw_checkpoints(model, [path], tmp_path / "ema", dpi=30)[0].read_bytes()
    without = draw_checkpoints(model, [path], tmp_path / "raw", prefer_ema=False, dpi=30)[0].read_bytes()
    assert with_ema != without


def test_contour_encloses_its_mass():
    # 50% / 90% of N(c, P^-1): the ellipse (d - c)^T P (d - c) = -2 ln(1 - m)
    precision = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    for mass in (0.5, 0.9):
        pts = ellipse(torch.tensor([1.0, -2.0]), precision, mass) - torch.tensor([1.0, -2.0])
        level = torch.einsum("ni,ij,nj->n", pts, precision.double(), pts)
        assert torch.allclose(level, torch.full_like(level, -2 * torch.log(torch.tensor(1 - mass)).item()))


def test_models_without_gaussian_heads_get_a_clear_error(tmp_path):
    for model in (tiny("sa_learned"), create_model("resnet18", stem="cifar")):
        assert not has_gaussian_heads(model)
        with pytest.raises(UserError, match="has none; use a quadratic-attention model"):
            draw_checkpoints(model, [tmp_path / "x.ckpt"], tmp_path / "out")
    assert has_gaussian_heads(tiny("sa_quadratic_aniso"))


def test_a_checkpoint_of_another_model_is_a_user_error(tmp_path):
    path = write(tmp_path / "other.ckpt", tiny("sa_learned", layers=1), 1)
    with pytest.raises(UserError, match="does not fit this model"):
        draw_checkpoints(tiny(layers=1), [path], tmp_path / "out")
    with pytest.raises(UserError, match="checkpoint not found"):
        draw_checkpoints(tiny(layers=1), [tmp_path / "missing.ckpt"], tmp_path / "out")


def test_epoch_image_hook():
    images = tiny(layers=2).epoch_images()
    assert list(images) == ["gaussian_heads"]
    image = images["gaussian_heads"]
    assert image.dim() == 3 and image.shape[0] == 3 and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.min() < 0.5  # not blank
    assert tiny("sa_learned", layers=1).epoch_images() == {}


def test_gauss_viz_task_follows_a_training_run_epoch_by_epoch(write_config, tmp_path):
    from tests.helpers import run_main

    path = write_config({"model": {"name": "sa_quadratic", "layers": 2, "heads": 4, "hidden": 8,
                                   "intermediate": 8, "image_size": 16},
                         "train": {"epochs": 2, "keep_every_epochs": 1}, "log": {"tensorboard": False}})
    run = tmp_path / "run"
    assert run_main("--config", str(path), "--output", str(run)).returncode == 0
    result = run_main("--task", "gauss_viz", "--load", str(run))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run / "gauss_viz").glob("*.png")) == ["gauss_epoch_0001.png",
                                                                         "gauss_epoch_0002.png"]
    conv = write_config({"train": {"epochs": 1}}, name="conv")
    refused = run_main("--config", str(conv), "--task", "gauss_viz")
    assert refused.returncode == 2 and "has no attention layers" in refused.stderr
    sasa = write_config({"model": {"name": "resnet", "layers": [1], "widths": [8], "stem_width": 8,
                                   "mixer": "sasa", "mixer_kwargs": {"kernel_size": 3, "heads": 2}}}, name="sasa")
    refused = run_main("--config", str(sasa), "--task", "gauss_viz", "--output", str(tmp_path / "g"))
    assert refused.returncode == 2 and "has none; use a quadratic-attention model" in refused.stderr
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_title_fits_above_the_panels_and_axes_are_in_input_pixels(layers):
    model = tiny(layers=layers)  # 16x16 input: an 8x8 grid of 2x2-pixel cells
    fig = draw_gaussian_heads(model, title="Gaussian heads, epoch 12, step 40 of epoch 13 (epoch_0012.ckpt)",
                              dpi=50)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    assert 0 <= title.x0 and title.x1 <= fig.bbox.width  # wrapped to the figure, not cut off
    panels = [ax for ax in fig.axes if ax.get_visible()]
    for ax in panels:
        assert ax.title.get_window_extent(renderer).y1 <= title.y0  # above every panel title
        assert ax.get_xlim() == (-9.0, 7.0) and ax.get_ylim() == (7.0, -9.0)  # cells -4..3 at 2 px each
    assert "input pixels" in panels[0].get_ylabel() and "input pixels" in panels[-1].get_xlabel()
