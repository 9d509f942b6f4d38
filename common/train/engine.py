"""The training engine: one loop for every model, single process or DistributedDataParallel.

What it guarantees:
- every optimiser step is resumable: `last.ckpt` at each epoch end (and every
  `train.checkpoint_every_steps`), holding everything needed to continue bit
  for bit (with `deterministic: true`, single process);
- the run's state is one file: `last.ckpt` also carries the best epoch's
  weights, and `best.ckpt` is a copy of them written after it (and rewritten
  on resume if a kill came in between), so whatever the moment of a SIGKILL,
  resuming ends with exactly the uninterrupted run's result;
- model selection on the validation split only; the test split is evaluated
  once, at the end, with the best weights;
- a non-finite loss, or non-finite weights or optimiser state, stop the run
  before anything is saved from them: every checkpoint on disk is finite;
- SIGINT, SIGTERM and SIGHUP stop at the next step with a checkpoint (exit
  128 + signal); during the final test evaluation they stop it at once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.config import Config, config_to_dict
from common.data.loaders import DataBundle, Loader
from common.errors import TrainingInterrupted, UserError
from common.files import fault_point, write_atomic
from common.inspect.timing import count_params
from common.models.hooks import ModelHooks
from common.registry import MODELS, check_model_args, create_model
from common.train import checkpoint as ckpt
from common.train.distributed import DistInfo, all_reduce_sum, broadcast_module
from common.train.ema import ModelEMA
from common.train.logger import RunLogger
from common.train.optim import build_optimizer, build_scheduler

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingDiverged(UserError):
    """The loss, the weights or the optimiser state became NaN or infinite."""


def check_amp_device(amp: str, device: torch.device) -> None:
    if AMP_DTYPES[amp] is torch.float16 and device.type == "cpu":
        raise UserError("train.amp: fp16 needs a CUDA device; use bf16 on the CPU")


def build_model(name: str, kwargs: dict, num_classes: int | None,
                input_size: tuple[int, int, int] | None = None) -> nn.Module:
    """Create the configured model, giving it what the data fixes unless the config sets it.

    The dataset's class count (`num_classes`), its channels (`in_chans`) and image side (`image_size`) go to
    every model that takes them, so one model config trains on 28x28 greyscale and 32x32 colour alike. A
    configured class count or channel count that contradicts the data is an error; a configured image_size
    is the model's to keep (some models accept any input up to that size). An option the model rejects
    (a patch that does not divide the image) is a one-line error, before any run folder is made.
    """
    kwargs = dict(kwargs)
    check_model_args(name, kwargs)
    params = inspect.signature(MODELS.get(name)).parameters
    channels, height, width = input_size or (None, None, None)
    for key, value in (("num_classes", num_classes), ("in_chans", channels)):
        if key not in params or value is None:
            continue
        configured = kwargs.get(key)
        if configured is not None and configured != value:
            what = "classes" if key == "num_classes" else "channels"
            raise UserError(f"model.{key} is {configured} but the dataset has {value} {what}; "
                            f"set model.{key}: {value} or remove it")
        kwargs[key] = value
    if "image_size" in params and height is not None and kwargs.get("image_size") is None:
        kwargs["image_size"] = height if height == width else [height, width]
    try:
        return create_model(name, **kwargs)
    except UserError:
        raise
    except (ValueError, TypeError, RuntimeError, AssertionError, IndexError, KeyError, ZeroDivisionError,
            OverflowError) as exc:  # option values it cannot be built with: a negative width, mismatched lists
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        size = f" for {channels}x{height}x{width} inputs" if input_size else ""
        data_given = ("num_classes", "in_chans", "image_size")
        options = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in data_given)[:200]
        raise UserError(f"model '{name}' cannot be built{size} with these options ({options}): {reason}; check "
                        f"the model options in the config (model.*)") from None


@dataclass
class RunState:
    """Where training is; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (== epochs when finished)
    step_in_epoch: int = 0  # optimiser steps already done in that epoch
    global_step: int = 0
    best_val_acc: float | None = None
    best_epoch: int | None = None
    elapsed_s: float = 0.0  # wall time of the run so far, over all its sessions (resumes)
    # Where the wall time went, in seconds over all sessions: reading the data, training steps, validation,
    # the final test (the summary adds "other": start-up, model building, checkpoints, figures).
    time_split: dict = field(default_factory=lambda: {"data": 0.0, "train": 0.0, "val": 0.0, "test": 0.0})
    # Sums over the epoch in progress, so an epoch resumed mid-way logs the same train metrics.
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # loss*n, correct, n, seconds
    # Config keys changed on resume with --allow-change: {"epoch", "step", "key", "from", "to"} each.
    changes: list = field(default_factory=list)
    # Losses of the steps since the last train/loss_step point when a signal stopped the run mid-window, so the
    # resumed run logs the same points at the same steps as an uninterrupted one.
    window_losses: list = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, device: torch.device, amp_dtype=None,
             channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole split (all ranks together)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    loader.set_epoch(0)
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    all_reduce_sum(sums)
    model.train(was_training)
    n = max(sums[2].item(), 1.0)
    return sums[0].item() / n, sums[1].item() / n


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _detach_from_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails: send stdout and stderr to /dev/null instead."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):  # a terminal; files and pipes keep their output
                    os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


