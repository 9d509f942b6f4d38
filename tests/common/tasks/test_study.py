"""The `study` task: every (config, seed) into one folder, resumable, one table and figures; the launchers."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from common.errors import UserError
from common.tasks import launchers
from common.tasks.study import load_study
from main import main
from tests.helpers import REPO

QUICK = {"train": {"epochs": 1}, "log": {"tensorboard": False},
         "time": {"batch_size": 4, "warmup": 0, "iters": 1, "latency_iters": 1}}


def write_study(tmp_path, write_config, study: dict | None = None, configs=None) -> tuple:
    """A study of the tiny config and a wider variant, 2 seeds, 1 epoch each; returns (study file, folder)."""
    if configs is None:
        write_config(QUICK, name="tiny")
        write_config({**QUICK, "model": {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16],
                                         "stem_width": 8, "mixer": "conv"}}, name="other")
        configs = ["tiny.yaml", {"config": "other.yaml", "name": "wider", "set": {"model.widths": [12, 24]}}]
    spec = {"study": "mini", "seeds": 2, "set": {"train.batch_size": 32}, "configs": configs, **(study or {})}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, tmp_path / "runs" / "mini"


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("summary.json")}


def test_study_runs_every_config_and_seed_then_skips_them(write_config, tmp_path):
    path, folder = write_study(tmp_path, write_config)
    result = invoke("--task", "study", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert "4 runs (2 configs x 2 seeds)" in result.output and "0 finished, 4 to run" in result.output
    for name in ("tiny", "wider"):
        cost = json.loads((folder / name / "cost.json").read_text())
        assert cost["gmacs"] > 0 and cost["train_img_s"] > 0 and cost["params"] > 0
        for seed in (0, 1):
            run = folder / name / f"seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert summary["config"] == name and config["seed"] == seed and config["train"]["batch_size"] == 32
            assert set(summary["time_s"]) == {"data", "train", "val", "test", "other"}
    assert yaml.safe_load((folder / "wider" / "seed0" / "config.yaml").read_text())["model"]["widths"] == [12, 24]
    records = list(csv.DictReader((folder / "study.csv").open()))
    assert [(r["config"], r["seeds"]) for r in records] == [("tiny", "2"), ("wider", "2")]
    assert all(float(r["gmacs"]) > 0 and float(r["train_img_s"]) > 0 for r in records)
    table = (folder / "study.md").read_text()
    assert "| tiny |" in table and "| wider |" in table and "finished runs: 4 of 4" in table
    for figure in ("acc_vs_gmacs.png", "acc_vs_time.png", "learning_curves.png"):
        assert (folder / figure).stat().st_size > 10000

    before = mtimes(folder)
    again = invoke("--task", "study", "--config", str(path))
    assert again.exit_code == 0 and "4 finished, 0 to run" in again.output
    assert mtimes(folder) == before  # nothing trained twice

    (folder / "study.md").unlink()
    report = invoke("--task", "report", "--runs", str(folder))
    assert report.exit_code == 0, report.output
    assert (folder / "study.md").read_text() == table  # the report task gives the study's table


def test_a_killed_study_resumes_without_repeating_finished_runs(write_config, tmp_path):
    write_config({**QUICK, "train": {"epochs": 1}}, name="fast")
    write_config({**QUICK, "data": {"synthetic": {"train_size": 3000}}, "train": {"epochs": 2, "batch_size": 16,
                                                                                 "checkpoint_every_steps": 20}},
                 name="slow")
    path, folder = write_study(tmp_path, write_config, {"seeds": 1, "set": {}}, configs=["fast.yaml", "slow.yaml"])
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--task", "study", "--config", str(path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (folder / "slow" / "seed0" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "rerun the same study command to continue" in stderr.strip().splitlines()[-1]
    assert (folder / "fast" / "seed0" / "summary.json").is_file()
    assert not (folder / "slow" / "seed0" / "summary.json").is_file()
    assert "unfinished" in (folder / "study.md").read_text()  # the table was refreshed on the way out
    finished = mtimes(folder)
    result = invoke("--task", "study", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert "1 finished, 1 to run" in result.output and "resuming" in result.output
    assert all(mtime == mtimes(folder)[p] for p, mtime in finished.items())
    epochs = [json.loads(line)["epoch"] for line in
              (folder / "slow" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@pytest.mark.skipif(launchers.fcntl is None, reason="run claims need fcntl (POSIX)")
def test_two_study_processes_share_the_runs(write_config, tmp_path):
    """A run claimed by another study process (its lock held) is skipped here, then run once it is free."""
    write_config(QUICK, name="tiny")
    path, folder = write_study(tmp_path, write_config, {"seeds": 2}, configs=["tiny.yaml"])
    study = load_study(path)
    busy = next(run for run in study.runs if run.seed == 0)
    with launchers.claim(study, busy) as mine:
        assert mine
        with launchers.claim(study, busy) as again:
            assert not again  # one holder at a time, even within one process
        result = invoke("--task", "study", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert "tiny seed 0: being run by another study process; skipped" in result.output
    assert "1 run still being run by another study process (tiny seed 0)" in result.output
    assert (folder / "tiny" / "seed1" / "summary.json").is_file()
    assert not (folder / "tiny" / "seed0").exists()
    assert "finished runs: 1 of 2" in (folder / "study.md").read_text()
    result = invoke("--task", "study", "--config", str(path))  # the other process ended without finishing it
    assert result.exit_code == 0 and "1 finished, 1 to run" in result.output, result.output
    assert (folder / "tiny" / "seed0" / "summary.json").is_file()


def test_slurm_launcher_through_submitits_debug_executor(write_config, tmp_path, monkeypatch):
    monkeypatch.setattr(launchers, "SUBMITIT_CLUSTER", "debug")
    path, folder = write_study(tmp_path, write_config, {"seeds": [3]})
    result = invoke("--task", "study", "--config", str(path), "--launcher", "slurm", "--partition", "gpu",
                    "--time-limit", "30")
    assert result.exit_code == 0, result.output
    assert "submitted 2 jobs" in result.output
    for name in ("tiny", "wider"):
        assert json.loads((folder / name / "seed3" / "summary.json").read_text())["config"] == name
        assert (folder / name / "seed3" / launchers.JOB_MARKER).is_file()
    assert "| tiny |" in (folder / "study.md").read_text()


def test_a_multi_gpu_job_runs_ddp_from_the_job_environment(write_config, tmp_path, monkeypatch):
    """submitit's local executor starts one process per task, as SLURM would: they form one DDP group."""
    monkeypatch.setattr(launchers, "SUBMITIT_CLUSTER", "local")
    write_config(QUICK, name="tiny")
    path, folder = write_study(tmp_path, write_config, {"seeds": 1, "slurm": {"gpus_per_node": 2}},
                               configs=["tiny.yaml"])
    result = invoke("--task", "study", "--config", str(path), "--launcher", "slurm")
    assert result.exit_code == 0, result.output + "".join(p.read_text() for p in folder.rglob("*.err"))
    summary = json.loads((folder / "tiny" / "seed0" / "summary.json").read_text())
    assert summary["world_size"] == 2


