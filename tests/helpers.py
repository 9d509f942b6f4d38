"""Helpers shared by the tests: a tiny config that trains in seconds, running main.py, and whether a model learns."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (the bench scripts are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def metafile_entry(family: str, name: str, **kwargs) -> dict:
    """The entry of configs/<family>/metafile.yaml for model `name` with exactly these kwargs."""
    entries = yaml.safe_load((REPO / "configs" / family / "metafile.yaml").read_text())["models"]
    for entry in entries:
        if entry["name"] == name and (entry.get("kwargs") or {}) == kwargs:
            return entry
    raise KeyError(f"no {name} {kwargs} in configs/{family}/metafile.yaml")


def paper_gflops(entry: dict) -> tuple[float, float, dict[str, int]]:
    """(our GFLOPs of the entry's model counted as its paper counts, the paper's GFLOPs, our FLOPs per op).

    One forward pass at batch 1 at the dataset's resolution (224x224 for ImageNet), counted on meta tensors;
    the ops named in reference.gflops_excludes (what the paper leaves out) are not in the first figure. SAN's
    reference.gmacs are turned into GFLOPs (x 2)."""
    from common.inspect.timing import count_flops_by_op
    from common.train.engine import build_model

    size = (3, 224, 224) if entry["dataset"] == "imagenet" else (3, 32, 32)
    classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[entry["dataset"]]
    counts = count_flops_by_op(build_model(entry["name"], entry.get("kwargs", {}), classes), size)
    reference = entry["reference"]
    excluded = set(reference.get("gflops_excludes", []))
    ours = sum(flops for op, flops in counts.items() if op.split(".")[-1] not in excluded) / 1e9
    paper = reference["gflops"] if "gflops" in reference else 2 * reference["gmacs"]
    return ours, paper, counts


# A few dozen full-batch steps on a fixed set of 20 training images (no augmentation, a constant lr): any model
# that can learn fits them, so its training loss falls far below ln(classes), where an untrained model starts.
LEARNING_RUN = {
    "data": {"val_fraction": 0.2, "synthetic": {"train_size": 25, "test_size": 10, "image_size": 16},
             "augment": {"crop_padding": 0, "hflip": False}},
    "train": {"epochs": 40, "batch_size": 20, "optimizer": {"name": "adamw", "lr": 1.0e-2, "weight_decay": 0.0},
              "schedule": {"name": "constant"}},
    "log": {"tensorboard": False},
}


def assert_learns(write_config, tmp_path: Path, model: dict, changes: dict | None = None,
                  fraction: float = 1 / 3) -> list[float]:
    """Train `model` (a config's model block) for 40 steps; its loss must fall below fraction x ln(classes).

    Returns the per-epoch training losses (the first epoch's is near ln(classes)).
    """
    from common import tasks
    from common.config import load_config

    cfg = load_config(write_config(deep_update(deep_update(LEARNING_RUN, {"model": model}), changes or {}),
                                   name="learns"))
    tasks.train(cfg, output=str(tmp_path / "learns"))
    records = [json.loads(line) for line in (tmp_path / "learns" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records]
    chance = math.log(10)
    assert losses[-1] < fraction * chance, f"{model['name']} did not learn: training loss per epoch {losses}"
    return losses
