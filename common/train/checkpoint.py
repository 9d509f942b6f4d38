"""Checkpoints: written atomically, read safely, with errors a user can act on.

A checkpoint is a plain dict of tensors and Python scalars (so `torch.load` can
use `weights_only=True`): model, optimiser, scheduler, scaler and EMA state,
position in training, every RNG state, the best metric so far and the
resolved config. Recomputable buffers are registered non-persistent by the
models and so never reach the file.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

FORMAT = "vision-attention-checkpoint"
VERSION = 1
LAST, BEST = "last.ckpt", "best.ckpt"
EPOCHS_DIR = "epochs"


def epoch_checkpoint_name(epoch: int) -> str:
    """Where `train.keep_every_epochs` keeps the checkpoint of a finished epoch, inside the run folder."""
    return f"{EPOCHS_DIR}/epoch_{epoch:04d}.ckpt"


def epoch_checkpoints(run_dir: str | Path) -> list[Path]:
    """The kept per-epoch checkpoints of a run folder, in epoch order."""
    return sorted((Path(run_dir) / EPOCHS_DIR).glob("epoch_*.ckpt"))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old or the new file, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its best.ckpt, else its last.ckpt)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise UserError(f"no checkpoint in {path}: expected {BEST} or {LAST} (is it a run folder?)")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load on the CPU (GPU checkpoints load anywhere) without executing pickled code."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch "
                        f"checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker); "
                        f"pass a last.ckpt/best.ckpt written by `main.py --task train`")
    if state.get("version", 0) > VERSION:
        raise UserError(f"{path} was written by a newer version of this project (format {state['version']})")
    return state


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
