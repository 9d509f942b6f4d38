"""Where tasks write: an unusable --output is refused before the work, a full disk loses nothing."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_main


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("task", ["train", "eval", "time", "viz", "report"])
def test_an_output_that_is_a_file_is_refused_first(write_config, tmp_path, task):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = {"train": ["--config", str(write_config())], "eval": ["--load", str(tmp_path / "run")],
            "time": ["--config", str(write_config())], "viz": ["--config", str(write_config())],
            "report": ["--runs", str(tmp_path)]}[task]
    before = sorted(tmp_path.rglob("*"))
    for output in (a_file, a_file / "sub"):
        line = one_error_line(run_main("--task", task, *args, "--output", str(output)))
        assert str(output) in line and ("is a file" in line or "cannot be created" in line)
    assert sorted(tmp_path.rglob("*")) == before and a_file.read_text() == "x"


def run_with_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    """main.py with writes past `limit` bytes per file failing (EFBIG), as writes fail on a full disk."""
    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limit_writes, timeout=300)


def test_a_full_disk_while_training_keeps_the_earlier_checkpoint_and_leaves_no_partial_file(write_config, tmp_path):
    path, run = write_config({"log": {"tensorboard": False}}), tmp_path / "run"
    assert run_main("--config", str(path), "--output", str(run), "--set", "train.epochs=1").returncode == 0
    before = (run / "last.ckpt").read_bytes()
    line = one_error_line(run_with_file_size_limit(len(before) // 2, "--config", str(path), "--output", str(run)))
    assert line.startswith(f"error: cannot write {run / 'last.ckpt'}: File too large; the previous last.ckpt")
    assert (run / "last.ckpt").read_bytes() == before
    assert not [p for p in run.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.stat().st_size == 0)]


def test_a_full_disk_while_writing_eval_json_leaves_no_empty_file(write_config, tmp_path):
    run = tmp_path / "run"
    assert run_main("--config", str(write_config({"train": {"epochs": 1}})), "--output", str(run)).returncode == 0
    line = one_error_line(run_with_file_size_limit(64, "--task", "eval", "--load", str(run)))
    assert line.startswith(f"error: cannot write {run / 'eval.json'}: File too large")
    assert not (run / "eval.json").exists() and not list(run.glob(".*.tmp"))
