"""Run folders and checkpoints' weights: where a task writes, whether a run may be resumed, seeding.

Shared by every task: the run folder of a new or resumed training, the check that a resumed run
keeps its method, loading a checkpoint's weights with a one-line error when they do not fit, and
the folder a checkpoint belongs to.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import Config, config_from_dict, config_to_dict, flatten_config
from common.data.loaders import input_spec
from common.errors import UserError
from common.train import checkpoint as ckpt
from common.train.engine import build_model

# Keys that may change between a run and its resumption; anything else would silently change the method.
RESUMABLE_CHANGES = ("name", "output_root", "train.epochs", "train.eval_every_epochs", "train.checkpoint_every_steps",
                     "train.keep_every_epochs", "log.", "data.root", "data.download", "data.num_workers", "time.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(cfg: Config, output: str | None, resume: bool) -> tuple[Path, Path | None]:
    """The run folder and, when continuing a run, its last checkpoint."""
    if output:
        run_dir = Path(output)
        last = run_dir / ckpt.LAST
        if last.is_file():
            return run_dir, last
        if resume:
            raise UserError(f"--resume: there is no {last} to resume from; drop --resume to start a new run there")
        return run_dir, None
    parent = Path(cfg.output_root) / cfg.name
    if resume:
        runs = sorted(d for d in parent.glob("*") if (d / ckpt.LAST).is_file())
        if not runs:
            raise UserError(f"--resume: no run of '{cfg.name}' with a {ckpt.LAST} under {parent}; "
                            f"pass --output RUN_DIR to pick one")
        return runs[-1], runs[-1] / ckpt.LAST
    return parent / timestamp(), None


def check_resumable(saved: dict, cfg: Config, run_dir: Path) -> None:
    before, now = flatten_config(saved), flatten_config(config_to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                     and not any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES))
    if changed:
        raise UserError(f"{run_dir} holds a run with a different config ({', '.join(changed)} changed); resume it "
                        f"with its own config ({run_dir / 'config.yaml'}) or use a new --output")


def load_weights(model: nn.Module, saved: dict, source: Path | str, prefer_ema: bool = True) -> str:
    weights = saved["ema"] if prefer_ema and saved.get("ema") is not None else saved["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"checkpoint {source} does not fit this model ({first[:200]}); check --config/--load") \
            from None
    return "ema" if weights is saved.get("ema") else "model"


def checkpoint_run_dir(path: Path) -> Path:
    """The run folder a checkpoint belongs to (kept per-epoch checkpoints live one folder down)."""
    folder = path.parent
    if not (folder / "config.yaml").is_file() and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return folder


def model_to_inspect(cfg: Config | None, load: str | None) -> tuple[Config, nn.Module, Path | None, dict | None]:
    """The config, a freshly built model, and the checkpoint (path, contents) for the figure tasks.

    The config defaults to the checkpoint's own; the model is seeded with the config's seed so that
    random-init figures are the same every time. The checkpoint's weights are not loaded yet.
    """
    path = saved = None
    if load:
        path = ckpt.resolve_checkpoint(load)
        saved = ckpt.load_checkpoint(path)
        cfg = cfg or config_from_dict(saved["config"], source=str(path))
    input_size, num_classes = input_spec(cfg.data)
    seed_everything(cfg.seed)
    return cfg, build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size), path, saved
