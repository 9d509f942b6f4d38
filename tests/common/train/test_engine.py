"""The training engine end to end: run folder, resume, hooks, failure modes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from common import tasks
from common.config import load_config
from common.errors import UserError
from common.registry import MODELS, create_model, register_model
from common.train import checkpoint as ckpt
from tests.helpers import REPO, run_main


def test_train_writes_a_complete_run_folder(write_config, tmp_path):
    out = tmp_path / "run"
    result = run_main("--config", str(write_config()), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "== summary: tiny ==" in result.stdout and "test acc" in result.stdout
    for name in ("config.yaml", "metrics.jsonl", "last.ckpt", "best.ckpt", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "time/epoch_s", "time/images_per_s"} <= set(
        records[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_acc"] == max(r["val/acc"] for r in records)
    assert summary["test_checkpoint"] == "best" and 0 <= summary["test_acc"] <= 1
    assert summary["params"] == sum(p.numel() for p in create_model(
        "resnet", block="basic", layers=[1, 1], widths=[8, 16], stem_width=8).parameters())
    saved = load_config(out / "config.yaml")
    assert saved.train.epochs == 2 and saved.model.kwargs["widths"] == [8, 16]


def test_default_run_folder_and_resume_latest(write_config, tmp_path):
    path = write_config()
    assert run_main("--config", str(path)).returncode == 0
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(runs) == 1 and (runs[0] / "last.ckpt").is_file()
    again = run_main("--config", str(path), "--resume", "--set", "train.epochs=3")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout
    records = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def read_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bit_exact(write_config, tmp_path):
    path = write_config({
        "deterministic": True,
        "model": {"widths": [16, 32], "stem_width": 16},
        "data": {"val_fraction": 0.1, "synthetic": {"train_size": 600, "image_size": 16}},
        "train": {"epochs": 3, "batch_size": 20, "checkpoint_every_steps": 5, "ema_decay": 0.9},
        "log": {"tensorboard": False},
    })
    reference = tmp_path / "uninterrupted"
    assert run_main("--config", str(path), "--output", str(reference)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(path), "--output", str(killed)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            last = killed / "last.ckpt"
            if last.exists() and read_state(last)["state"]["step_in_epoch"] > 0:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            pytest.fail("no mid-epoch checkpoint appeared")
    finally:
        proc.kill()
        proc.wait()
    interrupted = read_state(killed / "last.ckpt")["state"]
    assert 0 < interrupted["step_in_epoch"] and interrupted["epoch"] < 3  # really stopped mid-run, mid-epoch
    resumed = run_main("--config", str(path), "--output", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_state(reference / "last.ckpt"), read_state(killed / "last.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["state"]["global_step"] == b["state"]["global_step"]
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert json.loads((killed / "summary.json").read_text())["test_acc"] == \
        json.loads((reference / "summary.json").read_text())["test_acc"]


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(write_config, tmp_path):
    out = tmp_path / "run"
    path = write_config({"train": {"epochs": 3}})
    assert run_main("--config", str(path), "--output", str(out), "--set", "train.epochs=1").returncode == 0
    before = (out / "last.ckpt").read_bytes()
    result = run_main("--config", str(path), "--output", str(out), "--set", "train.optimizer.lr=1e30",
                      "--set", "train.epochs=3")
    assert result.returncode == 2
    # A changed lr is a different method: the run folder refuses it rather than silently mixing recipes.
    assert "different config" in result.stderr
    diverge = tmp_path / "diverge"
    result = run_main("--config", str(path), "--output", str(diverge), "--set", "train.optimizer.lr=1e30",
                      "--set", "log.every_steps=1")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss") and "epoch 1 step" in line, result.stderr
    assert not (diverge / "last.ckpt").exists() and "no checkpoint was written yet" in line
    assert (out / "last.ckpt").read_bytes() == before


def test_non_finite_loss_after_a_checkpoint_leaves_it_intact(write_config, tmp_path, monkeypatch):
    state = {"calls": 0}

    @register_model(name="test_explodes")
    def explodes(num_classes: int = 10):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, num_classes)

            def forward(self, x):
                state["calls"] += 1
                out = self.fc(x.mean((2, 3)))
                # 4 training steps and 1 validation batch per epoch: call 7 is step 2 of epoch 2
                return out * float("nan") if state["calls"] > 6 else out

        return Net()

    try:
        cfg = load_config(write_config({"model": {"name": "test_explodes"}, "train": {"epochs": 4},
                                        "log": {"every_steps": 1}}))
        out = tmp_path / "run"
        with pytest.raises(UserError, match=r"non-finite loss \(nan\) at epoch 2 step 2; .*last good checkpoint"):
            tasks.train(cfg, output=str(out))
        saved = ckpt.load_checkpoint(out / "last.ckpt")
        assert saved["state"]["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values())
    finally:
        MODELS._entries.pop("test_explodes")


class SpanLike(nn.Module):
    """A stand-in for adaptive span: a penalty term and a clamp after each step."""

    def __init__(self):
        super().__init__()
        self.z = nn.Parameter(torch.full((4,), 0.9))
        self.after_calls = 0

    def extra_loss(self):
        return 10.0 * self.z.sum()

    def after_optimizer_step(self):
        self.after_calls += 1
        self.z.clamp_(0.5, 1.0)

    def epoch_metrics(self):
        return {f"z{i}": v for i, v in enumerate(self.z.tolist())}

    def epoch_images(self):
        return {"z_image": self.z.detach().view(1, 2, 2).clamp(0, 1)}

    def training_figures(self, run_dir, history):
        (run_dir / "z.txt").write_text(" ".join(str(r["span/z0"]) for r in history))


def test_model_hooks_add_loss_and_run_after_each_step(write_config, tmp_path):
    created = {}

    class Hooked(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)
            self.span = SpanLike()

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    @register_model(name="test_hooked")
    def hooked(num_classes: int = 10):
        net = Hooked(num_classes)
        created["span"] = net.span
        return net

    try:
        cfg = load_config(write_config({"model": {"name": "test_hooked"}, "train": {"epochs": 2}}))
        summary = tasks.train(cfg, output=str(tmp_path / "run"))
        span = created["span"]
        assert span.after_calls == 8  # 128 training samples / batch 32, two epochs
        assert torch.equal(span.z.detach(), torch.full((4,), 0.5))  # the penalty pushed z down, the clamp held it
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["span/z3"] for r in records] == [0.5, 0.5] and summary["model_metrics"]["span/z0"] == 0.5
        assert (tmp_path / "run" / "z.txt").read_text() == "0.5 0.5"
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
        assert len(events.Images("span/z_image")) == 2  # one image per epoch
    finally:
        MODELS._entries.pop("test_hooked")


def test_all_training_options_together(write_config, tmp_path):
    cfg = load_config(write_config({"train": {
        "amp": "bf16", "channels_last": True, "ema_decay": 0.5, "grad_clip": 1.0, "label_smoothing": 0.1,
        "bn_momentum": 0.01, "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}}}))
    summary = tasks.train(cfg, output=str(tmp_path / "run"))
    saved = ckpt.load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert saved["ema"] is not None and summary["test_acc"] >= 0
    assert not any(torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"] if "weight" in k
                   and saved["model"][k].dtype.is_floating_point)


def test_no_validation_split_tests_the_last_weights(write_config, tmp_path):
    cfg = load_config(write_config({"data": {"val_fraction": 0.0}, "train": {"epochs": 1}}))
    summary = tasks.train(cfg, output=str(tmp_path / "run"))
    assert summary["best_val_acc"] is None and summary["test_checkpoint"] == "last"
    assert not (tmp_path / "run" / "best.ckpt").exists()


def test_checkpoints_hold_no_recomputable_buffers(write_config, tmp_path):
    @register_model(name="test_big_buffer")
    def big_buffer(num_classes: int = 10):
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes))
        net.register_buffer("table", torch.zeros(1000, 1000), persistent=False)
        return net

    try:
        cfg = load_config(write_config({"model": {"name": "test_big_buffer"}, "train": {"epochs": 1}}))
        tasks.train(cfg, output=str(tmp_path / "run"))
        saved = ckpt.load_checkpoint(tmp_path / "run" / "last.ckpt")
        assert "table" not in saved["model"]
        assert (tmp_path / "run" / "last.ckpt").stat().st_size < 200_000
    finally:
        MODELS._entries.pop("test_big_buffer")


@pytest.mark.parametrize("content, expected", [
    (b"", "cannot read checkpoint"),
    (b"not a checkpoint at all", "cannot read checkpoint"),
    (None, "not a checkpoint of this project"),
])
def test_corrupt_or_foreign_checkpoints_are_clear_errors(write_config, tmp_path, content, expected):
    bad = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(UserError, match=expected):
        ckpt.load_checkpoint(bad)
    result = run_main("--config", str(write_config()), "--task", "eval", "--load", str(bad))
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_truncated_checkpoint_is_a_clear_error(write_config, tmp_path):
    out = tmp_path / "run"
    assert run_main("--config", str(write_config({"train": {"epochs": 1}})), "--output", str(out)).returncode == 0
    data = (out / "last.ckpt").read_bytes()
    (out / "last.ckpt").write_bytes(data[: len(data) // 2])
    result = run_main("--config", str(write_config({"train": {"epochs": 1}})), "--output", str(out))
    assert result.returncode == 2 and "truncated, corrupt" in result.stderr
    result = run_main("--task", "eval", "--load", str(out / "last.ckpt"))
    assert result.returncode == 2 and "cannot read checkpoint" in result.stderr


def test_eval_task_reports_val_and_test_of_the_best_checkpoint(write_config, tmp_path):
    out = tmp_path / "run"
    path = write_config()
    assert run_main("--config", str(path), "--output", str(out)).returncode == 0
    result = run_main("--task", "eval", "--load", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert report["checkpoint"].endswith("best.ckpt")
    assert report["val_acc"] == summary["best_val_acc"] and report["test_acc"] == summary["test_acc"]


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ckpt.save_checkpoint(path, {"state": {"epoch": 1}})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"state": {"epoch": 2}})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["state"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_gpu_checkpoints_load_on_cpu_and_rng_state_round_trips(tmp_path):
    state = ckpt.rng_state()
    first = torch.rand(3)
    ckpt.save_checkpoint(tmp_path / "c.ckpt", {"rng": state})
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "c.ckpt")["rng"])
    assert torch.equal(torch.rand(3), first)


def test_an_image_that_does_not_decode_is_a_one_line_error(write_config, tmp_path):
    from tests.common.data.dataset_writers import write_imagefolder

    written = write_imagefolder(tmp_path / "folder", ["a", "b"], per_class=4, size=12, corrupt=True)
    path = write_config({"data": {"dataset": "imagefolder", "root": str(tmp_path / "folder"), "image_size": 8,
                                  "num_workers": 1, "val_fraction": 0.0, "mean": [0.5] * 3, "std": [0.25] * 3},
                         "train": {"batch_size": 2}})
    result = run_main("--config", str(path), "--output", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot decode image") and str(written.corrupt) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # corrupt images are fatal, and a failed start leaves no run folder


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_the_current_step_and_resume_finishes(write_config, tmp_path, signum):
    path = write_config({"data": {"synthetic": {"train_size": 2000}}, "train": {"epochs": 3, "batch_size": 16},
                         "log": {"tensorboard": False}})
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--config", str(path), "--output", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.ckpt").exists() and time.time() < deadline:  # the first epoch has ended
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    line = stderr.strip().splitlines()[-1]
    assert "stopped at " in line and "--resume" in line and "Traceback" not in stderr
    state = read_state(out / "last.ckpt")["state"]
    # Saved exactly where it stopped: mid-epoch, or (a signal during the epoch's end, under load) at its end.
    where = f"the end of epoch {state['epoch']}" if state["step_in_epoch"] == 0 else \
        f"epoch {state['epoch'] + 1} step {state['step_in_epoch']}"
    assert f"stopped at {where}," in line
    resumed = run_main("--config", str(path), "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert read_state(out / "last.ckpt")["state"]["epoch"] == 3


def test_keep_every_epochs_keeps_numbered_checkpoints(write_config, tmp_path):
    cfg = load_config(write_config({"train": {"epochs": 3, "keep_every_epochs": 2}}))
    tasks.train(cfg, output=str(tmp_path / "run"))
    kept = ckpt.epoch_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["epoch_0002.ckpt", "epoch_0003.ckpt"]  # every 2nd, and the last
    assert [ckpt.load_checkpoint(p)["state"]["epoch"] for p in kept] == [2, 3]


def test_selection_on_test_reports_the_best_test_accuracy_as_the_official_scripts(write_config, tmp_path):
    cfg = load_config(write_config({"data": {"val_fraction": 0.0}, "train": {"epochs": 3, "selection": "test"}}))
    summary = tasks.train(cfg, output=str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("test/acc" in r and "val/acc" not in r for r in records)
    best = max(records, key=lambda r: r["test/acc"])
    assert summary["selected_on"] == "test" and summary["best_val_acc"] is None
    assert summary["test_checkpoint"] == "best_on_test" and summary["best_epoch"] == best["epoch"]
    assert summary["test_acc"] == pytest.approx(best["test/acc"])  # the best epoch's weights, tested again
    assert (tmp_path / "run" / "best.ckpt").is_file()
    default = tasks.train(load_config(write_config({"train": {"epochs": 1}})), output=str(tmp_path / "run2"))
    assert default["selected_on"] == "val" and default["test_checkpoint"] == "best"


def test_models_take_channels_and_size_from_the_data():
    from common.train.engine import build_model

    vit = build_model("vit", {"dim": 16, "depth": 1, "heads": 2}, 10, (1, 28, 28))  # no image_size by hand
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    sasa = build_model("sasa_resnet26", {"stem": "cifar"}, 10, (1, 28, 28))
    assert sasa.stem[0].in_channels == 1
    sa = build_model("sa_quadratic", {"layers": 1, "hidden": 18, "intermediate": 8}, 10, (1, 28, 28))
    assert sa(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UserError, match=r"model 'vit' cannot be built for 1x28x28 inputs with these options "
                                        r"\(patch_size=8\): image_size 28x28 is not a multiple of patch_size 8"):
        build_model("vit", {"patch_size": 8}, 10, (1, 28, 28))
    with pytest.raises(UserError, match="model.in_chans is 3 but the dataset has 1 channels"):
        build_model("resnet18", {"in_chans": 3}, 10, (1, 28, 28))


def test_the_summary_splits_the_whole_wall_time(write_config, tmp_path):
    path = write_config({"train": {"epochs": 1}, "log": {"tensorboard": False}})
    assert run_main("--config", str(path), "--output", str(tmp_path / "run")).returncode == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    split = summary["time_s"]
    assert set(split) == {"data", "train", "val", "test", "other"} and all(v >= 0 for v in split.values())
    assert split["train"] > 0 and split["val"] > 0 and split["test"] > 0 and split["data"] > 0
    assert sum(split.values()) == pytest.approx(summary["wall_time_s"], abs=0.01)


def test_a_signal_after_the_final_test_still_ends_the_process_with_it(write_config, tmp_path, monkeypatch):
    """The run completes (summary written), and the caller learns that a stop was asked (a study stops).
    A signal during the test evaluation itself stops it at once (test_run_state.py)."""
    from common.errors import TrainingInterrupted
    from common.train.engine import Trainer

    finish = Trainer._finish

    def signalled_finish(self, elapsed):
        summary = finish(self, elapsed)
        self._stop_signal = signal.SIGTERM  # as the handler records a SIGTERM that comes after the test
        return summary

    monkeypatch.setattr(Trainer, "_finish", signalled_finish)
    cfg = load_config(write_config({"train": {"epochs": 1}, "log": {"tensorboard": False}}))
    with pytest.raises(TrainingInterrupted, match="SIGTERM: the run had finished training") as excinfo:
        tasks.train(cfg, output=str(tmp_path / "run"))
    assert excinfo.value.signum == signal.SIGTERM and (tmp_path / "run" / "summary.json").is_file()


def tensorboard_scalars(tb_dir) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard shows them (events purged by a resume are gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_after_resumes_equals_an_uninterrupted_run(write_config, tmp_path, monkeypatch):
    from common.errors import TrainingInterrupted
    from common.train.engine import Trainer

    # 10 steps per epoch, a train/loss_step point every 4 steps (and at each epoch end); a constant lr, so a
    # 1-epoch run extended to 3 epochs is the 3-epoch run.
    path = write_config({"deterministic": True, "data": {"synthetic": {"train_size": 200}},
                         "train": {"epochs": 3, "batch_size": 16, "schedule": {"name": "constant"}},
                         "log": {"every_steps": 4}})
    tasks.train(load_config(path), output=str(tmp_path / "uninterrupted"))

    resumed = tmp_path / "resumed"
    tasks.train(load_config(path, ["train.epochs=1"]), output=str(resumed))  # resumed below at an epoch end
    step = Trainer._step

    def stop_at_step_16(self, x, y):  # epoch 2 step 6: in the middle of a loss_step window
        if self.state.global_step == 15:
            signal.raise_signal(signal.SIGTERM)
        return step(self, x, y)

    monkeypatch.setattr(Trainer, "_step", stop_at_step_16)
    with pytest.raises(TrainingInterrupted, match="stopped at epoch 2 step 6"):
        tasks.train(load_config(path), output=str(resumed))
    monkeypatch.setattr(Trainer, "_step", step)
    tasks.train(load_config(path), output=str(resumed))

    expected, got = tensorboard_scalars(tmp_path / "uninterrupted" / "tb"), tensorboard_scalars(resumed / "tb")
    assert [s for s, _ in expected["val/acc"]] == [10, 20, 30]
    assert [s for s, _ in expected["train/loss_step"]] == [4, 8, 10, 14, 18, 20, 24, 28, 30]
    assert set(got) == set(expected) and not {"step", "new_best", "epoch"} & set(got)
    for tag in expected:
        if not tag.startswith("time/"):  # wall-clock times differ
            assert got[tag] == expected[tag], tag