def bad_studies(tmp_path):
    yield {"configs": ["missing.yaml"]}, "names a missing config: missing.yaml"
    yield {"configs": ["tiny.yaml", "tiny.yaml"]}, "duplicate name 'tiny' (configs entries 1 and 2)"
    yield {"seeds": -3}, "seeds must be a positive count"
    yield {"seeds": [0, 0]}, "seeds must be distinct non-negative integers"
    yield {"launcher": "slrum"}, "unknown launcher 'slrum' (did you mean 'slurm'?)"
    yield {"sets": {}}, "unknown key 'sets' (did you mean 'set'?)"
    yield {"set": {"train.epochz": 1}}, "did you mean 'train.epochs'"
    yield {"configs": [{"config": "tiny.yaml", "nmae": "x"}]}, "unknown key(s) nmae"
    yield {"slurm": {"gpus": 2}}, "unknown slurm option 'gpus'"


def test_bad_studies_are_one_line_errors_before_anything_runs(write_config, tmp_path):
    write_config(QUICK, name="tiny")
    for i, (change, message) in enumerate(bad_studies(tmp_path)):
        path, folder = write_study(tmp_path, write_config, change, configs=change.get("configs", ["tiny.yaml"]))
        result = invoke("--task", "study", "--config", str(path))
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (change, result.output)
        assert not folder.exists()
    path, _ = write_study(tmp_path, write_config, configs=["tiny.yaml"])
    for args, message in [(["--task", "train", "--config", str(path)], "is a study file; run it with --task study"),
                          (["--task", "train", "--config", str(path), "--launcher", "slurm"],
                           "--launcher only apply to --task study"),
                          (["--task", "study", "--config", str(path), "--resume"], "drop --resume")]:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_a_run_folder_of_another_budget_is_refused(write_config, tmp_path):
    write_config(QUICK, name="tiny")
    path, folder = write_study(tmp_path, write_config, {"seeds": 1}, configs=["tiny.yaml"])
    assert invoke("--task", "study", "--config", str(path)).exit_code == 0
    before = mtimes(folder)
    result = invoke("--task", "study", "--config", str(path), "--set", "train.optimizer.lr=0.2")
    assert result.exit_code == 2 and "train.optimizer.lr changed" in result.output and "--output" in result.output
    assert mtimes(folder) == before


def test_launchers_that_are_not_installed(write_config, tmp_path, monkeypatch):
    write_config(QUICK, name="tiny")
    path, folder = write_study(tmp_path, write_config, configs=["tiny.yaml"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(UserError, match="SLURM is not installed here"):
        load_study(path, launcher="slurm")
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    with pytest.raises(UserError, match="needs submitit, which is not installed: pip install submitit"):
        load_study(path, launcher="slurm")
    assert not folder.exists()


def test_cost_of_a_config_that_leaves_the_time_batch_to_the_device(write_config, tmp_path):
    """A study measures each config once with the time task's settings; time.batch_size unset (null) takes the
    device's default, as `--task time` does (16 on the CPU)."""
    from common.config import load_config
    from common.tasks.study import measure_cost

    cfg = load_config(write_config({"time": {"warmup": 0, "iters": 1, "latency_iters": 1}}, name="default_batch"))
    assert cfg.time.batch_size is None
    record = measure_cost(cfg, tmp_path / "cost.json")
    assert record["batch_size"] == 16 and json.loads((tmp_path / "cost.json").read_text())["gmacs"] > 0
