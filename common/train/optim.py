"""Optimisers with weight-decay groups, and learning-rate schedules set every iteration or once per epoch."""

from __future__ import annotations

import math

import torch
from torch import nn

from common.config import OptimizerConfig, ScheduleConfig
from common.models.weight_decay import is_marked_no_weight_decay


DECAY_PARAMS = ("matrices", "unmarked", "all")


def parameter_groups(model: nn.Module, weight_decay: float, decay_params: str = "matrices") -> list[dict]:
    """The decayed and the undecayed parameters, as two optimiser groups.

    matrices: weight matrices and kernels only, not norms, biases or parameters the model marks (norm and
    bias parameters are exactly the 1-D ones in every model here, which also keeps small per-head vectors,
    temperatures and spans, out of the decay). unmarked: every parameter the model does not mark (the
    attention-cnn script, which exempts only the Gaussian centres and spreads). all: every parameter, as
    `torch.optim.SGD(model.parameters(), weight_decay=...)` does.
    """
    if decay_params not in DECAY_PARAMS:
        raise ValueError(f"decay_params must be one of {', '.join(DECAY_PARAMS)}, got {decay_params!r}")
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = {"matrices": p.ndim <= 1 or is_marked_no_weight_decay(p),
                  "unmarked": is_marked_no_weight_decay(p), "all": False}[decay_params]
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_params)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base LR for optimiser step `step` (0-based).

    interval "step": linear warmup over `warmup_epochs` from `warmup_start_factor` to 1 (the first step
    already has a non-zero LR), then: cosine from 1 down to eta_min/base_lr, reached exactly at the last
    step; or multistep decays by gamma at each milestone epoch; or constant.

    interval "epoch": the LR is set once per epoch, at its first step t, to the continuous schedule's value
    there, as a torch scheduler stepped once per epoch: warmup start + (1 - start) t / warmup (so with start 0
    the first epoch has LR 0), cosine progress (t - warmup) / (total - warmup), which never reaches 1 (a
    per-epoch CosineAnnealingLR(T_max=epochs) ends one epoch short of eta_min).

    cosine_epochs, when set, is the cosine's period after warmup (progress = (t - warmup) / period, capped at 1).
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.interval == "epoch":
        return _per_epoch_factor(step - step % steps_per_epoch, total_steps, steps_per_epoch, warmup, cfg, base_lr)
    if step < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * (step + 1) / warmup
    if cfg.name == "cosine":
        span = max(1, total_steps - 1 - warmup) if cfg.cosine_epochs is None else cfg.cosine_epochs * steps_per_epoch
        return _cosine(min(1.0, (step - warmup) / span), cfg.eta_min / base_lr)
    if cfg.name == "multistep":
        epoch = step / steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _per_epoch_factor(t: int, total_steps: int, steps_per_epoch: int, warmup: int, cfg: ScheduleConfig,
                      base_lr: float) -> float:
    if t < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * t / warmup
    if cfg.name == "cosine":
        span = total_steps - warmup if cfg.cosine_epochs is None else cfg.cosine_epochs * steps_per_epoch
        return _cosine(min(1.0, (t - warmup) / max(1, span)), cfg.eta_min / base_lr)
    if cfg.name == "multistep":
        return cfg.gamma ** sum(t / steps_per_epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, steps_per_epoch, cfg, base_lr))
