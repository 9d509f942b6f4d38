"""gauss_viz: where each Gaussian head of a model looks, one panel per layer, one figure per checkpoint.

For the centre query pixel (H // 2, W // 2) of the model's grid, each head h of a layer attends with
a_h(delta) = -1/2 (delta - Delta_h)^T P_h (delta - Delta_h): a Gaussian N(Delta_h, P_h^-1) over offsets.
The contour enclosing a fraction m of its mass is the ellipse
(delta - Delta_h)^T P_h (delta - Delta_h) = -2 ln(1 - m): m = 50% solid, m = 90% dotted (the continuous
Gaussian's mass; on the integer key grid a very sharp head puts nearly all its weight on one cell, inside
its small ellipses). The axes are in input-image pixels, y down: a grid cell is 2 x 2 pixels after the
2x2 space-to-depth, so a head centred one cell away sits 2 px away. The panel spans the offsets the
centre query can reach on the grid, with the query's cell as a black square.

The figure reaches the core as the figure task `gauss_viz` (registered here) and the model's `figures`
hook (sa_conv/model.py); `python main.py --task gauss_viz --load RUN_DIR` draws it per kept checkpoint.

Entry points:
- `has_gaussian_heads(model)`: whether there is anything to draw;
- `draw_checkpoints(model, checkpoints, out_dir)`: one PNG per checkpoint (files or run folders), written
  as gauss_epoch_EEEE.png (EEEE = epochs finished; mid-epoch checkpoints add _stepSSSSSS);
- `draw_current(model, out_dir)`: one PNG of the model's current weights (no checkpoint);
- `draw_gaussian_heads(model)`: that figure as a matplotlib Figure (also the per-epoch TensorBoard image).

matplotlib's object API with the Agg canvas: no global backend is changed.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from common.errors import UserError
from common.registry import register_figure_task
from sa_conv.attention import GaussianScores

MASSES = ((0.5, "-"), (0.9, ":"))  # (mass enclosed, line style)
QUADRATIC_HINT = ("use a quadratic-attention model (sa_quadratic, sa_quadratic_aniso, or sa_conv with attention: "
                  "quadratic / quadratic_aniso), e.g. configs/sa_conv/quadratic_cifar10.yaml; the heads of a ResNet with "
                  "`mixer: gaussian` (configs/quickstart/sa_conv.yaml) are drawn by viz and viz_1")
GAUSS_VIZ = register_figure_task(
    "gauss_viz", help="Gaussian attention heads' contours per checkpoint (sa_conv's quadratic models)",
    needs="the Gaussian heads of the paper's network", hint=QUADRATIC_HINT, file_stem="gauss")


def gaussian_layers(model: nn.Module) -> list[tuple[str, GaussianScores]]:
    """The Gaussian score modules of the model, in network order, with their module paths."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GaussianScores)]


def has_gaussian_heads(model: nn.Module) -> bool:
    return bool(gaussian_layers(model))


def _require_gaussian(model: nn.Module) -> None:
    if not has_gaussian_heads(model):
        raise UserError(f"gauss_viz draws Gaussian attention heads, and this model ({type(model).__name__}) has "
                        f"none; {QUADRATIC_HINT}")


def ellipse(centre: torch.Tensor, precision: torch.Tensor, mass: float, points: int = 181) -> torch.Tensor:
    """(points, 2) (y, x) on the contour of N(centre, precision^-1) that encloses `mass`.

    A direction with (near) zero precision is an unbounded band: its radius is clamped to 1e6 cells,
    which the panel clips.
    """
    level = -2.0 * math.log(1.0 - mass)  # the chi-square(2) quantile
    eigvals, eigvecs = torch.linalg.eigh(precision.double())
    radii = (level / eigvals.clamp_min(level * 1e-12)).sqrt()
    t = torch.linspace(0, 2 * math.pi, points, dtype=torch.float64)
    circle = torch.stack([t.cos(), t.sin()])  # (2, points)
    return (centre.double()[:, None] + eigvecs @ (radii[:, None] * circle)).t()


def _colours(heads: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if heads <= 10 else "tab20"]
    return [cmap(h % cmap.N) for h in range(heads)]


