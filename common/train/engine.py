"""The training engine: one loop for every model, single process or DistributedDataParallel.

What it guarantees:
- every optimiser step is resumable: `last.ckpt` at each epoch end (and every
  `train.checkpoint_every_steps`), holding everything needed to continue bit
  for bit (with `deterministic: true`, single process);
- model selection on the validation split only; the test split is evaluated
  once, at the end, with the best checkpoint;
- a non-finite loss stops the run before anything is saved from it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import signal
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
from common.inspect.timing import count_params
from common.models.hooks import ModelHooks
from common.registry import MODELS, check_model_args, create_model
from common.train import checkpoint as ckpt
from common.train.distributed import DistInfo, all_reduce_sum, broadcast_module
from common.train.ema import ModelEMA
from common.train.logger import RunLogger
from common.train.optim import build_optimizer, build_scheduler

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def build_model(name: str, kwargs: dict, num_classes: int | None) -> nn.Module:
    """Create the configured model, giving it the dataset's class count unless the config fixes one."""
    kwargs = dict(kwargs)
    check_model_args(name, kwargs)
    takes_classes = "num_classes" in inspect.signature(MODELS.get(name)).parameters
    if takes_classes and num_classes is not None:
        configured = kwargs.get("num_classes")
        if configured is not None and configured != num_classes:
            raise UserError(f"model.num_classes is {configured} but the dataset has {num_classes} classes; "
                            f"set model.num_classes: {num_classes} or remove it")
        kwargs["num_classes"] = num_classes
    return create_model(name, **kwargs)


