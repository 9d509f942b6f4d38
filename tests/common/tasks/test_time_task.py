"""The `time` task: one table across configs, time.json and time.md."""

from __future__ import annotations

import json

from tests.helpers import run_main

FIELDS = {"model", "params", "macs", "flops", "train_img_s", "infer_img_s", "latency_ms", "latency_ms_std",
          "peak_mem_mb", "device", "batch_size", "train_vs_first", "infer_vs_first", "rounds", "load_avg"}


def test_time_compares_several_configs(write_config, tmp_path):
    quick = {"batch_size": 4, "budget_s": 1, "warmup": 1, "iters": 2, "latency_iters": 2}
    small = write_config({"time": quick}, name="small")
    wider = write_config({"model": {"widths": [16, 32]}, "time": quick}, name="wider")
    out = tmp_path / "time"
    result = run_main("--config", str(small), "--config", str(wider), "--task", "time", "--output", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "time.json").read_text())
    assert [r["model"] for r in records] == ["small", "wider"]
    assert all(set(r) == FIELDS for r in records)
    assert records[1]["params"] > records[0]["params"] and records[1]["macs"] > records[0]["macs"]
    assert all(r["flops"] == 2 * r["macs"] and r["batch_size"] == 4 for r in records)
    assert records[0]["train_vs_first"] == records[0]["infer_vs_first"] == 1.0
    assert records[0]["rounds"] == records[1]["rounds"] >= 1
    table = (out / "time.md").read_text()
    assert "| small |" in table and "| wider |" in table and "| small |" in result.stdout
    assert "interleaved round" in table
    # progress on stderr: which model is prepared, how far the rounds are
    assert "time: 2 models" in result.stderr and "[2/2] wider" in result.stderr and "round 1" in result.stderr


def test_time_settings_of_the_call_must_agree(write_config, tmp_path):
    one = write_config({"time": {"budget_s": 5}}, name="one")
    two = write_config({"time": {"budget_s": 9}}, name="two")
    out = tmp_path / "time"
    bad = run_main("--config", str(one), "--config", str(two), "--task", "time", "--output", str(out))
    assert bad.returncode == 2 and "disagree on time.budget_s" in bad.stderr and not out.exists()
    zero = run_main("--config", str(one), "--task", "time", "--set", "time.budget_s=0", "--output", str(out))
    assert zero.returncode == 2 and "budget_s" in zero.stderr and not out.exists()


def test_time_loads_a_checkpoint_and_rejects_load_with_several_configs(write_config, tmp_path):
    cfg = write_config({"train": {"epochs": 1}, "time": {"budget_s": 1, "warmup": 0, "iters": 1, "latency_iters": 1}})
    run = tmp_path / "run"
    assert run_main("--config", str(cfg), "--output", str(run)).returncode == 0
    ok = run_main("--config", str(cfg), "--task", "time", "--load", str(run), "--output", str(tmp_path / "t"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "t" / "time.json").read_text())[0]["batch_size"] == 16  # the CPU's default
    bad = run_main("--config", str(cfg), "--config", str(cfg), "--task", "time", "--load", str(run))
    assert bad.returncode == 2 and "--load gives weights for one model" in bad.stderr


def test_viz_tasks_need_an_attention_model(write_config):
    for task in ("viz", "viz_1", "gauss_viz"):
        result = run_main("--config", str(write_config()), "--task", task)
        assert result.returncode == 2 and "has no attention layers" in result.stderr, result.stderr