class Trainer:
    def __init__(self, cfg: Config, dist: DistInfo, run_dir: Path, data: DataBundle, model: nn.Module,
                 resume_from: dict | None = None, quiet: bool = False, changes: list | None = None,
                 started_at: float | None = None, data_seconds: float = 0.0):
        """changes: the config keys that differ from `resume_from`'s, allowed with --allow-change.
        started_at: `time.perf_counter()` when this session began (before the data was read), so the wall
        time covers the whole run; data_seconds: how long reading the data took in this session."""
        self.cfg, self.dist, self.run_dir, self.data = cfg, dist, run_dir, data
        self.started_at = time.perf_counter() if started_at is None else started_at
        self.data_seconds = data_seconds
        self.device = dist.device
        tc = cfg.train
        check_amp_device(tc.amp, self.device)
        self.amp_dtype = AMP_DTYPES[tc.amp]

        if tc.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = tc.bn_momentum
        self.model = model.to(self.device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = count_params(self.model)
        self.hooks = ModelHooks.collect(self.model)
        self.ema = ModelEMA(self.model, tc.ema_decay) if tc.ema_decay else None

        self.steps_per_epoch = len(data.train)
        self.total_steps = self.steps_per_epoch * tc.epochs
        self.optimizer = build_optimizer(self.model, tc.optimizer)
        self.scheduler = build_scheduler(self.optimizer, tc.schedule, tc.optimizer.lr, self.total_steps,
                                         self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

        self.state = RunState()
        # The best epoch's weights (CPU copies of model and EMA, and the run state then), carried in last.ckpt.
        self.best: dict | None = None
        self.last_good: tuple[int, int] | None = None  # (epoch, step_in_epoch) of the last.ckpt on disk
        self.resumed = resume_from is not None
        if resume_from is not None:
            self._restore(resume_from)
            if changes:
                self._apply_changes(changes)

        step_model = self.model
        if dist.distributed:
            step_model = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        self.step_model = torch.compile(step_model) if tc.compile else step_model
        # Also a new run drops what a start killed before its first checkpoint logged into the folder.
        self.log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.log.tensorboard,
                             quiet=quiet or cfg.log.quiet, first_epoch=self.state.epoch + 1,
                             resume_step=self.state.global_step)

    # ------------------------------------------------------------------ checkpoints

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _checkpoint_state(self, elapsed_s: float) -> dict:
        state = asdict(self.state)
        state["elapsed_s"] = elapsed_s
        return {
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": state,
            "rng": ckpt.rng_state(),
            "classes": list(self.data.classes),
            "params": self.params,
            "best": self.best,
        }

    def _best_checkpoint(self) -> dict:
        """best.ckpt: the best epoch's weights and position, for eval, viz and the figure tasks."""
        return {"config": config_to_dict(self.cfg), "model": self.best["model"], "ema": self.best["ema"],
                "state": self.best["state"], "classes": list(self.data.classes), "params": self.params}

    def _save(self, name: str, elapsed_s: float) -> None:
        # Every rank checks (DDP keeps them equal), so they stop together rather than hang in a collective.
        self._check_state_finite()
        if self.dist.is_main:
            ckpt.save_checkpoint(self.run_dir / name, self._checkpoint_state(elapsed_s))
        if name == ckpt.LAST:
            self.last_good = (self.state.epoch, self.state.step_in_epoch)

    def _save_best(self) -> None:
        if self.dist.is_main and self.best is not None:
            ckpt.save_checkpoint(self.run_dir / ckpt.BEST, self._best_checkpoint())

    def _keep_epoch_due(self) -> bool:
        keep, st = self.cfg.train.keep_every_epochs, self.state
        return bool(keep) and st.step_in_epoch == 0 and st.epoch > 0 and \
            (st.epoch % keep == 0 or st.epoch == self.cfg.train.epochs)

    def _remember_best(self, elapsed_s: float) -> None:
        def copy(module):
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

        state = asdict(self.state)
        state["elapsed_s"] = elapsed_s
        self.best = {"model": copy(self.model), "ema": copy(self.ema.module) if self.ema is not None else None,
                     "state": state}

    def _restore(self, saved: dict) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            if self.ema is not None:
                self.ema.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            self.state = RunState(**saved["state"])
            ckpt.set_rng_state(saved["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"cannot resume from {self.run_dir / ckpt.LAST}: it does not match this model or "
                            f"config ({str(exc).splitlines()[0][:200]}); use a new --output") from None
        self.best = saved.get("best")
        self.last_good = (self.state.epoch, self.state.step_in_epoch)
        if self.dist.rank > 0:
            # Rank 0's streams were saved; other ranks draw their own dropout masks.
            torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank + self.state.global_step)

    def _repair_derived_files(self) -> None:
        """Write what a kill between two saves left out: best.ckpt and the kept epoch checkpoint."""
        st = self.state
        if self.best is not None:
            try:
                on_disk = ckpt.load_checkpoint(self.run_dir / ckpt.BEST, needs=("state",))["state"]
                current = (on_disk["epoch"], on_disk.get("global_step")) == \
                    (self.best["state"]["epoch"], self.best["state"]["global_step"])
            except UserError:
                current = False
            if not current:
                self._save_best()
                self.log.info(f"rewrote {self.run_dir / ckpt.BEST} (epoch {self.best['state']['epoch']}) from "
                              f"{ckpt.LAST}: the previous run stopped before writing it")
        name = ckpt.epoch_checkpoint_name(st.epoch)
        if self._keep_epoch_due() and not (self.run_dir / name).is_file():
            ckpt.save_checkpoint(self.run_dir / name, self._checkpoint_state(st.elapsed_s))

    def _apply_changes(self, changes: list[dict]) -> None:
        """Config keys changed on resume (--allow-change): the optimiser takes the new lr from this step on."""
        st = self.state
        lr = self.cfg.train.optimizer.lr
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        st.changes += [{"epoch": st.epoch, "step": st.step_in_epoch, **change} for change in changes]

    # ------------------------------------------------------------------ training

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """Ctrl-C, a scheduler's SIGTERM (preemption) or SIGHUP (the terminal closed) end the current step,
        save last.ckpt and stop; during the final test evaluation they stop it at once.

        A second Ctrl-C aborts at once (the previous checkpoint stays intact); other repeated signals are
        ignored. main.py ignores the signals from there on, so the process ends with exit code 128 + signal.
        """
        self._stop_signal = None
        self._in_final_test = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, _frame):
            if signum == signal.SIGHUP:
                _detach_from_terminal()
            if self._in_final_test:
                self._in_final_test = False
                raise self._final_test_interrupted(signum)
            if self._stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self._stop_signal = signum
            self.log.info(f"{signal.Signals(signum).name}: stopping after this step and saving (Ctrl-C again to "
                          f"abort without saving)")

        previous = {sig: signal.signal(sig, request) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self, at_window_end: bool) -> bool:
        # With several ranks the decision is a collective, taken at window ends (the same step everywhere).
        if not self.dist.distributed:
            return self._stop_signal is not None
        if not at_window_end:
            return False
        flag = torch.tensor([int(self._stop_signal is not None)], device=self.device)
        return all_reduce_sum(flag).item() > 0

    def fit(self) -> dict:
        with self._stop_on_signals():
            summary = self._fit()
        if self._stop_signal is not None:
            # The signal came after the last step (validation, the final test): the run is complete, but the
            # caller (a shell, a study running run after run) asked to stop, and must learn that it did.
            name = signal.Signals(self._stop_signal).name
            raise TrainingInterrupted(f"{name}: the run had finished training when it came; its summary is in "
                                      f"{self.run_dir / 'summary.json'}", self._stop_signal)
        return summary

    def _fit(self) -> dict:
        cfg, st = self.cfg, self.state
        start_time, start_elapsed = self.started_at, st.elapsed_s
        elapsed = lambda: start_elapsed + time.perf_counter() - start_time  # noqa: E731
        st.time_split = {**RunState().time_split, **st.time_split}
        st.time_split["data"] += self.data_seconds
        if st.epoch == 0 and st.step_in_epoch == 0:
            self.log.info(f"training {cfg.model.name} ({self.params / 1e6:.2f}M params) on {cfg.data.dataset} "
                          f"for {cfg.train.epochs} epochs, {self.steps_per_epoch} steps each, on {self.device}"
                          f"{f' x {self.dist.world} processes' if self.dist.distributed else ''}; run folder "
                          f"{self.run_dir}")
        elif st.epoch < cfg.train.epochs:
            self.log.info(f"resuming {self.run_dir} at epoch {st.epoch + 1} step {st.step_in_epoch}")
        if self.resumed and self.dist.is_main:
            self._repair_derived_files()
        while st.epoch < cfg.train.epochs:
            self._train_epoch(elapsed)
            record = self._end_epoch()
            st.epoch += 1
            st.step_in_epoch = 0
            st.epoch_sums = [0.0, 0.0, 0.0, 0.0]
            self._check_state_finite()  # before anything of this epoch is written
            if record.get("new_best"):
                self._remember_best(elapsed())
            self.log.epoch(record, st.global_step)
            if self.dist.is_main and self.hooks.images:
                self.log.images(self.hooks.epoch_images(), st.global_step)
            if cfg.log.viz_every_epochs and st.epoch % cfg.log.viz_every_epochs == 0 and self.dist.is_main:
                self._log_attention_figure(st.global_step)
            fault_point("epoch-logged")
            # The order matters for a kill between two of these: last.ckpt is the run's state (it carries
            # the best weights); best.ckpt and the kept epoch are copies that a resume rewrites if missing.
            self._save(ckpt.LAST, elapsed())
            if record.get("new_best"):
                self._save_best()
            if self._keep_epoch_due():
                self._save(ckpt.epoch_checkpoint_name(st.epoch), elapsed())
            if self._stop_requested(at_window_end=True):
                self.log.close()
                raise self._interrupted()
        summary = self._finish(elapsed)
        self.log.close()
        return summary

    def _log_attention_figure(self, step: int) -> None:
        """log.viz_every_epochs: the `viz` grid (attention averaged over queries) of a fixed validation image."""
        from common.inspect import viz
        from common.inspect.capture import has_attention

        if self.log.writer is None or getattr(self, "_viz_off", False):
            return
        if not has_attention(self.model):
            self._viz_off = True
            self.log.info(f"log.viz_every_epochs: {self.cfg.model.name} has no attention layers; no figure logged")
            return
        if getattr(self, "_viz_image", None) is None:
            loader = self.data.val if self.data.val is not None else self.data.test
            loader.set_epoch(0)
            self._viz_image = next(iter(loader))[0][:1]
        title = f"{self.cfg.name}: {self.cfg.model.name}, epoch {self.state.epoch}"
        image = viz.tensorboard_image(self.eval_model, self._viz_image, self.data.mean, self.data.std, title)
        self.log.images({"attention/viz": image}, step)

    def _train_epoch(self, elapsed) -> None:
        cfg, st, tc = self.cfg, self.state, self.cfg.train
        loader = self.data.train
        loader.set_epoch(st.epoch, st.step_in_epoch)
        self.model.train()
        sums = torch.tensor(st.epoch_sums[:3], device=self.device, dtype=torch.float64)
        epoch_seconds = st.epoch_sums[3]
        window = [torch.tensor(v, device=self.device) for v in st.window_losses]
        window_start, st.window_losses = st.step_in_epoch - len(window), []
        bar = self.log.progress(self.steps_per_epoch, st.step_in_epoch,
                                f"epoch {st.epoch + 1}/{tc.epochs}")
        tick = time.perf_counter()
        images_since_tick = 0
        for x, y in loader:
            loss, logits = self._step(x, y)
            window.append(loss.detach())
            hard = y.argmax(1) if y.ndim == 2 else y  # mixed batches carry class probabilities: the larger share
            sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == hard).sum().double(),
                                 torch.tensor(len(y), dtype=torch.float64, device=self.device)])
            st.step_in_epoch += 1
            st.global_step += 1
            images_since_tick += len(y) * self.dist.world
            bar.update(1)
            fault_point("train-step")
            at_checkpoint = tc.checkpoint_every_steps and st.global_step % tc.checkpoint_every_steps == 0 \
                and st.step_in_epoch < self.steps_per_epoch
            if len(window) >= cfg.log.every_steps or at_checkpoint or st.step_in_epoch == self.steps_per_epoch:
                losses = torch.stack(window).float()
                self._check_finite(losses, window_start)
                now = time.perf_counter()
                epoch_seconds += now - tick
                mean_loss = losses.mean().item()
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{(sums[1] / sums[2]).item():.3f}",
                                img_s=f"{images_since_tick / max(now - tick, 1e-9):.0f}", refresh=False)
                self.log.step_scalars({"train/loss_step": mean_loss,
                                       "lr": self.optimizer.param_groups[0]["lr"]}, st.global_step)
                tick, images_since_tick = now, 0
                window, window_start = [], st.step_in_epoch
                if at_checkpoint:
                    st.epoch_sums = sums.tolist() + [epoch_seconds]
                    self._save(ckpt.LAST, elapsed())
                    tick = time.perf_counter()
            if self._stop_requested(at_window_end=not window):
                if window:
                    self._check_finite(torch.stack(window).float(), window_start)
                bar.close()
                st.epoch_sums = sums.tolist() + [epoch_seconds + time.perf_counter() - tick]
                st.window_losses = [loss.item() for loss in window]
                self._save(ckpt.LAST, elapsed())
                self.log.close()
                raise self._interrupted()
        bar.close()
        st.epoch_sums = sums.tolist() + [epoch_seconds]

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tc = self.cfg.train
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(self.device, self.amp_dtype):
            logits = self.step_model(x)
            loss = self.criterion(logits.float(), y)
            extra = self.hooks.extra_loss()
            if extra is not None:
                loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.hooks.after_optimizer_step()
        return loss, logits

    def _interrupted(self) -> TrainingInterrupted:
        st, signum = self.state, self._stop_signal or signal.SIGTERM
        where = f"at the end of epoch {st.epoch}" if st.step_in_epoch == 0 else \
            f"at epoch {st.epoch + 1} step {st.step_in_epoch}"
        return TrainingInterrupted(f"{signal.Signals(signum).name}: stopped {where}, saved {self.run_dir / ckpt.LAST}; "
                                   f"continue with the same command and --resume (or --output {self.run_dir})",
                                   signum)

    def _check_finite(self, losses: torch.Tensor, first_step: int) -> None:
        # Summed over ranks: every rank must agree to stop, or the others would hang in the next collective.
        bad = all_reduce_sum((~torch.isfinite(losses)).to(torch.int64))
        if not bad.any().item():
            return
        first = int(bad.nonzero()[0, 0])
        step, value = first_step + first + 1, losses[first].item()
        raise self._diverged(f"non-finite loss ({value}) at epoch {self.state.epoch + 1} step {step}")

    def _check_state_finite(self) -> None:
        """Weights, EMA and optimiser state must be finite before they are saved (the loss is checked apart:
        the update that diverges can leave NaN weights behind a finite loss)."""
        parts = {"weights": self.model.state_dict(), "optimizer state": {
            f"{i}.{k}": v for i, state in enumerate(self.optimizer.state.values()) for k, v in state.items()}}
        if self.ema is not None:
            parts["EMA weights"] = self.ema.state_dict()
        named = [(part, name, t) for part, tensors in parts.items() for name, t in tensors.items()
                 if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
        # One flag per device (optimisers keep some state on the CPU beside CUDA weights: AdamW's step counts),
        # read with one synchronisation each.
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for _, _, t in named:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
        if all(torch.stack(device_flags).all().item() for device_flags in flags.values()):
            return
        part, name = next((part, name) for part, name, t in named if not torch.isfinite(t).all())
        st = self.state
        where = f"the end of epoch {st.epoch}" if st.step_in_epoch == 0 else \
            f"epoch {st.epoch + 1} step {st.step_in_epoch}"
        raise self._diverged(f"non-finite {part} ({name}) at {where}")

    def _diverged(self, what: str) -> TrainingDiverged:
        lr = self.cfg.train.optimizer.lr
        if self.last_good is None:
            kept = (f"no checkpoint was written yet: lower train.optimizer.lr (e.g. {lr / 10:g}), add "
                    f"train.grad_clip or warmup (train.schedule.warmup_epochs) and start again")
        else:
            epoch, step = self.last_good
            where = f"end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1} step {step}"
            kept = (f"last good checkpoint: {self.run_dir / ckpt.LAST} ({where}); to continue from it with a lower "
                    f"lr, rerun with --output {self.run_dir} --set train.optimizer.lr={lr / 10:g} --allow-change "
                    f"train.optimizer.lr (train.grad_clip and train.schedule.* can be changed the same way)")
        return TrainingDiverged(f"{what}; training stopped, {kept}")

    # ------------------------------------------------------------------ evaluation

    def _end_epoch(self) -> dict:
        st, tc = self.state, self.cfg.train
        loss_sum, correct, n, seconds = st.epoch_sums
        st.time_split["train"] += seconds
        all_sums = all_reduce_sum(torch.tensor([loss_sum, correct, n], dtype=torch.float64, device=self.device))
        loss_sum, correct, n = all_sums.tolist()
        record = {"epoch": st.epoch + 1, "step": st.global_step, "train/loss": loss_sum / max(n, 1),
                  "train/acc": correct / max(n, 1), "lr": self.optimizer.param_groups[0]["lr"],
                  "time/epoch_s": seconds, "time/images_per_s": n / max(seconds, 1e-9)}
        last_epoch = st.epoch + 1 == tc.epochs
        split, loader = self._selection_split()
        if loader is not None and ((st.epoch + 1) % tc.eval_every_epochs == 0 or last_epoch):
            val_start = time.perf_counter()
            sel_loss, sel_acc = evaluate(self.eval_model, loader, self.device, self.amp_dtype, tc.channels_last)
            record.update({f"{split}/loss": sel_loss, f"{split}/acc": sel_acc})
            if self.ema is not None:
                record[f"{split}/acc_raw"] = evaluate(self.model, loader, self.device, self.amp_dtype,
                                                      tc.channels_last)[1]
            st.time_split["val"] += time.perf_counter() - val_start  # selection on test counts here too
            if st.best_val_acc is None or sel_acc > st.best_val_acc:
                st.best_val_acc, st.best_epoch = sel_acc, st.epoch + 1
                record["new_best"] = True
        model_metrics = self.hooks.epoch_metrics()
        record.update(model_metrics)
        self.log.info(self._epoch_line(record))
        return record

    def _selection_split(self) -> tuple[str, Loader | None]:
        """The split that picks the best checkpoint: the held-out val split, or (train.selection: test, the
        official scripts' protocol) the test split itself."""
        if self.cfg.train.selection == "test":
            return "test", self.data.test
        return "val", self.data.val

    def _epoch_line(self, r: dict) -> str:
        parts = [f"epoch {r['epoch']:>3}/{self.cfg.train.epochs}", f"loss {r['train/loss']:.4f}",
                 f"acc {100 * r['train/acc']:.2f}%"]
        split = self._selection_split()[0]
        if f"{split}/acc" in r:
            parts += [f"{split} loss {r[f'{split}/loss']:.4f}", f"{split} acc {100 * r[f'{split}/acc']:.2f}%"
                      + (" *" if r.get("new_best") else "")]
        parts += [f"lr {r['lr']:.3g}", f"{r['time/images_per_s']:.0f} img/s", f"{r['time/epoch_s']:.1f}s"]
        return " | ".join(parts)

    def _finish(self, elapsed) -> dict:
        """Evaluate the test split once, with the best weights, and summarise the run."""
        st, tc = self.state, self.cfg.train
        model = self.eval_model
        source = "last"
        split = self._selection_split()[0]
        if st.best_epoch is not None:
            source = "best" if split == "val" else "best_on_test"
            if self.best is not None:
                model.load_state_dict(self.best["ema"] if self.ema is not None else self.best["model"])
            else:  # resumed from a checkpoint of an older version, which did not carry the best weights
                if self.dist.is_main:
                    saved = ckpt.load_checkpoint(self.run_dir / ckpt.BEST, needs=("model",))
                    model.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
                broadcast_module(model)
        fault_point("final-test")
        self._in_final_test = True
        test_start = time.perf_counter()
        try:
            if self._stop_signal is not None:  # arrived after the last epoch's stop check
                raise self._final_test_interrupted(self._stop_signal)
            test_loss, test_acc = evaluate(model, self.data.test, self.device, self.amp_dtype, tc.channels_last)
        finally:
            self._in_final_test = False
        st.time_split["test"] += time.perf_counter() - test_start
        wall = elapsed()
        time_split = {key: round(value, 3) for key, value in st.time_split.items()}
        time_split["other"] = round(max(wall - sum(time_split.values()), 0.0), 3)
        model_metrics = self.hooks.epoch_metrics()
        summary = {
            "run_dir": str(self.run_dir), "config": self.cfg.name, "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset, "params": self.params, "epochs": st.epoch,
            "best_val_acc": st.best_val_acc if split == "val" else None, "best_epoch": st.best_epoch,
            "selected_on": split, "test_acc": test_acc, "test_loss": test_loss, "test_checkpoint": source,
            "wall_time_s": wall, "time_s": time_split, "world_size": self.dist.world, "device": str(self.device),
            "model_metrics": model_metrics,
        }
        if st.changes:
            summary["resumed_with_changes"] = st.changes
        if self.dist.is_main:
            self.hooks.training_figures(self.run_dir, self.log.history())
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.log.info(format_summary(summary))
        return summary

    def _final_test_interrupted(self, signum: int) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"{signal.Signals(signum).name}: stopped during the final test evaluation; the training itself is "
            f"complete and saved ({self.run_dir / ckpt.LAST}); the same command with --resume (or --output "
            f"{self.run_dir}) evaluates the test split and writes summary.json", signum)


