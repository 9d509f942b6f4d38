"""Helpers shared by the tests: a tiny config that trains in seconds, and running main.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_CONFIG = {
    "seed": 0,
    "device": "cpu",
    "model": {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16], "stem_width": 8},
    "data": {"dataset": "synthetic", "val_fraction": 0.2,
             "synthetic": {"train_size": 160, "test_size": 60, "image_size": 16}},
    "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 64,
              "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
              "schedule": {"name": "cosine", "warmup_epochs": 0.5}},
    "log": {"quiet": True, "tensorboard": True},
}


def deep_update(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def run_main(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """Run `python main.py ARGS` as a user would; returns the completed process (never raises on exit code)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)
