"""`train`: a validated config becomes a run folder with checkpoints, logs and a summary."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common.config import Config, dump_config
from common.data.loaders import build_data
from common.errors import UserError
from common.files import RunLock, check_output_dir, remove_orphans, write_atomic
from common.tasks.run_folder import (check_allowed_changes, check_resumable, configure_determinism,
                                     resolve_run_dir, seed_everything)
from common.train import checkpoint as ckpt
from common.train.distributed import barrier, broadcast_object, init_distributed, shutdown
from common.train.engine import Trainer, build_model, check_amp_device

RESUME_NEEDS = ("config", "model", "state", "optimizer", "scheduler", "scaler", "rng")


def train(cfg: Config, output: str | None = None, resume: bool = False, quiet: bool = False,
          allow_changes: tuple = ()) -> dict:
    """Train into a new run folder, or continue the one that --output or --resume names.

    Everything a bad input can break is checked before the folder is written; a second training into a
    folder in use stops at once (RunLock); a new run that fails before its first checkpoint (a corrupt
    image, a divergence) removes what it wrote.
    """
    started_at = time.perf_counter()  # the summary's wall time covers the whole run, data loading included
    check_allowed_changes(allow_changes)
    dist = init_distributed(cfg.device)
    lock = existed = None
    try:
        check_amp_device(cfg.train.amp, dist.device)
        configure_determinism(cfg.deterministic)
        if dist.is_main:
            run_dir, last = resolve_run_dir(cfg, output, resume, tuple(allow_changes))
            check_output_dir(run_dir, "--output" if output else "output_root")
            if run_dir.is_dir():  # before reading it: a training still writing there stops this one here
                existed = set(run_dir.iterdir())
                lock = RunLock(run_dir).acquire()
        run_dir, last = broadcast_object((run_dir, last) if dist.is_main else None)
        saved = ckpt.load_checkpoint(last, needs=RESUME_NEEDS) if last is not None else None
        changes = check_resumable(saved, cfg, run_dir, tuple(allow_changes)) if saved is not None else []
        seed_everything(cfg.seed)
        data_start = time.perf_counter()
        data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, dist.device, cfg.seed,
                          dist.rank, dist.world)
        data_seconds = time.perf_counter() - data_start
        model = build_model(cfg.model.name, cfg.model.kwargs, data.num_classes, data.input_size)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = lock or RunLock(run_dir).acquire()
            lock.claim()
            remove_orphans(run_dir)
            write_atomic(run_dir / "config.yaml", dump_config(cfg))
        barrier()
        try:
            trainer = Trainer(cfg, dist, run_dir, data, model, resume_from=saved, quiet=quiet, changes=changes,
                              started_at=started_at, data_seconds=data_seconds)
            return trainer.fit()
        except UserError:
            if dist.is_main and saved is None:
                _undo_failed_start(run_dir, existed)
            raise
    finally:
        if lock is not None:
            lock.release()
        shutdown()


def _undo_failed_start(run_dir: Path, existed: set | None) -> None:
    """A new run that stopped on bad input before its first checkpoint leaves nothing behind."""
    if any(run_dir.rglob("*.ckpt")):
        return
    if existed is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in set(run_dir.iterdir()) - existed:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
