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
import yaml
from torch import nn

from common.config import Config, config_from_dict, config_to_dict, flatten_config
from common.data.loaders import input_spec
from common.errors import UserError
from common.train import checkpoint as ckpt
from common.train.engine import build_model

# Keys that may change between a run and its resumption; anything else would silently change the method.
RESUMABLE_CHANGES = ("name", "output_root", "train.epochs", "train.eval_every_epochs", "train.checkpoint_every_steps",
                     "train.keep_every_epochs", "log.", "data.root", "data.download", "data.num_workers", "time.")
# Keys that a resume may change when asked to explicitly (--allow-change KEY): the way out of a divergence,
# continuing from the last good checkpoint with a lower lr, clipping or a warmup. The run records each change.
CHANGEABLE_ON_REQUEST = ("train.optimizer.lr", "train.grad_clip", "train.schedule.")


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


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def check_allowed_changes(allow: tuple | list) -> None:
    """--allow-change names only keys that may change on request."""
    for key in allow:
        if not _matches(key, CHANGEABLE_ON_REQUEST):
            keys = ", ".join(k + "*" if k.endswith(".") else k for k in CHANGEABLE_ON_REQUEST)
            raise UserError(f"--allow-change {key}: only {keys} can change when resuming (other keys change the "
                            f"method: start a new run)")


def resolve_run_dir(cfg: Config, output: str | None, resume: bool, allow: tuple = ()) -> tuple[Path, Path | None]:
    """The run folder and, when continuing a run, its last checkpoint.

    --resume without --output takes the newest run of the config's name whose config matches this one
    (up to the keys a resume may change), and lists the runs that exist when none does.
    """
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
        runs = sorted((d for d in parent.glob("*") if (d / ckpt.LAST).is_file()), reverse=True)
        if not runs:
            raise UserError(f"--resume: no run of '{cfg.name}' with a {ckpt.LAST} under {parent}; "
                            f"pass --output RUN_DIR to pick one")
        others = []
        for run_dir in runs:
            changed = changed_keys(_saved_config(run_dir), cfg, allow)
            if not changed:
                return run_dir, run_dir / ckpt.LAST
            others.append(f"{run_dir.name} ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} differ)")
        listed = "; ".join(others[:5]) + (f"; and {len(others) - 5} more" if len(others) > 5 else "")
        raise UserError(f"--resume: no run under {parent} has this config: {listed}; resume one with --output "
                        f"RUN_DIR and its own config.yaml, or drop --resume to start a new run")
    return parent / timestamp(), None


def _saved_config(run_dir: Path) -> dict:
    """A run's resolved config: its config.yaml, else the one in its last.ckpt."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(saved, dict):
            return saved
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass
    try:
        return ckpt.load_checkpoint(run_dir / ckpt.LAST, needs=("config",))["config"]
    except UserError:
        return {}


def changed_keys(saved: dict, cfg: Config, allow: tuple = ()) -> list[str]:
    """The keys in which `cfg` differs from a saved config, leaving out those a resume may change."""
    before, now = flatten_config(saved), flatten_config(config_to_dict(cfg))
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                  and not _matches(k, RESUMABLE_CHANGES) and not _matches(k, allow))


def check_resumable(saved: dict, cfg: Config, run_dir: Path, allow: tuple = ()) -> list[dict]:
    """Refuse a resume that would change the method or undo finished epochs; return the allowed changes."""
    changed = changed_keys(saved["config"], cfg, allow)
    if changed:
        requestable = all(_matches(k, CHANGEABLE_ON_REQUEST) for k in changed)
        hint = f", or allow the change with --allow-change {' --allow-change '.join(changed)}" if requestable else ""
        raise UserError(f"{run_dir} holds a run with a different config ({', '.join(changed)} changed); resume it "
                        f"with its own config ({run_dir / 'config.yaml'}) or use a new --output{hint}")
    state = saved["state"]
    done = state["epoch"] + (1 if state.get("step_in_epoch") else 0)
    if cfg.train.epochs < done:
        raise UserError(f"{run_dir} has already trained {done} epoch(s), more than train.epochs={cfg.train.epochs}; "
                        f"resume with train.epochs >= {done} (a shorter run is a new run: use a new --output)")
    before, now = flatten_config(saved["config"]), flatten_config(config_to_dict(cfg))
    return [{"key": k, "from": before.get(k), "to": now.get(k)} for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k) and _matches(k, allow)]


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
        saved = ckpt.load_checkpoint(path, needs=("config", "model", "state"))
        cfg = cfg or config_from_dict(saved["config"], source=str(path))
    input_size, num_classes = input_spec(cfg.data)
    seed_everything(cfg.seed)
    return cfg, build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size), path, saved
