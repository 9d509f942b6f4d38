"""Training hooks a model can provide without the engine knowing which paper it comes from.

Any submodule may define:
- `extra_loss(self) -> Tensor`: a scalar added to the task loss at every step
  (e.g. adaptive span's span penalty);
- `after_optimizer_step(self) -> None`: called after every optimiser step
  (e.g. clamping span parameters to [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelHooks:
    loss_terms: list[nn.Module]
    after_step: list[nn.Module]

    @classmethod
    def collect(cls, model: nn.Module) -> "ModelHooks":
        modules = list(model.modules())
        return cls(loss_terms=[m for m in modules if callable(getattr(m, "extra_loss", None))],
                   after_step=[m for m in modules if callable(getattr(m, "after_optimizer_step", None))])

    def extra_loss(self) -> torch.Tensor | None:
        if not self.loss_terms:
            return None
        return sum(m.extra_loss() for m in self.loss_terms)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for m in self.after_step:
            m.after_optimizer_step()
