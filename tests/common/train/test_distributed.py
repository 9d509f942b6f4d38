"""Data-parallel training with torchrun: 2 CPU processes over gloo."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from tests.helpers import REPO, run_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_matches_single_process_evaluation(write_config, tmp_path):
    path = write_config({"train": {"epochs": 2, "batch_size": 32}})
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "main.py"), "--config", str(path), "--output", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert result.stdout.count("== summary: tiny ==") == 1  # only rank 0 talks and writes
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    # Metrics are reduced over ranks: the same checkpoint evaluated by one process gives the same numbers.
    single = run_main("--task", "eval", "--load", str(out))
    assert single.returncode == 0, single.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["val_acc"] == summary["best_val_acc"] and report["test_acc"] == summary["test_acc"]