def draw_gaussian_heads(model: nn.Module, title: str | None = None, dpi: int = 100):
    """A matplotlib Figure (Agg canvas): one panel per layer, every head's 50% and 90% contours."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    _require_gaussian(model)
    layers = gaussian_layers(model)
    cell = getattr(model, "block", 1)  # input pixels per grid cell (the space-to-depth block)
    n = len(layers)
    cols = min(n, 3)
    rows = -(-n // cols)
    width_in = 3.3 * cols
    fig = Figure(figsize=(width_in, 3.3 * rows + 0.8), dpi=dpi, constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, (ax, (name, scores)) in enumerate(zip(axes, layers)):
        with torch.no_grad():
            centres = scores.centres.detach().cpu().double() * cell
            precision = scores.precision().detach().cpu().double() / cell ** 2
        height, width = scores.grid
        qy, qx = height // 2, width // 2
        lo_y, hi_y = (-qy - 0.5) * cell, (height - 1 - qy + 0.5) * cell
        lo_x, hi_x = (-qx - 0.5) * cell, (width - 1 - qx + 0.5) * cell
        for h, colour in enumerate(_colours(scores.heads)):
            for mass, style in MASSES:
                pts = ellipse(centres[h], precision[h], mass)
                ax.plot(pts[:, 1], pts[:, 0], style, color=colour, linewidth=1.2)
            cy, cx = centres[h].tolist()
            if lo_y <= cy <= hi_y and lo_x <= cx <= hi_x:
                ax.plot(cx, cy, ".", color=colour, markersize=4)
        ax.add_patch(Rectangle((-cell / 2, -cell / 2), cell, cell, facecolor="black", edgecolor="black", zorder=3))
        ax.set_xlim(lo_x, hi_x)
        ax.set_ylim(hi_y, lo_y)  # y down, as in the image
        ax.set_aspect("equal")
        step = max(1, round(max(height, width) / 8))  # in cells: about 8 labelled ticks, on cell centres
        ax.set_xticks([c * cell for c in range(-(qx // step) * step, width - qx, step)])
        ax.set_yticks([c * cell for c in range(-(qy // step) * step, height - qy, step)])
        ax.set_xticks([c * cell for c in range(-qx, width - qx)], minor=True)
        ax.set_yticks([c * cell for c in range(-qy, height - qy)], minor=True)
        ax.grid(which="both", color="0.85", linewidth=0.5)
        ax.tick_params(labelsize=7)
        ax.set_title(f"layer {i + 1}", fontsize=9)
        if i % cols == 0:
            ax.set_ylabel("key offset dy (input pixels)", fontsize=7)
        if i + cols >= n:
            ax.set_xlabel("key offset dx (input pixels)", fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color="0.3", linestyle=style, label=f"{mass:.0%} of the head's mass")
               for mass, style in MASSES]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(cols, 2), fontsize=7, frameon=False)
    grid_note = f"; grid lines at the {cell}x{cell}-pixel cells' centres" if cell > 1 else ""
    heading = f"{title or 'Gaussian attention heads'}: contours around the centre query (black){grid_note}"
    # Wrapped to the figure's width: a longer line would run over the panel titles below it.
    fig.suptitle(textwrap.fill(heading, max(20, int(width_in * 72 / (10 * 0.55)))), fontsize=10)
    return fig


def figure_to_tensor(fig) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from a figure with an Agg canvas (for TensorBoard)."""
    fig.canvas.draw()
    rgba = torch.frombuffer(bytearray(fig.canvas.buffer_rgba()), dtype=torch.uint8)
    width, height = fig.canvas.get_width_height()
    return rgba.reshape(height, width, 4)[..., :3].permute(2, 0, 1).float() / 255.0


def draw_current(model: nn.Module, out_dir: str | Path, dpi: int = 100) -> Path:
    """One PNG of the model's current weights (e.g. a fresh init when no checkpoint is given)."""
    from common.tasks import model_figures

    return model_figures.draw_current(model, GAUSS_VIZ, out_dir, dpi=dpi)


def draw_checkpoints(model: nn.Module, checkpoints: Sequence[str | Path], out_dir: str | Path,
                     prefer_ema: bool = True, dpi: int = 100) -> list[Path]:
    """One PNG per checkpoint (files, or every checkpoint of a run folder), in saved-epoch order."""
    from common.tasks import model_figures

    return model_figures.draw_checkpoints(model, GAUSS_VIZ, checkpoints, out_dir, prefer_ema=prefer_ema, dpi=dpi)
