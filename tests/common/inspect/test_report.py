"""The report task (means and t intervals over seeds, the paper's numbers), config lists and the cost plot."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from click.testing import CliRunner
from scipy import stats

from common.config import expand_config_lists
from common.errors import UserError
from common.inspect import report
from common.inspect.timing import TimingResult
from main import main
from tests.helpers import run_main

RESNET18 = {"name": "resnet18", "stem": "cifar"}


def make_run(folder, config, test_acc, seed=0, model=RESNET18, dataset="cifar10", val_acc=None, finished=True):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": config, "seed": seed, "model": model,
                                                        "data": {"dataset": dataset}}))
    if finished:
        (folder / "summary.json").write_text(json.dumps({
            "config": config, "model": model["name"], "dataset": dataset, "params": 11173962, "epochs": 200,
            "best_val_acc": test_acc + 0.01 if val_acc is None else val_acc, "test_acc": test_acc,
            "wall_time_s": 3600.0 * (1 + seed)}))
    return folder


def test_seeds_are_grouped_with_mean_and_t_interval_and_the_paper_number(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in enumerate([0.90, 0.92, 0.95]):
        make_run(runs / "resnet18_cifar10" / f"seed{seed}", "resnet18_cifar10", acc, seed=seed)
    make_run(runs / "quick" / "a", "quick", 0.5, model={"name": "resnet", "widths": [8, 16]}, dataset="synthetic")
    make_run(runs / "quick" / "unfinished", "quick", 0.0, finished=False)
    records = report.report([str(runs)], output=str(tmp_path / "out"))
    by_config = {r["config"]: r for r in records}
    assert set(by_config) == {"resnet18_cifar10", "quick"}

    r = by_config["resnet18_cifar10"]
    values = [90.0, 92.0, 95.0]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert r["seeds"] == 3 and r["seed_values"] == "0/1/2"
    assert r["test_acc_mean"] == pytest.approx(mean) and r["test_acc_ci95"] == pytest.approx(half)
    assert (r["test_acc_ci95_low"], r["test_acc_ci95_high"]) == pytest.approx((mean - half, mean + half))
    assert r["best_val_acc_mean"] == pytest.approx(mean + 1)
    assert r["paper_top1"] == 94.82 and r["diff_vs_paper"] == pytest.approx(mean - 94.82)  # baselines metafile
    assert r["wall_time_s_mean"] == pytest.approx(7200.0) and r["epochs"] == "200"

    one = by_config["quick"]
    assert one["seeds"] == 1 and one["test_acc_ci95"] is None and one["paper_top1"] is None

    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{mean:.2f} ± {half:.2f}" in md and "50.00 (CI n/a)" in md and "94.82" in md
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert {row["config"]: row["seeds"] for row in rows} == {"resnet18_cifar10": "3", "quick": "1"}


def test_paper_numbers_need_the_same_model_options_and_dataset():
    entries = report.load_metafiles()
    sasa = report.paper_reference({"name": "sasa_resnet50", "kernel_size": 5}, "imagefolder", "x", entries)
    assert sasa["reference"]["top1"] == 77.2  # stem defaults to imagenet; the k = 5 ablation entry
    assert report.paper_reference({"name": "sasa_resnet50", "stem": "attention"}, "imagefolder", "x",
                                  entries)["reference"]["top1"] == 77.6
    assert report.paper_reference(RESNET18, "cifar100", "x", entries) is None
    assert report.paper_reference({"name": "san10_pairwise", "stem": "cifar"}, "cifar10", "x", entries) is None


def test_report_cli(tmp_path):
    make_run(tmp_path / "a", "resnet18_cifar10", 0.9, seed=1)
    make_run(tmp_path / "b", "resnet18_cifar10", 0.8, seed=2)
    result = run_main("--task", "report", "--runs", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "| resnet18_cifar10 |" in result.stdout and (tmp_path / "report.md").is_file()
    assert "| 2 |" in result.stdout  # two seeds, one row
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [(["--runs", str(empty)], "no finished runs"), ([], "needs --runs"),
                          (["--runs", str(empty), "--config", "x.yaml"], "drop --config")]:
        result = CliRunner().invoke(main, ["--task", "report", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_config_lists_expand_and_are_validated(write_config, tmp_path):
    write_config(name="a"), write_config({"model": {"widths": [16, 32]}}, name="b")
    good = tmp_path / "list.yaml"
    good.write_text(yaml.safe_dump({"configs": ["a.yaml", "b.yaml"]}))
    assert expand_config_lists([good])[0] == [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for content, message in [({"configs": ["a.yaml"], "train": {}}, "only the key 'configs'"),
                             ({"configs": []}, "non-empty list"),
                             ({"configs": ["missing.yaml"]}, "listed config not found: missing.yaml")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(content))
        with pytest.raises(UserError, match=message):
            expand_config_lists([bad])
    out = tmp_path / "time"
    result = run_main("--task", "time", "--config", str(good), "--set", "time.batch_size=2", "--set",
                      "time.budget_s=0.5", "--set", "time.iters=1", "--set", "time.warmup=0", "--set",
                      "time.latency_iters=1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "time.json").read_text())
    assert [r["model"] for r in records] == ["a", "b"] and all(r["batch_size"] == 2 for r in records)
    assert (out / "time_vs_params.png").is_file()
    result = run_main("--task", "train", "--config", str(good))
    assert result.returncode == 2 and "only --task time accepts" in result.stderr


def test_cost_plot(tmp_path):
    results = [TimingResult(name, params, 1, 2, train, 3 * train, 1.0, 0.1, 10.0, "cpu (1 thread)", 8)
               for name, params, train in [("a", 1e5, 100.0), ("b", 2e6, 20.0)]]
    path = report.plot_cost(results, tmp_path / "cost.png")
    assert path.is_file() and path.stat().st_size > 10000


def quick_run(folder, seed=0, epochs=10, world_size=1, finished=True, test_acc=0.9, lr=0.1, done=None):
    """A run folder as training writes it: the resolved config, metrics.jsonl and (when finished) summary.json."""
    folder.mkdir(parents=True)
    config = {"name": "quickstart", "seed": seed, "output_root": f"/elsewhere/{seed}", "model": {"name": "resnet"},
              "data": {"dataset": "synthetic", "num_workers": seed}, "log": {"quiet": bool(seed % 2)},
              "train": {"epochs": epochs, "optimizer": {"lr": lr}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    done = epochs if done is None else done
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, done + 1)))
    if finished:
        (folder / "summary.json").write_text(json.dumps({
            "config": "quickstart", "model": "resnet", "dataset": "synthetic", "params": 1000, "epochs": done,
            "best_val_acc": test_acc, "test_acc": test_acc, "wall_time_s": 60.0, "world_size": world_size}))
    return folder


def test_rows_are_configs_minus_the_seed_and_name_what_differs(tmp_path):
    runs = tmp_path / "runs"
    for seed, acc in ((0, 0.90), (1, 0.92), (2, 0.94)):  # seeds differ in seed, folders, workers, logging only
        quick_run(runs / f"a{seed}", seed=seed, test_acc=acc)
    quick_run(runs / "b", seed=0, epochs=20, test_acc=0.5)  # another epoch count: a row of its own
    quick_run(runs / "c", seed=0, world_size=2, test_acc=0.4)  # two processes: another row
    quick_run(runs / "d", seed=3, finished=False, done=4)  # unfinished: flagged, never averaged
    quick_run(runs / "e", seed=4, epochs=20, done=10)  # finished 10 epochs, then resumed with 20: unfinished
    records = report.report([str(runs)], output=str(tmp_path / "out"))
    rows = {(r["differs"]): r for r in records}
    assert len(records) == 3
    main_row = rows["train.epochs=10, world_size=1"]
    assert main_row["seeds"] == 3 and main_row["seed_values"] == "0/1/2" and main_row["unfinished"] == 1
    assert main_row["test_acc_mean"] == pytest.approx(92.0)
    assert f"{runs / 'd'} (epoch 4/10)" in main_row["unfinished_dirs"]
    longer = rows["train.epochs=20, world_size=1"]
    assert longer["seeds"] == 1 and longer["test_acc_mean"] == pytest.approx(50.0) and longer["unfinished"] == 1
    assert "resumed with more epochs after a finished 10" in longer["unfinished_dirs"]
    assert rows["train.epochs=10, world_size=2"]["test_acc_mean"] == pytest.approx(40.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| quickstart [train.epochs=10, world_size=1] |" in md and "| 3 (+1 unfinished) |" in md
    assert "quickstart: 3 rows, its runs differ in train.epochs, world_size" in md


def test_a_seed_counts_once(tmp_path):
    import os

    first = quick_run(tmp_path / "runs" / "first", seed=0, test_acc=0.2)
    quick_run(tmp_path / "runs" / "second", seed=0, test_acc=0.8)
    os.utime(first / "summary.json", (1, 1))  # the older of the two
    records = report.report([str(tmp_path / "runs")], output=str(tmp_path / "out"))
    assert len(records) == 1 and records[0]["seeds"] == 1 and records[0]["test_acc_mean"] == pytest.approx(80.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"seed 0 ran more than once; counted its newest run, not {first}" in md


def test_only_unfinished_runs_is_an_error_that_says_so(tmp_path):
    quick_run(tmp_path / "a", finished=False, done=2)
    with pytest.raises(UserError, match=r"no finished runs .* \(1 unfinished\)"):
        report.report([str(tmp_path)])
