"""Weight-decay groups and learning-rate schedules (stepped per iteration)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.config import OptimizerConfig, ScheduleConfig
from common.models.weight_decay import mark_no_weight_decay
from common.train.optim import build_optimizer, build_scheduler, parameter_groups


def lrs(cfg: ScheduleConfig, base_lr=0.1, epochs=10, steps_per_epoch=5):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = build_scheduler(opt, cfg, base_lr, epochs * steps_per_epoch, steps_per_epoch)
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])  # the LR used by this step
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_ends_exactly_at_eta_min():
    values = lrs(ScheduleConfig(name="cosine", warmup_epochs=2, eta_min=0.001))
    warmup = 2 * 5
    assert values[0] == pytest.approx(0.1 / warmup)  # first step already trains
    assert values[warmup - 1] == pytest.approx(0.1)  # warmup ends at the base LR
    assert values[warmup] == pytest.approx(0.1)  # cosine starts at the top
    assert values[-1] == pytest.approx(0.001)  # and ends exactly at eta_min on the last step
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))
    mid = warmup + (len(values) - 1 - warmup) / 2
    assert values[int(mid)] == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=2e-3)


def test_cosine_without_warmup_and_warmup_start_factor():
    values = lrs(ScheduleConfig(name="cosine", warmup_epochs=0))
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(0.0, abs=1e-12)
    values = lrs(ScheduleConfig(name="constant", warmup_epochs=1, warmup_start_factor=0.5))
    assert values[0] == pytest.approx(0.1 * (0.5 + 0.5 / 5)) and values[4:] == pytest.approx([0.1] * 46)


def test_multistep_decays_at_milestone_epochs():
    values = lrs(ScheduleConfig(name="multistep", milestones=[4, 8], gamma=0.1))
    assert values[4 * 5 - 1] == pytest.approx(0.1)
    assert values[4 * 5] == pytest.approx(0.01)
    assert values[8 * 5] == pytest.approx(0.001) and values[-1] == pytest.approx(0.001)


class WithSpan(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.centres = nn.Parameter(torch.zeros(9, 2))  # 2-D but must not decay
        mark_no_weight_decay(self.centres)


def test_no_decay_on_norms_biases_and_marked_parameters():
    model = WithSpan()
    decay, no_decay = parameter_groups(model, 5e-4)
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model.conv.bias), id(model.bn.weight), id(model.bn.bias),
                                                   id(model.fc.bias), id(model.centres)}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_optimizers():
    sgd = build_optimizer(WithSpan(), OptimizerConfig(name="sgd", lr=0.2, momentum=0.9, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.2
    adamw = build_optimizer(WithSpan(), OptimizerConfig(name="adamw", lr=1e-3, betas=[0.9, 0.95], weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.95)
    assert adamw.param_groups[0]["weight_decay"] == 0.05 and adamw.param_groups[1]["weight_decay"] == 0.0


def test_decay_params_choose_which_parameters_are_decayed():
    model = WithSpan()
    everything = {id(p) for p in model.parameters()}
    unmarked_decay, unmarked_free = parameter_groups(model, 1e-4, "unmarked")  # the attention-cnn script's split
    assert {id(p) for p in unmarked_free["params"]} == {id(model.centres)}
    assert {id(p) for p in unmarked_decay["params"]} == everything - {id(model.centres)}  # norms, biases decayed
    all_decay, all_free = parameter_groups(model, 1e-4, "all")  # torch.optim.SGD(model.parameters(), ...)
    assert {id(p) for p in all_decay["params"]} == everything and not all_free["params"]
    sgd = build_optimizer(model, OptimizerConfig(weight_decay=1e-4, decay_params="all"))
    assert sum(len(g["params"]) for g in sgd.param_groups if g["weight_decay"] == 1e-4) == len(everything)
    with pytest.raises(ValueError, match="decay_params"):
        parameter_groups(model, 1e-4, "norms")


def test_epoch_interval_holds_the_lr_for_each_epoch_as_a_per_epoch_torch_scheduler():
    # SAN's official schedule: CosineAnnealingLR(T_max=epochs) stepped after every epoch, no warmup.
    values = lrs(ScheduleConfig(name="cosine", interval="epoch"), epochs=10, steps_per_epoch=5)
    per_epoch = values[::5]
    assert all(values[e * 5:(e + 1) * 5] == [per_epoch[e]] * 5 for e in range(10))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    torch_cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        torch_cosine.step()
    assert per_epoch == pytest.approx(expected, abs=1e-12)  # the last epoch at 0.1 x 0.024, not 0
    # attention-cnn: warmup t / T_warmup set once per epoch, so its first epoch runs at LR 0.
    warm = lrs(ScheduleConfig(name="cosine", warmup_epochs=4, interval="epoch"), epochs=10, steps_per_epoch=5)
    assert warm[:5] == [0.0] * 5 and warm[5] == pytest.approx(0.1 / 4) and warm[20] == pytest.approx(0.1)
    multistep = lrs(ScheduleConfig(name="multistep", milestones=[4, 8], interval="epoch"))
    assert multistep == pytest.approx(lrs(ScheduleConfig(name="multistep", milestones=[4, 8])))


def test_the_adaptive_span_public_schedule_is_reproduced_epoch_by_epoch():
    """configs/adaptive_span's official variant: epochs 1-9 (1-based) at lr (e + 1) / 10, then a per-epoch
    CosineAnnealingLR(T_max=100) started after the warmup, which ends at 2% of the peak (main.py@01a84fb)."""
    cfg = ScheduleConfig(name="cosine", warmup_epochs=8, warmup_start_factor=0.2, cosine_epochs=100,
                         interval="epoch")
    got = lrs(cfg, base_lr=0.05, epochs=100, steps_per_epoch=3)[::3]
    expected, lr = [], 0.05
    for epoch in range(1, 101):  # the public loop
        if epoch < 10:
            lr = 0.05 * (epoch + 1) / 10
        else:
            lr = 0.05 * 0.5 * (1 + math.cos(math.pi * (epoch - 9) / 100))  # its (epoch - 9)-th scheduler step
        expected.append(lr)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got[-1] == pytest.approx(0.05 * 0.0197, rel=0.01)


def test_cosine_epochs_sets_the_period_after_warmup():
    values = lrs(ScheduleConfig(name="cosine", warmup_epochs=0, cosine_epochs=20), epochs=10, steps_per_epoch=5)
    assert values[25] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))  # a quarter of the way
