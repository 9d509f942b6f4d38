"""Every shipped config validates and builds its model; metafile parameter counts are what the models have."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import expand_config_lists, is_config_list, load_config
from common.data.loaders import input_spec
from common.tasks.study import is_study_file, load_study
from common.train.engine import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
LISTS = [p for p in CONFIGS if p.name != "metafile.yaml" and is_config_list(p)]  # e.g. configs/compare/cifar.yaml
STUDIES = [p for p in CONFIGS if is_study_file(p)]  # e.g. configs/study/fashion_mnist.yaml
RUNNABLE = [p for p in CONFIGS if p.name != "metafile.yaml" and "datasets" not in p.parts and p not in LISTS
            and p not in STUDIES]


@pytest.mark.parametrize("path", LISTS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_lists_name_runnable_configs(path):
    listed, _ = expand_config_lists([path])
    assert listed and all(p.resolve() in {r.resolve() for r in RUNNABLE} for p in listed)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_files_name_configs_that_build(path, tmp_path):
    study = load_study(path, output=str(tmp_path / "study"))
    assert len(study.runs) == len(study.names) * len(study.seeds) and not (tmp_path / "study").exists()
    for run in study.runs[:len(study.names)]:
        input_size, num_classes = input_spec(run.cfg.data)
        build_model(run.cfg.model.name, run.cfg.model.kwargs, num_classes, input_size)


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_validates_and_builds(path):
    cfg = load_config(path)
    input_size, num_classes = input_spec(cfg.data)
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name == "metafile.yaml"],
                         ids=lambda p: p.parent.name)
def test_metafile_parameter_counts(path):
    for entry in yaml.safe_load(path.read_text())["models"]:
        num_classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[entry["dataset"]]
        model = build_model(entry["name"], entry.get("kwargs", {}), num_classes)
        assert sum(p.numel() for p in model.parameters()) == entry["params"], entry["name"]
