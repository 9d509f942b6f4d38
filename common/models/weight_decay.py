"""Which parameters a model wants kept out of weight decay: a mark on the parameter itself.

A layer marks parameters whose decay would change the method (Gaussian centres, span
parameters, relative-position tables) when it creates them; the optimiser reads the mark
when it builds its groups. The mark lives with the model, so model code never imports the
training machinery.
"""

from __future__ import annotations

from torch import nn


def mark_no_weight_decay(*params: nn.Parameter) -> None:
    """Exclude parameters from weight decay (e.g. Gaussian centres, span parameters)."""
    for p in params:
        p._no_weight_decay = True


def is_marked_no_weight_decay(param: nn.Parameter) -> bool:
    return getattr(param, "_no_weight_decay", False)
