"""Checkpoints: written atomically, verified by a checksum, read safely, with errors a user can act on.

A checkpoint is a plain dict of tensors and Python scalars (so `torch.load` can
use `weights_only=True`): model, optimiser, scheduler, scaler and EMA state,
position in training, every RNG state, the best metric so far and the
resolved config. Recomputable buffers are registered non-persistent by the
models and so never reach the file.

Every file carries a SHA-256 of its contents (every tensor's bytes, dtype and
shape, and every other value), which loading recomputes: a flipped bit is an
error, never a model with different weights. A file that is not a checkpoint
of this project, or that holds Python objects other than plain data, is
refused in one line; nothing in it is ever executed.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.files import atomic_file

FORMAT = "vision-attention-checkpoint"
VERSION = 2  # 2: the checksum; version-1 files (without one) still load
LAST, BEST = "last.ckpt", "best.ckpt"
EPOCHS_DIR = "epochs"
CHECKSUM = "sha256"


def epoch_checkpoint_name(epoch: int) -> str:
    """Where `train.keep_every_epochs` keeps the checkpoint of a finished epoch, inside the run folder."""
    return f"{EPOCHS_DIR}/epoch_{epoch:04d}.ckpt"


def epoch_checkpoints(run_dir: str | Path) -> list[Path]:
    """The kept per-epoch checkpoints of a run folder, in epoch order."""
    return sorted((Path(run_dir) / EPOCHS_DIR).glob("epoch_*.ckpt"))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically (temporary file, fsync, rename): a crash at any moment leaves the old or the new file.

    A failed write (disk full, ...) is a one-line error; the previous file at `path` is untouched.
    """
    payload = {"format": FORMAT, "version": VERSION, **state}
    payload[CHECKSUM] = checksum(payload)
    # Serialised in memory first: torch's zip writer turns a failed file write (a full disk) into an opaque
    # RuntimeError, a plain write raises the OSError that says what happened.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_file(path, hint=f"the previous {Path(path).name}, if any, is intact; free some space and "
                                f"continue with --resume") as f:
        f.write(buffer.getbuffer())


def checksum(payload: dict) -> str:
    """SHA-256 over every value of a checkpoint but the checksum itself, in the dict's order."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in payload.items() if k != CHECKSUM})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"{{{len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (str, bytes)):
        data = value.encode() if isinstance(value, str) else value
        digest.update(f"{type(value).__name__}{len(data)};".encode() + data)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


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


def load_checkpoint(path: str | Path, needs: tuple = ()) -> dict:
    """Load on the CPU (GPU checkpoints load anywhere), verify the checksum, never execute pickled code.

    needs: entries the caller reads (e.g. "config", "model", "state"); a file without them is a one-line error.
    """
    path = resolve_checkpoint(path)
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise UserError(f"cannot read checkpoint {path}: it claims more memory than there is; the file is "
                        f"corrupt") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail anywhere in the zip and unpickling code
        raise UserError(f"cannot read checkpoint {path}: {_why_unreadable(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{FORMAT}' marker); "
                        f"pass a last.ckpt/best.ckpt written by `main.py --task train`")
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise UserError(f"{path} was written by a newer version of this project (format {version!r}), or is "
                        f"corrupt; update the code, or use another checkpoint")
    if version >= 2:
        try:
            intact = state.get(CHECKSUM) == checksum(state)
        except Exception:  # noqa: BLE001 - values of a kind this project never writes
            intact = False
        if not intact:
            raise UserError(f"checkpoint {path} is corrupt: its contents do not match the checksum written with "
                            f"them (a damaged disk or an incomplete copy); use another checkpoint of the run or "
                            f"copy it again")
    problem = _structure_problem(state, needs)
    if problem:
        raise UserError(f"checkpoint {path} is incomplete ({problem}); it was not written by `main.py --task "
                        f"train`")
    return state


def _why_unreadable(exc: Exception) -> str:
    text = str(exc)
    if "Weights only load failed" in text or "Unsupported global" in text or "Unsupported operand" in text:
        # Our own words: torch's text suggests weights_only=False, which must never be tried on such a file.
        return ("it holds Python objects other than tensors and plain data, which this project never writes; "
                "it is not loaded, because unpickling them could run code")
    return f"the file is truncated, corrupt or not a PyTorch checkpoint ({type(exc).__name__})"


_KINDS = {"config": dict, "model": dict, "ema": (dict, type(None)), "state": dict, "optimizer": dict,
          "scheduler": dict, "scaler": dict, "rng": dict}


def _structure_problem(state: dict, needs: tuple) -> str:
    for key in needs:
        if not isinstance(state.get(key), _KINDS.get(key, object)):
            return f"no valid '{key}' entry"
    if "model" in needs and not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "the model weights are not all tensors"
    if "state" in needs and not isinstance(state["state"].get("epoch"), int):
        return "no training position"
    return ""


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
