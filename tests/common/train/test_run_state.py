"""The run's state under attack: SIGKILL at every moment of the save sequence, non-finite training, signals.

The kills are real (SIGKILL through the VISION_ATTENTION_FAULT hook of common/files.py) in a forked copy
of the test process, which has torch and the models imported already; the resumes run in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys

import pytest
import torch
import yaml
from torch import nn

from common import files, tasks
from common.config import load_config
from common.errors import UserError
from common.registry import MODELS, register_model
from common.train import checkpoint as ckpt
from tests.helpers import TINY_CONFIG, deep_update, run_main

# Three epochs in which this seed's validation accuracy improves twice (epochs 1 and 2), kept epochs 2 and 3.
KILL_CONFIG = deep_update(TINY_CONFIG, {
    "data": {"synthetic": {"train_size": 320}},
    "train": {"epochs": 3, "keep_every_epochs": 2, "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
              "schedule": {"warmup_epochs": 0}},
    "log": {"tensorboard": False},
})


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def quietly(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def train_in_child(cfg, output: str, fault: str) -> int:
    """Train in a forked child with VISION_ATTENTION_FAULT=fault; the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ[files.FAULT_ENV] = fault
            files._fault_hits.clear()
            quietly(tasks.train, cfg, output=output)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def outcome(run) -> dict:
    """What a run must agree on with its uninterrupted twin: results, every checkpoint's weights, the log."""
    summary = json.loads((run / "summary.json").read_text())
    out = {k: summary[k] for k in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "epochs",
                                   "test_checkpoint")}
    for path in sorted(run.rglob("*.ckpt")):
        saved = ckpt.load_checkpoint(path)
        out[str(path.relative_to(run))] = (saved["state"]["epoch"], saved["state"]["global_step"],
                                           [t.tolist() for t in saved["model"].values()])
    out["metrics"] = [{k: v for k, v in r.items() if not k.startswith("time/")}
                      for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    out["leftovers"] = sorted(p.name for p in run.rglob("*.tmp"))
    return out


def test_sigkill_at_every_moment_of_the_save_sequence_resumes_to_the_same_result(tmp_path, monkeypatch):
    cfg = load_config(write_yaml(tmp_path / "kill.yaml", {**KILL_CONFIG, "output_root": str(tmp_path / "runs")}))
    monkeypatch.setenv(files.FAULT_ENV, "count-only")  # matches no point: the reference run counts them
    files._fault_hits.clear()
    quietly(tasks.train, cfg, output=str(tmp_path / "reference"))
    moments = {name: n for name, n in files._fault_hits.items() if name != "train-step"}
    monkeypatch.delenv(files.FAULT_ENV)
    reference = outcome(tmp_path / "reference")
    assert reference["best_epoch"] >= 2, "the config should improve after epoch 1 (a best.ckpt to replace)"
    assert moments["before-rename/best.ckpt"] >= 2 and moments["before-rename/epoch_0002.ckpt"] == 1
    cases = [f"{name}@{n}" for name, count in sorted(moments.items()) for n in range(1, count + 1)]
    cases.append("train-step@7")  # and one mid-epoch, between two checkpoints
    assert len(cases) >= 20
    for case in cases:
        run = tmp_path / case.replace("/", "_").replace("@", "_")
        status = train_in_child(cfg, str(run), case)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (case, status)
        if not (run / "last.ckpt").exists():  # killed before the first checkpoint: it starts again
            assert not (run / "summary.json").exists()
        quietly(tasks.train, cfg, output=str(run))
        assert outcome(run) == reference, case


# ---------------------------------------------------------------------------- non-finite training


class Tripwire(nn.Module):
    """A linear classifier that goes wrong at its `bad_call`-th training forward: NaN weights behind a finite
    loss ("weights": the gradient of sqrt at 0 times 0 is NaN), or a NaN loss ("loss")."""

    armed = True

    def __init__(self, num_classes: int, bad_call: int, kind: str):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        self.p = nn.Parameter(torch.zeros(()))
        self.calls, self.bad_call, self.kind = 0, bad_call, kind

    def forward(self, x):
        out = self.fc(x.mean((2, 3)))
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call and Tripwire.armed:
                out = out + 0 * torch.sqrt(self.p - self.p) if self.kind == "weights" else out * float("nan")
        return out


@pytest.fixture
def tripwire():
    @register_model(name="test_tripwire")
    def make(num_classes: int = 10, bad_call: int = 4, kind: str = "weights"):
        return Tripwire(num_classes, bad_call, kind)

    Tripwire.armed = True
    yield
    MODELS._entries.pop("test_tripwire")


def test_nan_weights_behind_a_finite_loss_are_never_saved(write_config, tmp_path, tripwire):
    # 4 steps per epoch: the 4th forward's update makes `p` NaN; every later loss stays finite.
    cfg = load_config(write_config({"model": {"name": "test_tripwire", "bad_call": 4}, "train": {"epochs": 2}}))
    with pytest.raises(UserError, match=r"non-finite weights \(p\) at the end of epoch 1; training stopped, no "
                                        r"checkpoint was written yet: lower train.optimizer.lr \(e.g. 0.005\)"):
        quietly(tasks.train, cfg, output=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # a new run that failed before its first checkpoint leaves nothing

    cfg = load_config(write_config({"model": {"name": "test_tripwire", "bad_call": 6}, "train": {"epochs": 3}}))
    with pytest.raises(UserError, match=r"non-finite weights \(p\) at the end of epoch 2; training stopped, last "
                                        r"good checkpoint: .*last.ckpt \(end of epoch 1\)"):
        quietly(tasks.train, cfg, output=str(tmp_path / "run"))
    saved = ckpt.load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert saved["state"]["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_diverged_run_continues_from_its_last_good_checkpoint_with_a_lower_lr(write_config, tmp_path, tripwire):
    path = write_config({"model": {"name": "test_tripwire", "bad_call": 7, "kind": "loss"}, "train": {"epochs": 3},
                         "log": {"every_steps": 1}})
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        quietly(tasks.train, load_config(path), output=str(run))
    message = str(info.value)
    assert message.startswith("non-finite loss (nan) at epoch 2 step 3; training stopped, last good checkpoint")
    assert f"--output {run} --set train.optimizer.lr=0.005 --allow-change train.optimizer.lr" in message
    before = (run / "last.ckpt").read_bytes()
    lower = load_config(path, ["train.optimizer.lr=0.005"])
    with pytest.raises(UserError, match="allow the change with --allow-change train.optimizer.lr"):
        tasks.train(lower, output=str(run))  # a changed lr needs the explicit option ...
    assert (run / "last.ckpt").read_bytes() == before
    Tripwire.armed = False
    summary = quietly(tasks.train, lower, output=str(run), allow_changes=("train.optimizer.lr",))  # ... then works
    assert summary["resumed_with_changes"] == [{"epoch": 1, "step": 0, "key": "train.optimizer.lr", "from": 0.05,
                                                "to": 0.005}]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["optimizer"]["lr"] == 0.005
    # From the resumed step on, the schedule is the one of a run with the new lr from the start.
    quietly(tasks.train, lower, output=str(tmp_path / "fresh"))
    lrs = [[json.loads(line)["lr"] for line in (r / "metrics.jsonl").read_text().splitlines()]
           for r in (run, tmp_path / "fresh")]
    assert lrs[0][1:] == lrs[1][1:] and lrs[0][0] != lrs[1][0]
    with pytest.raises(UserError, match="--allow-change model.widths: only train.optimizer.lr, train.grad_clip"):
        tasks.train(lower, output=str(run), allow_changes=("model.widths",))


# ---------------------------------------------------------------------------- signals


def main_in_child(args: list, fault: str, stderr_path) -> int:
    """main.py's command in a forked child with VISION_ATTENTION_FAULT=fault; its exit code (or -signal)."""
    import main

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ[files.FAULT_ENV] = fault
            files._fault_hits.clear()
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(stderr_path, "w")
            main.main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


@pytest.mark.parametrize("name", ["SIGHUP", "SIGTERM", "SIGINT"])
def test_stop_signals_save_the_step_and_exit_128_plus_signal(write_config, tmp_path, name):
    path, run, err = write_config({"train": {"epochs": 2}}), tmp_path / "run", tmp_path / "stderr"
    code = main_in_child(["--config", str(path), "--output", str(run)], f"train-step@3:{name}", err)
    signum = getattr(signal, name)
    assert code == 128 + signum, err.read_text()
    assert err.read_text().strip().splitlines()[-1].startswith(f"{name}: stopped at epoch 1 step 3, saved")
    assert ckpt.load_checkpoint(run / "last.ckpt")["state"]["step_in_epoch"] == 3
    assert quietly(tasks.train, load_config(path), output=str(run))["epochs"] == 2


def test_a_signal_during_the_final_test_evaluation_stops_it(write_config, tmp_path):
    path, run, err = write_config({"train": {"epochs": 1}}), tmp_path / "run", tmp_path / "stderr"
    assert main_in_child(["--config", str(path), "--output", str(run)], "final-test@1:SIGINT", err) == 130
    assert "stopped during the final test evaluation" in err.read_text()
    assert not (run / "summary.json").exists()
    summary = quietly(tasks.train, load_config(path), output=str(run))  # the training is done: only the test runs
    assert summary["epochs"] == 1 and (run / "summary.json").exists()


def test_a_second_ctrl_c_during_the_save_exits_130_and_keeps_the_previous_checkpoint(write_config, tmp_path):
    path, run = write_config({"train": {"epochs": 2, "checkpoint_every_steps": 2}}), tmp_path / "run"
    # The first Ctrl-C after step 3; the second as the stop's checkpoint is about to replace step 2's.
    result = run_main("--config", str(path), "--output", str(run),
                      env={files.FAULT_ENV: "train-step@3:SIGINT,before-rename/last.ckpt@2:SIGINT"})
    assert result.returncode == 130, result.stderr
    assert "aborted" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert ckpt.load_checkpoint(run / "last.ckpt")["state"]["step_in_epoch"] == 2
    assert not list(run.glob(".*.tmp"))


# ---------------------------------------------------------------------------- the run folder


def test_a_torn_last_line_of_metrics_jsonl_does_not_stop_a_resume(write_config, tmp_path):
    path, run = write_config(), tmp_path / "run"
    quietly(tasks.train, load_config(path), output=str(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train/lo')  # a kill in the middle of a write
    quietly(tasks.train, load_config(path, ["train.epochs=3"]), output=str(run))
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_second_training_into_a_run_folder_in_use_stops_at_once(write_config, tmp_path):
    path, run = write_config(), tmp_path / "run"
    run.mkdir()
    held = files.RunLock(run).acquire()  # as a training in another process holds it
    try:
        with pytest.raises(UserError, match="is in use by another training"):
            tasks.train(load_config(path), output=str(run))
        assert list(run.iterdir()) == []
        result = run_main("--config", str(path), "--output", str(run))
        assert result.returncode == 2 and "in use by another training" in result.stderr
    finally:
        held.release()


def test_resume_cleans_orphaned_temporary_files_and_refuses_fewer_epochs(write_config, tmp_path):
    path, run = write_config(), tmp_path / "run"
    quietly(tasks.train, load_config(path), output=str(run))
    orphan = run / ".last.ckpt.999999.tmp"
    orphan.write_bytes(b"what a killed write left")
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match="has already trained 2 epoch\\(s\\), more than train.epochs=1"):
        tasks.train(load_config(path, ["train.epochs=1"]), output=str(run))
    assert (run / "config.yaml").read_text() == config_before and orphan.exists()
    quietly(tasks.train, load_config(path, ["train.epochs=3"]), output=str(run))
    assert not orphan.exists()


def test_fp16_on_the_cpu_and_a_failed_start_leave_no_run_folder(write_config, tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        tasks.train(load_config(write_config({"train": {"amp": "fp16"}})), output=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
