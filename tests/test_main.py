"""main.py itself: every mistake is one line (exit 2), found before torch is imported where it can be; the process
settings it makes before torch loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO, run_main


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--confg", "x.yaml"], "error: no such option: --confg (did you mean --config?); see --help"),
    (["--task", "viz_1", "--pixel", "a", "b"], "error: invalid value for '--pixel': 'a' is not a valid integer"),
    (["--task", "viz_1", "--pixel", "3"], "error: option '--pixel' requires 2 arguments"),
    (["--task", "viz", "--index", "x"], "error: invalid value for '--index'"),
    (["--task", "trian"], "error: unknown task 'trian' (did you mean 'train'?)"),
    (["--allow-change", "train.optimizer.lr", "--config", "configs/quickstart.yaml"],
     "error: --allow-change applies when resuming a training"),
])
def test_command_line_mistakes_are_one_line(args, expected):
    assert one_error_line(run_main(*args)).startswith(expected)


# Runs main.run with a bad input and says whether torch was imported by the time the error was raised.
PROBE = """
import sys
import main
from common.errors import UserError
try:
    main.run(**{args})
except UserError as exc:
    print(exc)
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("config, kwargs, expected", [
    ({"train": {"epochs": 2, "schedule": {"warmup_epochs": 3}}}, {}, "must be less than train.epochs"),
    ({"train": {"optimizer": {"lr": float("nan")}}}, {}, "train.optimizer.lr must be a finite number"),
    ({}, {"overrides": ["nosuch.key=1"]}, "--set nosuch.key=1: unknown key 'nosuch'"),
    ({}, {"output": "{tmp}/a_file"}, "is a file, not a folder"),
])
def test_config_and_command_line_errors_come_before_torch_is_imported(tmp_path, config, kwargs, expected):
    (tmp_path / "a_file").write_text("x")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "resnet18"}, **config}))
    call = {"configs": [str(path)], "task": "train", "overrides": [], "output": None, "resume": False,
            "load": None, "quiet": True, **kwargs}
    if call["output"]:
        call["output"] = call["output"].format(tmp=tmp_path)
    result = subprocess.run([sys.executable, "-c", PROBE.replace("{args}", repr(call))], cwd=REPO,
                            capture_output=True, text=True)
    assert expected in result.stdout and "torch imported: False" in result.stdout, result.stdout + result.stderr


def test_report_skips_a_summary_whose_accuracy_is_not_a_number(tmp_path):
    runs = tmp_path / "runs"
    for name, acc in (("good", 0.9), ("bad", "ninety")):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text(yaml.safe_dump({"name": "r", "seed": 0, "model": {"name": "resnet18"}}))
        (runs / name / "summary.json").write_text(json.dumps({"test_acc": acc, "best_val_acc": 0.9, "config": "r",
                                                              "model": "resnet18", "epochs": 1}))
    result = run_main("--task", "report", "--runs", str(runs), "--output", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout and "test_acc in summary.json is not a number" in result.stdout


def openmp_settings(policy: str | None) -> dict[str, str]:
    """The settings the OpenMP runtime read in `python main.py --help` (it displays them when it loads)."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    settings = dict(re.findall(r"^\s*(\w+)\s*=\s*'([^']*)'", done.stderr, flags=re.MULTILINE))
    if "OMP_WAIT_POLICY" not in settings:
        pytest.skip("this OpenMP runtime does not display its settings")
    return settings


def test_openmp_threads_sleep_while_waiting_unless_the_environment_says_otherwise():
    """Spinning threads make every CPU op several times slower on shared cores (README, Threads on the CPU)."""
    settings = openmp_settings(None)
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    if "GOMP_SPINCOUNT" in settings:  # libgomp displays PASSIVE for its default too; passive means no spinning
        assert settings["GOMP_SPINCOUNT"] == "0"
    assert openmp_settings("ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"


# Runs main's command with a task whose work is interrupted by Ctrl-C.
INTERRUPTED = """
import sys
import main
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
main.run = interrupted
main.main.main(args=sys.argv[1:], prog_name="main.py")
"""


@pytest.mark.parametrize("task, advice", [("train", True), ("time", False), ("eval", False)])
def test_ctrl_c_advises_resume_only_where_a_run_can_be_resumed(task, advice):
    """(On the first GPU run an interrupted `--task time` told its user to resume a training run.)"""
    result = subprocess.run([sys.executable, "-c", INTERRUPTED, "--config", "configs/quickstart.yaml",
                             "--task", task], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stderr.startswith("aborted"), result.stderr
    assert ("--resume" in result.stderr) == advice, result.stderr