def format_summary(s: dict) -> str:
    if s.get("selected_on") == "test":
        best = "n/a (train.selection: test)"
        test = (f"{100 * s['test_acc']:.2f}% (best epoch {s['best_epoch']}, selected on the test set itself as "
                f"the official scripts do: optimistic)")
    else:
        best = "n/a (no validation split)" if s["best_val_acc"] is None else \
            f"{100 * s['best_val_acc']:.2f}% (epoch {s['best_epoch']})"
        test = f"{100 * s['test_acc']:.2f}% ({s['test_checkpoint']} checkpoint)"
    lines = [
        f"== summary: {s['config']} ==",
        f"model          {s['model']} ({s['params'] / 1e6:.2f}M params)",
        f"best val acc   {best}",
        f"test acc       {test}",
        f"epochs         {s['epochs']}",
        *(f"{key:<14} {value:.4g}" for key, value in s.get("model_metrics", {}).items()),
        f"wall time      {_format_duration(s['wall_time_s'])}" + _time_split_text(s),
        f"run folder     {s['run_dir']}",
    ]
    return "\n".join(lines)


def _time_split_text(s: dict) -> str:
    """' (data 0m 02s, train 5m 10s, ...)': where the wall time went, when the summary says."""
    split = s.get("time_s")
    if not split:
        return ""
    return " (" + ", ".join(f"{key} {_format_duration(value)}" for key, value in split.items()) + ")"
