"""A short synthetic training run through the engine: the spans move, are logged, summarised and drawn."""

from __future__ import annotations

import json

from common import tasks
from common.config import load_config
from tests.helpers import assert_learns

SPAN_KEYS = [f"stages.{s}/span_px/head{h}" for s in ("0.0.mix", "1.0.mix.0") for h in (0, 1)]


def test_spans_move_and_are_logged_summarised_and_drawn(write_config, tmp_path):
    cfg = load_config(write_config({
        "model": {"name": "resnet", "block": "bottleneck", "layers": [1, 1], "widths": [8, 16], "stem_width": 8,
                  "mixer": "adaptive_span", "downsample": "avgpool",
                  "mixer_kwargs": {"heads": 2, "max_span": 3, "R": 1.0, "span_init": 0.6, "span_penalty": 0.25}},
        "data": {"synthetic": {"train_size": 80, "test_size": 20, "image_size": 16}},
        "train": {"epochs": 2, "batch_size": 16, "schedule": {"name": "constant", "warmup_epochs": 0}},
        "log": {"tensorboard": False},
    }))
    summary = tasks.train(cfg, output=str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in SPAN_KEYS:
        first, second = records[0][key], records[1][key]
        # the penalty (0.25 per unit z) dominates: every span shrinks from S * 0.6 = 1.8 px, and stays in [0, S]
        assert 0.0 <= second < first < 1.8, key
    best = records[summary["best_epoch"] - 1]  # the summary describes the tested (best) checkpoint
    assert {key: best[key] for key in SPAN_KEYS} == {key: summary["model_metrics"][key] for key in SPAN_KEYS}
    assert records[1]["stages.0.0.mix/window_px"] <= 5  # from 7 x 7 at init
    assert records[1]["stages.0.0.mix/map_size"] == records[1]["stages.1.0.mix.0/map_size"] == 16  # pooled after
    assert (tmp_path / "run" / "spans.png").stat().st_size > 10_000


def test_a_network_of_adaptive_span_layers_learns(write_config, tmp_path):
    assert_learns(write_config, tmp_path, {"name": "resnet", "block": "basic", "layers": [1, 1], "widths": [8, 16],
                                           "stem_width": 8, "mixer": "adaptive_span", "downsample": "avgpool",
                                           "mixer_kwargs": {"heads": 2, "max_span": 2}})
