"""Every paper config runs the audited recipe, value by value (configs/<family>/metafile.yaml, `recipe`).

Each metafile's `recipe` tables list, item by item, the official training script's value and ours. For every
config a table covers, the config loaded through `load_config` must hold `ours` for every item that names a
config key, and the same config with the table's `official_variant` --set lines must hold `official`: so every
deliberate departure has a switch that undoes it, and a config that drifts from its audit fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml

from common.config import load_config
from common.data.loaders import DeviceLoader
from common.registry import MODELS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METAFILES = sorted(CONFIGS.glob("*/metafile.yaml"))
_MISSING = object()


def _tables():
    for path in METAFILES:
        for table in yaml.safe_load(path.read_text()).get("recipe", []):
            yield path.parent, table


def _cases():
    for family, table in _tables():
        for stem in table["configs"]:
            yield pytest.param(family, table, stem, id=f"{family.name}/{stem}")


def value_at(cfg, key: str):
    """A config value by dotted key; model.* falls back to the model's own default."""
    if key.startswith("model."):
        option = key.split(".", 1)[1]
        if option in cfg.model.kwargs:
            return cfg.model.kwargs[option]
        default = inspect.signature(MODELS.get(cfg.model.name)).parameters.get(option)
        assert default is not None, f"{cfg.model.name} has no option {option!r}"
        return default.default
    node = cfg
    for part in key.split("."):
        assert dataclasses.is_dataclass(node) and hasattr(node, part), f"no config key {key}"
        node = getattr(node, part)
    return node


def _applies(item: dict, stem: str) -> bool:
    return "key" in item and stem in item.get("configs", [stem])


def official_variant(table: dict, stem: str) -> list[str]:
    """The table's --set lines for one config: a plain line applies to every config, {set, configs} to some."""
    lines = []
    for entry in table.get("official_variant", []):
        if isinstance(entry, str):
            lines.append(entry)
        elif stem in entry["configs"]:
            lines.append(entry["set"])
    return lines


def test_every_metafile_has_a_recipe_and_every_paper_config_is_audited_once():
    for path in METAFILES:
        meta = yaml.safe_load(path.read_text())
        assert meta.get("recipe"), f"{path} has no recipe table"
        covered = [stem for table in meta["recipe"] for stem in table["configs"]]
        assert len(covered) == len(set(covered)), f"{path}: a config is in two recipe tables"
        for entry in meta["models"]:
            if "config" in entry:
                assert Path(entry["config"]).stem in covered, f"{entry['config']} is not in {path}'s recipe"
        for stem in covered:
            assert (path.parent / f"{stem}.yaml").is_file(), f"{path}: no config {stem}.yaml"


@pytest.mark.parametrize("family, table", [pytest.param(f, t, id=f"{f.name}/{t['name']}") for f, t in _tables()])
def test_every_item_says_where_it_comes_from_and_why_it_differs(family, table):
    assert table["official_code"] or table.get("official_source"), table["name"]
    for item in table["items"]:
        assert {"item", "official", "ours"} <= set(item), item
        if item["official"] != item["ours"]:
            assert item.get("reason"), f"{table['name']}: '{item['item']}' differs without a reason"
        if "key" in item:
            assert item.get("source"), f"{table['name']}: '{item['item']}' names no source"
        for stem in item.get("configs", []):
            assert stem in table["configs"], f"'{item['item']}' names {stem}, which the table does not cover"


# A citation into the official code: `path:N`, `path:N-M` or `path@abc1234:N` (a file held at another commit).
_LINE_CITATION = re.compile(r"[\w./*-]+\.(?:py|sh|md|yaml)(?:@[0-9a-f]{7})?(?: \([^)]*\))?:\d+")


@pytest.mark.parametrize("family, table", [pytest.param(f, t, id=f"{f.name}/{t['name']}") for f, t in _tables()
                                           if t["official_code"]])
def test_every_source_in_the_official_code_names_its_line(family, table):
    for item in table["items"]:
        if "source" in item and not item["source"].startswith("PAPERS.md"):
            assert _LINE_CITATION.search(item["source"]), f"{table['name']}: '{item['item']}' cites no file:line"


@pytest.mark.parametrize("family, table, stem", list(_cases()))
def test_config_holds_every_audited_value(family, table, stem):
    cfg = load_config(family / f"{stem}.yaml")
    for item in table["items"]:
        if _applies(item, stem):
            assert value_at(cfg, item["key"]) == item["ours"], f"{stem}: {item['item']} ({item['key']})"


@pytest.mark.parametrize("family, table, stem", list(_cases()))
def test_official_variant_holds_every_official_value(family, table, stem):
    cfg = load_config(family / f"{stem}.yaml", official_variant(table, stem))
    for item in table["items"]:
        if _applies(item, stem):
            assert value_at(cfg, item["key"]) == item["official"], f"{stem}: {item['item']} ({item['key']})"


# ---------------------------------------------------------------------------- the two examples, spelled out


def _cifar_sized_loader(cfg, n: int) -> DeviceLoader:
    """The config's training loader over n one-pixel images: only the sampler matters for the step count."""
    aug = cfg.data.augment
    return DeviceLoader(torch.zeros(n, 1, 1, 3, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                        cfg.train.batch_size, torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, train=True,
                        repeats=aug.repeats, repeat_mode=aug.repeat_mode)


def test_vit_trains_as_many_steps_as_the_official_script():
    cfg = load_config(CONFIGS / "vit" / "vit_cifar_spt_lsa_cifar10.yaml", ["data.val_fraction=0"])
    assert (cfg.data.augment.repeats, cfg.data.augment.repeat_mode, cfg.train.batch_size) == (3, "official", 128)
    steps = len(_cifar_sized_loader(cfg, 50_000))
    assert steps == 1171 and steps * cfg.train.epochs == 117_100  # the script: 150,000 // 128 per epoch
    in_batch = load_config(CONFIGS / "vit" / "vit_cifar_cifar10.yaml", ["data.augment.repeat_mode=in_batch"])
    assert len(_cifar_sized_loader(in_batch, 50_000)) == 390  # what `repeats: 3` used to mean: a third


def test_sa_conv_initialises_as_the_official_code():
    for name in ("quadratic", "quadratic_aniso", "learned", "learned_content"):
        cfg = load_config(CONFIGS / "sa_conv" / f"{name}_cifar10.yaml")
        assert cfg.model.kwargs["init"] == "torch_default"
        assert cfg.train.optimizer.decay_params == "unmarked" and cfg.data.std == [0.2023, 0.1994, 0.2010]
    resnet = load_config(CONFIGS / "sa_conv" / "resnet18_cifar10.yaml")
    assert resnet.model.kwargs["init"] == "torch_default"
    assert (resnet.train.schedule.name, resnet.train.schedule.milestones) == ("multistep", [80, 150, 250])
