"""Run outputs for humans and tools: console progress, TensorBoard scalars, metrics.jsonl.

Only the main rank writes. `metrics.jsonl` has one JSON object per epoch; on
resume, lines of epochs that are about to be redone are dropped, and TensorBoard
purges its events logged after the resumed step, so a killed-and-resumed run
logs each epoch (and each step) exactly once, as an uninterrupted run does.
A line cut short by a kill is dropped too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from common.files import WRITE_ERRNOS, write_atomic, write_error

# Record fields that say where an epoch is rather than measure it (the x axis); flags such as new_best
# (booleans) are skipped too. metrics.jsonl keeps them all; TensorBoard plots only the measurements.
NOT_SCALARS = ("epoch", "step")


class RunLogger:
    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool, quiet: bool,
                 first_epoch: int | None = None, resume_step: int | None = None):
        """first_epoch: when resuming, the (1-based) epoch about to be logged; later lines are dropped."""
        self.enabled = enabled
        self.quiet = quiet or not enabled
        self.metrics_path = run_dir / "metrics.jsonl" if enabled and run_dir else None
        self.writer = None
        if self.metrics_path is not None and first_epoch is not None:
            self._drop_epochs_from(first_epoch)
        if enabled and tensorboard and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            # TensorBoard hides every earlier event at or after purge_step. The checkpoint at resume_step was
            # written after that step's scalars (an epoch's record, a step window), which are kept; only what
            # the killed run logged after its checkpoint is redone.
            purge_step = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def _drop_epochs_from(self, epoch: int) -> None:
        if not self.metrics_path.exists():
            return
        keep = [json.dumps(record) for record in self.history() if record.get("epoch", -1) < epoch]
        write_atomic(self.metrics_path, "".join(line + "\n" for line in keep))

    def history(self) -> list[dict]:
        """Every epoch record logged so far (across resumes); lines cut short by a kill are left out."""
        if self.metrics_path is None or not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def progress(self, total: int, initial: int, description: str):
        """A tqdm bar over one epoch's steps (a no-op object in quiet mode)."""
        return tqdm(total=total, initial=initial, desc=description, disable=self.quiet, leave=False,
                    dynamic_ncols=True, file=sys.stderr, unit="step")

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def step_scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def epoch(self, record: dict, step: int) -> None:
        """One metrics.jsonl line and the matching TensorBoard scalars."""
        if not self.enabled:
            return
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            if exc.errno in WRITE_ERRNOS:
                raise write_error(self.metrics_path, exc, "free some space and continue with --resume") from None
            raise
        if self.writer is not None:
            for key, value in record.items():
                if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def images(self, images: dict, step: int) -> None:
        """TensorBoard images, (C, H, W) tensors in [0, 1]."""
        if self.writer is not None:
            for key, image in images.items():
                self.writer.add_image(key, image, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