@dataclass
class RunState:
    """Where training is; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (== epochs when finished)
    step_in_epoch: int = 0  # optimiser steps already done in that epoch
    global_step: int = 0
    best_val_acc: float | None = None
    best_epoch: int | None = None
    elapsed_s: float = 0.0
    # Sums over the epoch in progress, so an epoch resumed mid-way logs the same train metrics.
    epoch_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # loss*n, correct, n, seconds
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


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


class Trainer:
    def __init__(self, cfg: Config, dist: DistInfo, run_dir: Path, data: DataBundle, model: nn.Module,
                 resume_from: dict | None = None, quiet: bool = False):
        self.cfg, self.dist, self.run_dir, self.data = cfg, dist, run_dir, data
        self.device = dist.device
        tc = cfg.train
        self.amp_dtype = AMP_DTYPES[tc.amp]
        if self.amp_dtype is torch.float16 and self.device.type == "cpu":
            raise UserError("train.amp: fp16 needs a CUDA device; use bf16 on the CPU")

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
        if resume_from is not None:
            self._restore(resume_from)

        step_model = self.model
        if dist.distributed:
            step_model = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        self.step_model = torch.compile(step_model) if tc.compile else step_model
        self.best_state = None  # in-memory copy of the best weights of this process
        self.log = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.log.tensorboard,
                             quiet=quiet or cfg.log.quiet,
                             first_epoch=self.state.epoch + 1 if resume_from is not None else None,
                             resume_step=self.state.global_step if resume_from is not None else None)

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
        }

    def _save(self, name: str, elapsed_s: float) -> None:
        if self.dist.is_main:
            ckpt.save_checkpoint(self.run_dir / name, self._checkpoint_state(elapsed_s))

    def _restore(self, saved: dict) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            if self.ema is not None:
                self.ema.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            self.state = RunState(**saved["state"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"cannot resume from {self.run_dir / ckpt.LAST}: it does not match this model or "
                            f"config ({str(exc).splitlines()[0][:200]}); use a new --output") from None
        ckpt.set_rng_state(saved["rng"])
        if self.dist.rank > 0:
            # Rank 0's streams were saved; other ranks draw their own dropout masks.
            torch.manual_seed(self.cfg.seed + 7919 * self.dist.rank + self.state.global_step)

    # ------------------------------------------------------------------ training

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """Ctrl-C or a scheduler's SIGTERM (preemption) ends the current step, saves last.ckpt and stops.

        A second Ctrl-C aborts at once (the previous checkpoint stays intact).
        """
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, _frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.log.info(f"{signal.Signals(signum).name}: stopping after this step and saving "
                          f"(Ctrl-C again to abort without saving)")

        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
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
            return self._fit()

    def _fit(self) -> dict:
        cfg, st = self.cfg, self.state
        start_time, start_elapsed = time.perf_counter(), st.elapsed_s
        elapsed = lambda: start_elapsed + time.perf_counter() - start_time  # noqa: E731
        if st.epoch == 0 and st.step_in_epoch == 0:
            self.log.info(f"training {cfg.model.name} ({self.params / 1e6:.2f}M params) on {cfg.data.dataset} "
                          f"for {cfg.train.epochs} epochs, {self.steps_per_epoch} steps each, on {self.device}"
                          f"{f' x {self.dist.world} processes' if self.dist.distributed else ''}; run folder "
                          f"{self.run_dir}")
        elif st.epoch < cfg.train.epochs:
            self.log.info(f"resuming {self.run_dir} at epoch {st.epoch + 1} step {st.step_in_epoch}")
        while st.epoch < cfg.train.epochs:
            self._train_epoch(elapsed)
            record = self._end_epoch()
            st.epoch += 1
            st.step_in_epoch = 0
            st.epoch_sums = [0.0, 0.0, 0.0, 0.0]
            self.log.epoch(record, st.global_step)
            if self.dist.is_main and self.hooks.images:
                self.log.images(self.hooks.epoch_images(), st.global_step)
            if cfg.log.viz_every_epochs and st.epoch % cfg.log.viz_every_epochs == 0 and self.dist.is_main:
                self._log_attention_figure(st.global_step)
            self._save(ckpt.LAST, elapsed())
            if record.get("new_best"):
                self._save(ckpt.BEST, elapsed())
            keep = cfg.train.keep_every_epochs
            if keep and (st.epoch % keep == 0 or st.epoch == cfg.train.epochs):
                self._save(ckpt.epoch_checkpoint_name(st.epoch), elapsed())
        summary = self._finish(elapsed())
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
                signum = self._stop_signal or signal.SIGTERM
                raise TrainingInterrupted(
                    f"{signal.Signals(signum).name}: stopped at epoch {st.epoch + 1} step {st.step_in_epoch}, "
                    f"saved {self.run_dir / ckpt.LAST}; continue with the same command and --resume "
                    f"(or --output {self.run_dir})", signum)
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

    def _check_finite(self, losses: torch.Tensor, first_step: int) -> None:
        # Summed over ranks: every rank must agree to stop, or the others would hang in the next collective.
        bad = all_reduce_sum((~torch.isfinite(losses)).to(torch.int64))
        if not bad.any().item():
            return
        first = int(bad.nonzero()[0, 0])
        step, value = first_step + first + 1, losses[first].item()
        last = self.run_dir / ckpt.LAST
        kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"non-finite loss ({value}) at epoch {self.state.epoch + 1} step {step}; "
                               f"training stopped, {kept}. Lower train.optimizer.lr, add train.grad_clip or "
                               f"warmup (train.schedule.warmup_epochs)")

    # ------------------------------------------------------------------ evaluation

    def _end_epoch(self) -> dict:
        st, tc = self.state, self.cfg.train
        loss_sum, correct, n, seconds = st.epoch_sums
        all_sums = all_reduce_sum(torch.tensor([loss_sum, correct, n], dtype=torch.float64, device=self.device))
        loss_sum, correct, n = all_sums.tolist()
        record = {"epoch": st.epoch + 1, "step": st.global_step, "train/loss": loss_sum / max(n, 1),
                  "train/acc": correct / max(n, 1), "lr": self.optimizer.param_groups[0]["lr"],
                  "time/epoch_s": seconds, "time/images_per_s": n / max(seconds, 1e-9)}
        last_epoch = st.epoch + 1 == tc.epochs
        if self.data.val is not None and ((st.epoch + 1) % tc.eval_every_epochs == 0 or last_epoch):
            val_loss, val_acc = evaluate(self.eval_model, self.data.val, self.device, self.amp_dtype,
                                         tc.channels_last)
            record.update({"val/loss": val_loss, "val/acc": val_acc})
            if self.ema is not None:
                record["val/acc_raw"] = evaluate(self.model, self.data.val, self.device, self.amp_dtype,
                                                 tc.channels_last)[1]
            if st.best_val_acc is None or val_acc > st.best_val_acc:
                st.best_val_acc, st.best_epoch = val_acc, st.epoch + 1
                self.best_state = copy.deepcopy(self.eval_model.state_dict())
                record["new_best"] = True
        model_metrics = self.hooks.epoch_metrics()
        record.update(model_metrics)
        self.log.info(self._epoch_line(record))
        return record

    def _epoch_line(self, r: dict) -> str:
        parts = [f"epoch {r['epoch']:>3}/{self.cfg.train.epochs}", f"loss {r['train/loss']:.4f}",
                 f"acc {100 * r['train/acc']:.2f}%"]
        if "val/acc" in r:
            parts += [f"val loss {r['val/loss']:.4f}", f"val acc {100 * r['val/acc']:.2f}%"
                      + (" *" if r.get("new_best") else "")]
        parts += [f"lr {r['lr']:.3g}", f"{r['time/images_per_s']:.0f} img/s", f"{r['time/epoch_s']:.1f}s"]
        return " | ".join(parts)

    def _finish(self, elapsed_s: float) -> dict:
        """Evaluate the test split once, with the best checkpoint's weights, and summarise the run."""
        st, tc = self.state, self.cfg.train
        model = self.eval_model
        source = "last"
        if self.data.val is not None and st.best_epoch is not None:
            source = "best"
            if self.best_state is not None:
                model.load_state_dict(self.best_state)
            else:
                if self.dist.is_main:
                    saved = ckpt.load_checkpoint(self.run_dir / ckpt.BEST)
                    model.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
                broadcast_module(model)
        test_loss, test_acc = evaluate(model, self.data.test, self.device, self.amp_dtype, tc.channels_last)
        model_metrics = self.hooks.epoch_metrics()
        summary = {
            "run_dir": str(self.run_dir), "config": self.cfg.name, "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset, "params": self.params, "epochs": st.epoch,
            "best_val_acc": st.best_val_acc, "best_epoch": st.best_epoch,
            "test_acc": test_acc, "test_loss": test_loss, "test_checkpoint": source,
            "wall_time_s": elapsed_s, "world_size": self.dist.world, "device": str(self.device),
            "model_metrics": model_metrics,
        }
        if self.dist.is_main:
            self.hooks.training_figures(self.run_dir, self.log.history())
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.log.info(format_summary(summary))
        return summary


def format_summary(s: dict) -> str:
    best = "n/a (no validation split)" if s["best_val_acc"] is None else \
        f"{100 * s['best_val_acc']:.2f}% (epoch {s['best_epoch']})"
    lines = [
        f"== summary: {s['config']} ==",
        f"model          {s['model']} ({s['params'] / 1e6:.2f}M params)",
        f"best val acc   {best}",
        f"test acc       {100 * s['test_acc']:.2f}% ({s['test_checkpoint']} checkpoint)",
        f"epochs         {s['epochs']}",
        *(f"{key:<14} {value:.4g}" for key, value in s.get("model_metrics", {}).items()),
        f"wall time      {_format_duration(s['wall_time_s'])}",
        f"run folder     {s['run_dir']}",
    ]
    return "\n".join(lines)
