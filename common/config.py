"""Run configuration: YAML files with inheritance, command-line overrides, typed validation.

A config file may name `base:` files (a path or a list, relative to the file) that
it extends; later bases override earlier ones and the file overrides all of its
bases. `--set a.b=value` overrides any key afterwards (the value is parsed as
YAML). Every key is then checked against the dataclasses below before anything
runs: an unknown key, a wrong type or an out-of-range value (NaN and infinity
included; every integer has an upper bound) is a `UserError` naming the key,
the file it came from and what is allowed. A file that is not UTF-8, repeats a
key, or is empty is refused too. None of this imports torch: only the model
options, checked last, need the model registry.

The `model:` block is the registered model name plus that model's keyword
arguments, checked against the model's signature (names, and the types it
annotates). When a file sets a different
`model.name` than its base, the base's model block is dropped, since keyword
arguments of one model rarely fit another.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from common.errors import UserError, did_you_mean


INT_MAX = 2 ** 31 - 1  # the bound of an integer key that names none of its own
SEED_MAX = 2 ** 32 - 1  # numpy's seeds are 32-bit


def _bounded(default, *, lo=None, hi=None, lo_open=False, hi_open=False, **kw):
    """A dataclass field with a numeric range that validation enforces."""
    metadata = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


# ---------------------------------------------------------------------------- schema


@dataclass
class SyntheticConfig:
    train_size: int = _bounded(10000, lo=10, hi=1_000_000)
    test_size: int = _bounded(2000, lo=10, hi=1_000_000)
    image_size: int = _bounded(32, lo=16, hi=256)
    noise: float = _bounded(0.08, lo=0.0, hi=1.0)
    seed: int = _bounded(0, lo=0, hi=SEED_MAX)


@dataclass
class AugmentConfig:
    """Training-time augmentation, in this order: crop and flip, policy, normalisation, erasing, mixing."""

    crop_padding: int = _bounded(4, lo=0, hi=256)  # random crop after zero padding; 0 turns it off
    hflip: bool = True
    random_resized_crop: bool = True  # imagefolder only; in-memory datasets use crop_padding
    policy: Literal["none", "autoaugment", "randaugment"] = "none"
    autoaugment_policy: Literal["cifar10", "imagenet", "svhn"] = "cifar10"
    randaugment_ops: int = _bounded(2, lo=1, hi=16)
    randaugment_magnitude: int = _bounded(9, lo=0, hi=30)
    erase_prob: float = _bounded(0.0, lo=0.0, hi=1.0)  # random erasing of one box per image
    erase_area: list[float] = field(default_factory=lambda: [0.02, 0.4])  # box area, fraction of the image
    erase_min_aspect: float = _bounded(0.3, lo=0.0, hi=1.0, lo_open=True)  # aspect in [min, 1/min]
    # Fill: N(0, 1) noise, or 0 (the mean colour) after normalising, or the dataset's unnormalised mean written
    # into the normalised image (Zhong et al.'s reference code, which the small-data ViT script uses).
    erase_value: Literal["random", "zero", "unnormalized_mean"] = "random"
    erase_aspect: Literal["log_uniform", "uniform"] = "log_uniform"  # how the box's aspect ratio is drawn
    erase_attempts: int = _bounded(10, lo=1, hi=1000)  # tries to fit a box inside the image before giving up
    repeats: int = _bounded(1, lo=1, hi=64)  # repeated augmentation, see repeat_mode
    # in_batch (Hoffer et al. 2020): each epoch shows N/repeats images, each `repeats` times in a row.
    # official: the small-data ViT script's sampler call (one instance per image, epoch length x repeats): an
    # epoch is `repeats` fresh permutations back to back, so it is `repeats` times longer.
    repeat_mode: Literal["in_batch", "official"] = "in_batch"
    mixup_alpha: float = _bounded(0.0, lo=0.0)  # 0: off
    cutmix_alpha: float = _bounded(0.0, lo=0.0)  # 0: off
    mix_prob: float = _bounded(1.0, lo=0.0, hi=1.0)  # chance that a batch is mixed at all
    mix_switch_prob: float = _bounded(0.5, lo=0.0, hi=1.0)  # chance of CutMix rather than mixup when both are on
    # Whom each sample is mixed with: the batch in reverse order (timm), or a random permutation of the batch
    # (torch.randperm, as most official scripts; a sample can then be its own partner).
    mix_partners: Literal["reverse", "permutation"] = "reverse"


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "imagefolder"] = \
        "synthetic"
    root: str = "data"
    download: bool = False
    # That many training images, balanced over classes, drawn with split_seed before the validation split
    # (quick runs, data-efficiency studies); None: all of them.
    train_subset: Optional[int] = _bounded(None, lo=1, hi=10 ** 9)
    val_fraction: float = _bounded(0.1, lo=0.0, hi=1.0, hi_open=True)
    split_seed: int = _bounded(0, lo=0, hi=SEED_MAX)
    image_size: int = _bounded(224, lo=8, hi=4096)  # imagefolder crop size; in-memory datasets keep their own size
    num_workers: int = _bounded(4, lo=0, hi=256)
    mean: Optional[list[float]] = None  # per-channel normalisation; None: the dataset's own statistics
    std: Optional[list[float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = _bounded(0.1, lo=0.0, lo_open=True)
    momentum: float = _bounded(0.9, lo=0.0, hi=1.0, hi_open=True)
    nesterov: bool = False
    weight_decay: float = _bounded(5e-4, lo=0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = _bounded(1e-8, lo=0.0, lo_open=True)
    # Which parameters weight decay applies to: weight matrices and kernels only (not norms, biases or parameters
    # a model marks), everything the model does not mark, or every parameter (torch's default group).
    decay_params: Literal["matrices", "unmarked", "all"] = "matrices"


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = _bounded(0.0, lo=0.0)
    warmup_start_factor: float = _bounded(0.0, lo=0.0, hi=1.0)
    eta_min: float = _bounded(0.0, lo=0.0)
    milestones: list[float] = field(default_factory=list)  # epochs, for multistep
    gamma: float = _bounded(0.1, lo=0.0, lo_open=True)
    # The cosine's period in epochs, counted from the end of warmup; null: the rest of training (it ends at eta_min).
    # A longer period stops the cosine short of eta_min (e.g. a per-epoch CosineAnnealingLR whose T_max counts the
    # warmup epochs too).
    cosine_epochs: Optional[float] = _bounded(None, lo=0.0, lo_open=True)
    # step: the LR changes every optimiser step. epoch: once per epoch, at its start, to the schedule's value
    # there (torch schedulers stepped per epoch; the cosine then never quite reaches eta_min).
    interval: Literal["step", "epoch"] = "step"


@dataclass
class TrainConfig:
    epochs: int = _bounded(10, lo=1, hi=100_000)
    batch_size: int = _bounded(128, lo=1, hi=1_048_576)  # global: split across data-parallel ranks
    eval_batch_size: int = _bounded(500, lo=1, hi=1_048_576)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = _bounded(0.0, lo=0.0, hi=1.0, hi_open=True)
    grad_clip: Optional[float] = _bounded(None, lo=0.0, lo_open=True)  # max global grad norm
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    ema_decay: Optional[float] = _bounded(None, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    bn_momentum: Optional[float] = _bounded(None, lo=0.0, hi=1.0)  # torch convention: 1 - TF's decay
    checkpoint_every_steps: int = _bounded(0, lo=0, hi=10 ** 9)  # 0: only at epoch ends
    keep_every_epochs: int = _bounded(0, lo=0, hi=100_000)  # also keep epochs/epoch_NNNN.ckpt every N epochs (0: off)
    eval_every_epochs: int = _bounded(1, lo=1, hi=100_000)
    # Which split picks the reported checkpoint. val: the held-out split (data.val_fraction), test evaluated once
    # at the end. test: the test split every epoch, reporting its best accuracy, as the official scripts do
    # (optimistic; for reproducing a published number, with data.val_fraction: 0).
    selection: Literal["val", "test"] = "val"


@dataclass
class LogConfig:
    quiet: bool = False  # no progress bar: one line per epoch
    every_steps: int = _bounded(10, lo=1, hi=1_000_000)  # progress-bar refresh and non-finite-loss check
    tensorboard: bool = True
    # The `viz` grid of a fixed validation image to TensorBoard every N epochs (0: off).
    viz_every_epochs: int = _bounded(0, lo=0, hi=100_000)


@dataclass
class TimeConfig:
    batch_size: Optional[int] = _bounded(None, lo=1, hi=65536)  # default: 64 on CUDA, 16 on the CPU (tasks/costs.py)
    # Seconds of measurement per model; the models of one call share their budgets (their rounds interleave).
    # 35 s x 17 models: configs/compare/cifar.yaml takes about 10 minutes on 2 CPU cores.
    budget_s: float = _bounded(35.0, lo=0.0, lo_open=True, hi=86_400.0)
    warmup: int = _bounded(1, lo=0, hi=10_000)  # untimed calls of each workload before the rounds
    iters: int = _bounded(3, lo=1, hi=100_000)  # at least this many timed training steps and inference passes per model
    latency_iters: int = _bounded(10, lo=1, hi=100_000)  # at least this many timed batch-1 calls per model


@dataclass
class ModelConfig:
    name: str = "resnet18"
    kwargs: dict = field(default_factory=dict)


@dataclass
class Config:
    name: str = ""  # run name: default the config file's stem
    seed: int = _bounded(0, lo=0, hi=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False  # deterministic kernels: exact resume and reruns, slower on GPU
    output_root: str = "runs"
    # Packages to import before the model is built, so that a package outside common.registry.MODEL_PACKAGES
    # registers its models, mixers and figure tasks (mmengine's custom_imports).
    custom_imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    time: TimeConfig = field(default_factory=TimeConfig)


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load `path` with its bases, apply `--set` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config {path} is a folder; give a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    raw, sources = _load_with_bases(path, chain=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        _set_source(sources, key, value, f"--set {item}")
    raw.setdefault("name", path.stem)
    return build_config(raw, sources, default_source=str(path))


def is_config_list(path: str | Path) -> bool:
    """Whether a YAML file is a config list (`configs: [...]`, e.g. configs/compare/cifar.yaml)."""
    path = Path(path)
    if not path.is_file():
        return False
    data = _load_yaml(path)
    return "configs" in data and "seeds" not in data  # a study file also lists configs, with seeds


def is_study_file(path: str | Path) -> bool:
    """A study file (configs/study/*.yaml: `configs` and `seeds`), which only --task study runs."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError):  # not a study; the config loader says why
        return False
    return isinstance(data, dict) and "seeds" in data and "configs" in data


def expand_config_lists(paths) -> tuple[list[Path], list[Path]]:
    """The --config arguments with every config list replaced by the configs it names, and the lists found.

    A config list is a YAML file whose one key is `configs:`, a list of config paths relative to the file;
    `--set` overrides then apply to each listed config.
    """
    out, lists = [], []
    for path in map(Path, paths):
        if not is_config_list(path):
            out.append(path)
            continue
        lists.append(path)
        data = _load_yaml(path)
        extra = sorted(k for k in data if k != "configs")
        if extra:
            raise UserError(f"{path}: a config list has only the key 'configs', found {', '.join(map(repr, extra))}; "
                            f"put settings in the listed configs or pass them with --set")
        entries = data["configs"]
        if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
            raise UserError(f"{path}: 'configs' must be a non-empty list of config paths relative to the file, "
                            f"got {entries!r}")
        for entry in entries:
            target = path.parent / entry
            if not target.is_file():
                raise UserError(f"{path}: listed config not found: {entry} (looked at {target})")
            if is_config_list(target):
                raise UserError(f"{path}: {entry} is itself a config list; list its configs directly")
            out.append(target)
    return out, lists


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate an already-resolved config (e.g. the one saved in a checkpoint)."""
    return build_config(raw, {}, default_source=source)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, in the same shape the YAML files use."""
    out = dataclasses.asdict(cfg)
    out["model"] = {"name": cfg.model.name, **cfg.model.kwargs}
    return out


def flatten_config(d: dict, prefix: str = "") -> dict:
    """A resolved config as {dotted key: value}; the model block stays one value (its options go together)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and not (prefix == "" and key == "model"):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last) and non-name keys."""


def _construct_mapping(loader: _StrictLoader, node, deep: bool = False):
    first_line = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a name", key_node.start_mark)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (also on line {first_line[key]}); keep one",
                key_node.start_mark)
        first_line[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(path: Path) -> dict:
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the config as "
                        f"UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "invalid YAML"
        raise UserError(f"{path}:{where} cannot parse YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: cannot parse YAML: nested too deeply") from None
    except IsADirectoryError:
        raise UserError(f"config {path} is a folder; give a YAML file") from None
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    if data is None:
        raise UserError(f"{path} is empty: a config needs at least a model or a base (e.g. base: "
                        f"../quickstart.yaml); write {{}} for a run with every default")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _load_with_bases(path: Path, chain: tuple) -> tuple[dict, dict]:
    path = path.resolve()
    if path in chain:
        raise UserError(f"{path}: circular base: {' -> '.join(str(p) for p in chain + (path,))}")
    data = _load_yaml(path)
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: 'base' must be a path or a list of paths relative to the file")
    merged, sources = {}, {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise UserError(f"{path}: base config not found: {base} (looked at {base_path})")
        base_data, base_sources = _load_with_bases(base_path, chain + (path,))
        merged, sources = _merge(merged, sources, base_data, base_sources)
    own_sources = {}
    _record_sources(data, str(path), own_sources)
    return _merge(merged, sources, data, own_sources)


def _merge(dst: dict, dst_sources: dict, src: dict, src_sources: dict) -> tuple[dict, dict]:
    out, sources = dict(dst), dict(dst_sources)
    src_model = src.get("model")
    dst_model = dst.get("model")
    if isinstance(src_model, dict) and isinstance(dst_model, dict) and \
            "name" in src_model and src_model.get("name") != dst_model.get("name"):
        out.pop("model")
        sources = {k: v for k, v in sources.items() if not k.startswith("model.")}
    out = _deep_merge(out, src)
    sources.update(src_sources)
    return out, sources


def _deep_merge(dst: dict, src: dict) -> dict:
    out = dict(dst)
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _record_sources(data: dict, source: str, sources: dict, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = source
        if isinstance(value, dict):
            _record_sources(value, source, sources, dotted + ".")


def _set_source(sources: dict, key: str, value: Any, source: str) -> None:
    sources[key] = source
    parts = key.split(".")
    for i in range(1, len(parts)):  # sections that only --set creates are blamed on it too
        sources.setdefault(".".join(parts[:i]), source)
    if isinstance(value, dict):
        _record_sources(value, source, sources, key + ".")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set expects KEY=VALUE with a dotted key, e.g. --set train.epochs=5; got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {item}: the value is not valid YAML") from None
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{'.'.join(parents[:i + 1])}' is a value, not a section")
        node = child
    node[leaf] = value


# ---------------------------------------------------------------------------- validation


def build_config(raw: dict, sources: dict, default_source: str) -> Config:
    raw = dict(raw)
    model_raw = raw.pop("model", None)
    cfg = _build_dataclass(Config, raw, "", sources, default_source)
    _check_consistency(cfg, sources, default_source)
    # Last, as they import the model packages (and torch): everything above fails fast.
    _import_custom(cfg.custom_imports, sources.get("custom_imports", default_source))
    cfg.model = _build_model(model_raw, sources, default_source)
    return cfg


def _import_custom(packages: list[str], source: str) -> None:
    from common import registry

    try:
        registry.import_packages(packages)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def _build_model(raw: Any, sources: dict, default_source: str) -> ModelConfig:
    from common import registry

    where = sources.get("model", default_source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: 'model' must be a mapping with a 'name' and the model's keyword arguments")
    raw = dict(raw)
    name = raw.pop("name", ModelConfig.name)
    if not isinstance(name, str):
        raise UserError(f"{sources.get('model.name', where)}: model.name must be a string, got {name!r}")
    try:
        registry.check_model_args(name, raw)
    except UserError as exc:
        bad = getattr(exc, "key", None)
        source = sources.get(f"model.{bad}" if bad else "model.name", where)
        raise UserError(f"{source}: {exc}") from None
    _check_model_values(registry.MODELS.get(name), name, raw, sources, where)
    return ModelConfig(name=name, kwargs=raw)


def _check_model_values(factory, name: str, kwargs: dict, sources: dict, where: str) -> None:
    """Each model option against the type its factory annotates (int, float, str, bool, lists, unions)."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 - annotations that do not resolve: names were checked, types cannot be
        hints = {}
    params = inspect.signature(factory).parameters
    for key, value in kwargs.items():
        tp = hints.get(key)
        if tp is None and key in params and isinstance(params[key].default, float):
            tp = float  # unannotated, but a float default
        if tp is not None and not _matches_type(value, tp):
            source = sources.get(f"model.{key}", where)
            raise UserError(f"{source}: model.{key} of '{name}' must be {_describe(tp)}, got {value!r}")


def _matches_type(value: Any, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches_type(v, a) for v, a in zip(value, args))
        return not args or all(_matches_type(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or tp in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # a type a YAML value cannot be (a module, a callable): the model decides


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        keys.append(dotted)
        tp = _resolved_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp) and tp is not ModelConfig:
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _suggest(dotted: str) -> str:
    valid = _all_keys(Config) + ["model.name", "base"]
    parent, _, leaf = dotted.rpartition(".")
    siblings = [k for k in valid if k.rpartition(".")[0] == parent]
    same_leaf = [k for k in valid if k.rpartition(".")[2] == leaf]
    # A key put in the wrong section is the commonest slip, so an exact name elsewhere comes first.
    # A key given without its suffix (mixup for mixup_alpha) comes next.
    extended = [k for k in siblings if k.rpartition(".")[2].startswith(leaf)] if len(leaf) >= 3 else []
    close = same_leaf[:1] or extended[:1] or difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.5) or \
        difflib.get_close_matches(dotted, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    options = ", ".join(k.rpartition(".")[2] for k in siblings)
    return f" (valid keys here: {options})"


_HINT_CACHE: dict = {}


def _resolved_hints(cls) -> dict:
    if cls not in _HINT_CACHE:
        _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return _HINT_CACHE[cls]


def _build_dataclass(cls, raw: Any, prefix: str, sources: dict, default_source: str):
    where = sources.get(prefix.rstrip("."), default_source) if prefix else default_source
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.')}' must be a section (a mapping of keys), got {raw!r}")
    hints = _resolved_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        source = sources.get(dotted, default_source)
        if key not in names:
            raise UserError(f"{source}: unknown key '{dotted}'{_suggest(dotted)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = _build_dataclass(tp, value, dotted + ".", sources, default_source)
        else:
            values[key] = _check_value(value, tp, names[key].metadata, dotted, source)
    return cls(**values)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if origin in (list, tuple, collections.abc.Sequence) and args:
        inner = _describe(args[0])
        article, _, noun = inner.partition(" ")
        return f"a list of {noun}s" if article in ("a", "an") and " " not in noun else f"a list of items each {inner}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(tp, str(tp))


def _range_text(meta) -> str:
    parts = []
    if meta.get("lo") is not None:
        parts.append(f"{'>' if meta['lo_open'] else '>='} {meta['lo']}")
    if meta.get("hi") is not None:
        parts.append(f"{'<' if meta['hi_open'] else '<='} {meta['hi']}")
    return " and ".join(parts)


def _check_value(value: Any, tp, meta, dotted: str, source: str):
    def fail(allowed: str):
        raise UserError(f"{source}: {dotted} must be {allowed}, got {value!r}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], meta, dotted, source)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: {dotted} must be {_describe(tp)}, got {value!r}{did_you_mean(value, args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            fail(_describe(tp))
        return [_check_value(v, args[0], {}, f"{dotted}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            fail(_describe(tp))
        return value
    if tp is int:
        if meta.get("hi") is None:
            meta = {**meta, "hi": INT_MAX, "hi_open": False}
        if isinstance(value, bool) or not isinstance(value, int):
            fail(_describe(tp) + (f" {_range_text(meta)}" if _range_text(meta) else ""))
    elif tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string; accept what is plainly a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(_describe(tp) + (f" {_range_text(meta)}" if _range_text(meta) else ""))
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):
            fail("a finite number" + (f" {_range_text(meta)}" if _range_text(meta) else ""))
    elif tp is str:
        if not isinstance(value, str):
            fail(_describe(tp))
        return value
    elif tp is dict:
        if not isinstance(value, dict):
            fail(_describe(tp))
        return value
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        fail(f"{_describe(tp)} {_range_text(meta)}")
    if hi is not None and (value > hi or (meta["hi_open"] and value == hi)):
        fail(f"{_describe(tp)} {_range_text(meta)}")
    return value


def _check_consistency(cfg: Config, sources: dict, default_source: str) -> None:
    """Rules that involve more than one key."""

    def source(key):
        return sources.get(key, default_source)

    opt, sched = cfg.train.optimizer, cfg.train.schedule
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        raise UserError(f"{source('train.optimizer.betas')}: train.optimizer.betas must be two numbers in [0, 1), "
                        f"got {opt.betas}")
    if sched.warmup_epochs >= cfg.train.epochs and sched.name != "constant" and sched.warmup_epochs > 0:
        raise UserError(f"{source('train.schedule.warmup_epochs')}: train.schedule.warmup_epochs "
                        f"({sched.warmup_epochs}) must be less than train.epochs ({cfg.train.epochs})")
    if sched.name == "multistep" and not sched.milestones:
        raise UserError(f"{source('train.schedule.name')}: a multistep schedule needs "
                        f"train.schedule.milestones (epochs), e.g. [100, 150]")
    if sorted(sched.milestones) != sched.milestones:
        raise UserError(f"{source('train.schedule.milestones')}: train.schedule.milestones must be increasing, "
                        f"got {sched.milestones}")
    area = cfg.data.augment.erase_area
    if len(area) != 2 or not 0.0 < area[0] <= area[1] <= 1.0:
        raise UserError(f"{source('data.augment.erase_area')}: data.augment.erase_area must be [min, max] fractions "
                        f"of the image with 0 < min <= max <= 1, got {area}")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and len(value) not in (1, 3):
            raise UserError(f"{source('data.' + key)}: data.{key} must list one number per channel (3 for RGB, "
                            f"1 for greyscale), got {value}")
    if cfg.data.std is not None and any(s <= 0 for s in cfg.data.std):
        raise UserError(f"{source('data.std')}: data.std must be positive, got {cfg.data.std}")
