"""Config inheritance, overrides, validation errors (one line, exit code 2, nothing written)."""

from __future__ import annotations

import pytest
import yaml

from common.config import config_from_dict, config_to_dict, dump_config, is_study_file, load_config
from common.errors import UserError
from tests.helpers import run_main


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_bases_extend_and_override_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "a.yaml", {"seed": 1, "train": {"epochs": 3, "batch_size": 64}})
    write(tmp_path / "b.yaml", {"seed": 2, "train": {"optimizer": {"lr": 0.5}}})
    cfg_path = write(tmp_path / "sub" / "c.yaml", {"base": ["../a.yaml", "../b.yaml"], "train": {"epochs": 7}})
    cfg = load_config(cfg_path)
    assert cfg.seed == 2  # the later base wins
    assert cfg.train.epochs == 7  # the file wins over its bases
    assert cfg.train.batch_size == 64 and cfg.train.optimizer.lr == 0.5
    assert cfg.train.optimizer.momentum == 0.9  # untouched defaults stay
    assert cfg.name == "c"


def test_nested_bases_and_single_string_base(tmp_path):
    write(tmp_path / "root.yaml", {"data": {"dataset": "cifar10"}})
    write(tmp_path / "mid.yaml", {"base": "root.yaml", "data": {"val_fraction": 0.2}})
    cfg = load_config(write(tmp_path / "leaf.yaml", {"base": "mid.yaml"}))
    assert cfg.data.dataset == "cifar10" and cfg.data.val_fraction == 0.2


def test_set_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"epochs": 3}, "model": {"name": "resnet"}})
    cfg = load_config(path, ["train.epochs=9", "train.optimizer.nesterov=true", "data.mean=[0.5, 0.5, 0.5]",
                             "model.widths=[8, 16]", "train.grad_clip=null"])
    assert cfg.train.epochs == 9 and cfg.train.optimizer.nesterov is True
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.model.kwargs["widths"] == [8, 16]
    assert cfg.train.grad_clip is None


def test_model_block_is_replaced_when_the_name_changes(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"name": "resnet18", "stem": "cifar"}})
    cfg = load_config(write(tmp_path / "c.yaml", {"base": "base.yaml", "model": {"name": "wrn28_10"}}))
    assert cfg.model.name == "wrn28_10" and cfg.model.kwargs == {}
    cfg = load_config(write(tmp_path / "d.yaml", {"base": "base.yaml", "model": {"num_classes": 10}}))
    assert cfg.model.kwargs == {"stem": "cifar", "num_classes": 10}


