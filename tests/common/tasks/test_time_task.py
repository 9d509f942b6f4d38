"""The `time` task: one table across configs, time.json and time.md."""

from __future__ import annotations

import json

from tests.helpers import run_main

FIELDS = {"model", "params", "macs", "flops", "train_img_s", "infer_img_s", "latency_ms", "latency_ms_std",
          "peak_mem_mb", "device", "batch_size"}


def test_time_compares_several_configs(write_config, tmp_path):
    small = write_config({"time": {"batch_size": 4, "warmup": 1, "iters": 2, "latency_iters": 2}}, name="small")
    wider = write_config({"model": {"widths": [16, 32]},
                          "time": {"batch_size": 4, "warmup": 1, "iters": 2, "latency_iters": 2}}, name="wider")
    out = tmp_path / "time"
    result = run_main("--config", str(small), "--config", str(wider), "--task", "time", "--output", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "time.json").read_text())
    assert [r["model"] for r in records] == ["small", "wider"]
    assert all(set(r) == FIELDS for r in records)
    assert records[1]["params"] > records[0]["params"] and records[1]["macs"] > records[0]["macs"]
    assert all(r["flops"] == 2 * r["macs"] and r["batch_size"] == 4 for r in records)
    table = (out / "time.md").read_text()
    assert "| small |" in table and "| wider |" in table and "| small |" in result.stdout


def test_time_loads_a_checkpoint_and_rejects_load_with_several_configs(write_config, tmp_path):
    cfg = write_config({"train": {"epochs": 1}, "time": {"batch_size": 2, "warmup": 0, "iters": 1,
                                                         "latency_iters": 1}})
    run = tmp_path / "run"
    assert run_main("--config", str(cfg), "--output", str(run)).returncode == 0
    ok = run_main("--config", str(cfg), "--task", "time", "--load", str(run), "--output", str(tmp_path / "t"))
    assert ok.returncode == 0, ok.stderr
    bad = run_main("--config", str(cfg), "--config", str(cfg), "--task", "time", "--load", str(run))
    assert bad.returncode == 2 and "--load gives weights for one model" in bad.stderr


def test_viz_tasks_need_an_attention_model(write_config):
    for task in ("viz", "viz_1", "gauss_viz"):
        result = run_main("--config", str(write_config()), "--task", task)
        assert result.returncode == 2 and "has no attention layers" in result.stderr, result.stderr
