"""A tiny ViT trains end to end with the full small-data recipe, resumes, and its attention is drawn."""

from __future__ import annotations

import json

from common import tasks
from common.config import load_config
from tests.helpers import assert_learns, run_main

TINY_VIT = {
    "model": {"name": "vit_cifar_spt_lsa", "image_size": 16, "dim": 16, "depth": 2, "heads": 2},
    "data": {"augment": {"policy": "autoaugment", "erase_prob": 0.25, "erase_value": "zero", "repeats": 3,
                         "mixup_alpha": 1.0, "cutmix_alpha": 1.0, "mix_prob": 0.5}},
    "train": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
              "schedule": {"name": "cosine", "warmup_epochs": 1}, "label_smoothing": 0.1},
}


def test_recipe_trains_logs_lsa_temperatures_and_resumes(write_config, tmp_path):
    path = write_config(TINY_VIT)
    summary = tasks.train(load_config(path), output=str(tmp_path / "run"))
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["epochs"] == 2
    temperatures = {k: v for k, v in summary["model_metrics"].items() if k.endswith("lsa_temperature")}
    assert set(temperatures) == {"blocks.0.attn/lsa_temperature", "blocks.1.attn/lsa_temperature"}
    assert all(v > 0 for v in temperatures.values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["train/acc"] <= 1.0 for r in records)  # mixed targets count by their larger share
    again = run_main("--config", str(path), "--output", str(tmp_path / "run"), "--set", "train.epochs=3")
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stdout


def test_viz_draws_patch_and_cls_maps(write_config, tmp_path):
    path = write_config({"model": TINY_VIT["model"]})
    result = run_main("--config", str(path), "--task", "viz", "--output", str(tmp_path / "viz"))
    assert result.returncode == 0, result.stderr
    stats = json.loads(next((tmp_path / "viz").glob("*_stats.json")).read_text())
    names = [layer["name"] for layer in stats["layers"]]
    assert names == ["blocks.0.attn", "blocks.0.attn[cls]", "blocks.1.attn", "blocks.1.attn[cls]"]
    cls = stats["layers"][1]
    assert cls["query_token"] == "cls" and cls["mean_distance_px"] == [None, None]
    assert stats["layers"][0]["key_stride_px"] == [4.0, 4.0] and all(d > 0 for d in stats["layers"][0]
                                                                      ["mean_distance_px"])
    result = run_main("--config", str(path), "--task", "viz_1", "--pixel", "3", "14",
                      "--output", str(tmp_path / "viz1"))
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "viz1").glob("viz_1_*_y3_x14.png"))


def test_a_small_vit_learns(write_config, tmp_path):
    assert_learns(write_config, tmp_path, {"name": "vit", "image_size": 16, "patch_size": 4, "dim": 32, "depth": 2,
                                           "heads": 2, "drop_path": 0.0})
