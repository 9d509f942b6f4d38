"""Hooks a model can provide to the core without the core knowing which paper it comes from.

Any submodule may define:
- `extra_loss(self) -> Tensor`: a scalar added to the task loss at every step
  (e.g. adaptive span's span penalty);
- `after_optimizer_step(self) -> None`: called after every optimiser step
  (e.g. clamping span parameters to [0, 1]);
- `epoch_metrics(self) -> dict[str, float]`: numbers to log at the end of every
  epoch and in the final summary (e.g. learned spans), keyed by a name that is
  prefixed with the module's path in the model;
- `epoch_images(self) -> dict[str, Tensor]`: images (C, H, W) in [0, 1] to log to
  TensorBoard at the end of every epoch on the main rank (e.g. Gaussian heads'
  contours), keyed like `epoch_metrics`;
- `training_figures(self, run_dir, history) -> None`: called once on the main
  rank when training ends, with the list of per-epoch metric records, to draw
  figures into the run folder (e.g. spans over epochs). Modules of the same
  class are asked once (the first one), so a figure can cover every layer;
- `figures(self) -> dict[str, Callable[[str, int], Figure]]`: the figures it can
  draw of its current weights, keyed by the name of a figure task that its package
  registered (`common.registry.register_figure_task`); each draws a matplotlib
  Figure from a title and a dpi. `python main.py --task NAME` draws it for every
  checkpoint of a run (e.g. Gaussian heads' contours).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


@dataclass
class ModelHooks:
    loss_terms: list[nn.Module]
    after_step: list[nn.Module]
    metrics: list[tuple[str, nn.Module]]
    images: list[tuple[str, nn.Module]]
    figures: list[nn.Module]
    drawings: list[nn.Module]

    @classmethod
    def collect(cls, model: nn.Module) -> "ModelHooks":
        named = list(model.named_modules())
        modules = [m for _, m in named]
        figure_types, figures = set(), []
        for m in modules:
            if callable(getattr(m, "training_figures", None)) and type(m) not in figure_types:
                figure_types.add(type(m))
                figures.append(m)
        return cls(loss_terms=[m for m in modules if callable(getattr(m, "extra_loss", None))],
                   after_step=[m for m in modules if callable(getattr(m, "after_optimizer_step", None))],
                   metrics=[(name, m) for name, m in named if callable(getattr(m, "epoch_metrics", None))],
                   images=[(name, m) for name, m in named if callable(getattr(m, "epoch_images", None))],
                   figures=figures,
                   drawings=[m for m in modules if callable(getattr(m, "figures", None))])

    def extra_loss(self) -> torch.Tensor | None:
        if not self.loss_terms:
            return None
        return sum(m.extra_loss() for m in self.loss_terms)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for m in self.after_step:
            m.after_optimizer_step()

    def epoch_metrics(self) -> dict[str, float]:
        out = {}
        for name, m in self.metrics:
            for key, value in m.epoch_metrics().items():
                out[f"{name}/{key}" if name else key] = float(value)
        return out

    @torch.no_grad()
    def epoch_images(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.images:
            for key, image in m.epoch_images().items():
                out[f"{name}/{key}" if name else key] = image
        return out

    def training_figures(self, run_dir: Path, history: list[dict]) -> None:
        for m in self.figures:
            m.training_figures(run_dir, history)

    def figure_drawers(self) -> dict[str, Callable]:
        """Every figure the model's modules can draw, by figure-task name (the first module wins)."""
        out = {}
        for m in self.drawings:
            for name, draw in m.figures().items():
                out.setdefault(name, draw)
        return out