def test_round_trip_through_the_saved_form(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", {"model": {"name": "resnet18", "stem": "cifar"}}))
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("data, overrides, expected", [
    ({"train": {"lr": 0.1}}, [], "unknown key 'train.lr' (did you mean 'train.optimizer.lr'?)"),
    ({"trian": {"epochs": 1}}, [], "unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"epoch": 1}}, [], "did you mean 'train.epochs'?"),
    ({"train": {"epochs": "ten"}}, [], "train.epochs must be an integer >= 1 and <= 100000, got 'ten'"),
    ({"train": {"epochs": 0}}, [], "train.epochs must be an integer >= 1 and <= 100000, got 0"),
    ({"train": {"optimizer": {"lr": -1}}}, [], "train.optimizer.lr must be a number > 0.0, got -1"),
    ({"data": {"val_fraction": 1.0}}, [], "data.val_fraction must be a number >= 0.0 and < 1.0"),
    ({"data": {"dataset": "cifar11"}}, [], "data.dataset must be one of"),
    ({"train": {"amp": True}}, [], "train.amp must be one of 'none', 'bf16', 'fp16', got True"),
    ({"train": "fast"}, [], "'train' must be a section"),
    ({}, ["train.epochs=-3"], "--set train.epochs=-3: train.epochs must be an integer >= 1"),
    ({}, ["train.optimizer.lrr=1"], "--set train.optimizer.lrr=1: unknown key 'train.optimizer.lrr'"),
    ({"model": {"name": "resnet99"}}, [], "unknown model 'resnet99'"),
    ({"model": {"name": "resnet18", "depth": 3}}, [], "model 'resnet18' has no option 'depth'"),
    ({"train": {"schedule": {"name": "multistep"}}}, [], "a multistep schedule needs train.schedule.milestones"),
    ({"data": {"augment": {"policy": "autoaugmnet"}}}, [], "(did you mean 'autoaugment'?)"),
    ({"data": {"augment": {"erase_area": [0.4, 0.1]}}}, [], "data.augment.erase_area must be [min, max]"),
    ({"data": {"augment": {"randaugment_magnitude": 31}}}, [], "data.augment.randaugment_magnitude must be an "
                                                              "integer >= 0 and <= 30"),
    ({"data": {"augment": {"mixup": 1.0}}}, [], "did you mean 'data.augment.mixup_alpha'?"),
    ({"model": {"name": "vit_cifar", "patch": 2}}, [], "model 'vit_cifar' has no option 'patch' (did you mean "
                                                      "'patch_size'?)"),
])
def test_errors_name_key_file_and_what_is_allowed(tmp_path, data, overrides, expected):
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if not overrides:
        assert str(path) in message


def test_unknown_key_names_the_base_file_it_came_from(tmp_path):
    base = write(tmp_path / "base.yaml", {"train": {"epochz": 3}})
    with pytest.raises(UserError, match="base.yaml: unknown key 'train.epochz'"):
        load_config(write(tmp_path / "c.yaml", {"base": "base.yaml"}))
    assert base.exists()


def test_missing_base_bad_yaml_and_circular_bases(tmp_path):
    with pytest.raises(UserError, match="base config not found: nope.yaml"):
        load_config(write(tmp_path / "a.yaml", {"base": "nope.yaml"}))
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="cannot parse YAML"):
        load_config(tmp_path / "broken.yaml")
    write(tmp_path / "x.yaml", {"base": "y.yaml"})
    write(tmp_path / "y.yaml", {"base": "x.yaml"})
    with pytest.raises(UserError, match="circular base"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(UserError, match="--set expects KEY=VALUE"):
        load_config(write(tmp_path / "ok.yaml", {}), ["train.epochs"])


@pytest.mark.parametrize("changes, args, expected", [
    ({"train": {"lr": 0.1}}, [], "unknown key 'train.lr'"),
    ({}, ["--set", "train.batch_size=0"], "train.batch_size must be an integer >= 1"),
    ({"model": {"name": "resnet", "mixer": "sasa9"}}, [], "unknown mixer 'sasa9'"),
    ({"data": {"dataset": "cifar10", "root": "/nonexistent/data"}}, [], "CIFAR-10 not found"),
])
def test_cli_config_errors_exit_2_with_one_line_and_write_nothing(write_config, tmp_path, changes, args, expected):
    path = write_config(changes)
    out = tmp_path / "run"
    result = run_main("--config", str(path), "--task", "train", "--output", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    ("train.optimizer.lr=.nan", "train.optimizer.lr must be a finite number > 0.0, got nan"),
    ("train.optimizer.lr=.inf", "train.optimizer.lr must be a finite number > 0.0, got inf"),
    ("train.optimizer.weight_decay=.inf", "train.optimizer.weight_decay must be a finite number >= 0.0"),
    ("train.schedule.warmup_epochs=.nan", "train.schedule.warmup_epochs must be a finite number"),
    ("train.grad_clip=.inf", "train.grad_clip must be a finite number > 0.0"),
    ("data.augment.mixup_alpha=nan", "data.augment.mixup_alpha must be a finite number"),
    ("data.mean=[.nan, 0.5, 0.5]", "data.mean[0] must be a finite number, got nan"),
    ("train.optimizer.lr=1e999", "train.optimizer.lr must be a finite number"),
    ("seed=1180591620717411303424", "seed must be an integer >= 0 and <= 4294967295"),
    ("data.split_seed=-1", "data.split_seed must be an integer >= 0 and <= 4294967295"),
    ("train.epochs=100000000000000000000000000000", "train.epochs must be an integer >= 1 and <= 100000"),
    ("train.batch_size=1000000000000", "train.batch_size must be an integer >= 1 and <= 1048576"),
    ("model.widths=[a, b]", "model.widths of 'resnet' must be a list of integers, got ['a', 'b']"),
    ("model.layers=5", "model.layers of 'resnet' must be a list of integers, got 5"),
    ("model.stem_width=1.5", "model.stem_width of 'resnet' must be an integer, got 1.5"),
    ("model.dropout=.nan", "model.dropout of 'resnet' must be a number, got nan"),
    ("model.zero_init_residual=maybe", "model.zero_init_residual of 'resnet' must be true or false"),
    ("nosuch.deep.key=3", "--set nosuch.deep.key=3: unknown key 'nosuch'"),
    ("train.nosuch.deep=3", "--set train.nosuch.deep=3: unknown key 'train.nosuch'"),
])
def test_non_finite_huge_and_mistyped_values_are_refused(tmp_path, override, expected):
    path = write(tmp_path / "c.yaml", {"model": {"name": "resnet", "widths": [8, 16], "layers": [1, 1]}})
    with pytest.raises(UserError) as info:
        load_config(path, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, expected", [
    (b"seed: 1\nname: \xff\xfe\n", "line 2: not UTF-8 text (byte 0xff)"),
    (b"seed: 1\nseed: 2\n", "line 2: cannot parse YAML: key 'seed' is given twice (also on line 1)"),
    (b"train:\n  epochs: 1\n  epochs: 2\n", "key 'epochs' is given twice"),
    (b"", "is empty: a config needs at least a model or a base"),
    (b"# only a comment\n", "is empty"),
    (b"1: 2\n", "key 1 is not a name"),
    (b"seed: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    (b"train:\n\tepochs: 1\n", "cannot parse YAML"),
])
def test_files_that_are_not_clean_yaml_mappings_are_refused(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_config_too_deep_to_parse_is_not_taken_for_a_study(tmp_path):
    """main.py asks is_study_file first; its own parse once let the RecursionError out as a traceback (the
    hostile-input audit's deep-nesting case), before the config loader could say what is wrong."""
    path = tmp_path / "deep.yaml"
    path.write_bytes(b"seed: " + b"[" * 20000 + b"]" * 20000 + b"\n")
    assert not is_study_file(path)
    with pytest.raises(UserError, match="nested too deeply"):
        load_config(path)


def test_a_model_that_cannot_be_built_with_its_options_is_a_user_error():
    from common.train.engine import build_model

    with pytest.raises(UserError, match=r"model 'resnet' cannot be built with these options \(.*stem_width=-3\)"):
        build_model("resnet", {"widths": [8, 16], "layers": [1, 1], "stem_width": -3}, 10)
    with pytest.raises(UserError, match="widths \\(2\\) and layers \\(3\\) must have the same length"):
        build_model("resnet", {"widths": [8, 16], "layers": [1, 1, 1]}, 10)
