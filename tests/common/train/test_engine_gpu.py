"""Whole training runs on CUDA through the engine: what only a GPU shows (state on two devices at once).

Marked `gpu`: `pytest -m gpu` (and bench/gpu_check.py) runs them on a GPU; without one they are skipped, and
GPU_TESTS_ON_CPU=1 dry-runs them on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from common import tasks
from common.config import load_config
from common.train import checkpoint as ckpt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_adamw_with_ema_trains_past_its_first_epoch_and_resumes(write_config, tmp_path, gpu_device, amp):
    """AdamW keeps its step counts on the CPU beside CUDA weights; the finiteness check before each save once
    stacked the two devices' flags and crashed every AdamW run on a GPU at the end of its first epoch (found
    on the first GPU run, training ViT). The resume loads that state back onto the device and goes on."""
    path = write_config({"device": gpu_device.type, "train": {
        "epochs": 2, "amp": amp, "ema_decay": 0.9,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}}})
    run = tmp_path / "run"
    tasks.train(load_config(path), output=str(run))
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    saved = ckpt.load_checkpoint(run / "last.ckpt")
    steps = [s["step"] for s in saved["optimizer"]["state"].values()]
    assert steps and all(torch.as_tensor(s).item() > 0 for s in steps)

    tasks.train(load_config(path, ["train.epochs=3"]), output=str(run))  # continue the finished run
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    resumed = ckpt.load_checkpoint(run / "last.ckpt")
    assert all(torch.as_tensor(s["step"]).item() > torch.as_tensor(before).item()
               for s, before in zip(resumed["optimizer"]["state"].values(), steps))
