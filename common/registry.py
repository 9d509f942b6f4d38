"""Name -> constructor registries: models, spatial mixers, stems, and the figure tasks of model packages.

Models are registered with `@register_model` on a factory function; its
keyword parameters are the options a config's `model:` block may set.
Mixers (what replaces the 3x3 conv of a ResNet block) and stems are
registered the same way, so a paper package that registers a mixer gets every
backbone built from it without a new network class. A package whose models can
draw a figure of their own registers a figure task (`register_figure_task`): its
name becomes a `--task`, and models take part through the `figures` hook
(common/models/hooks.py).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from common.errors import UserError, did_you_mean

# Packages whose import registers models and figure tasks; listed here so that
# `create_model` sees every model without the caller importing the paper packages
# itself. This is the one place in common/ that names the paper packages.
MODEL_PACKAGES = ("common.models.resnet", "sasa", "adaptive_span", "aacn", "sa_conv", "san", "vit")


class ArgumentError(UserError):
    """A bad keyword argument; `key` names it so the config can say which file set it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, fn: Callable | None = None, *, name: str | None = None):
        def add(fn):
            key = name or fn.__name__
            if key in self._entries and self._entries[key] is not fn:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = fn
            return fn

        return add(fn) if fn is not None else add

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ArgumentError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                                f"available: {', '.join(self.names())}")
        return self._entries[name]

    def check_args(self, name: str, kwargs: dict) -> None:
        params = inspect.signature(self.get(name)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in valid:
                raise ArgumentError(f"{self.kind} '{name}' has no option '{key}'{did_you_mean(key, valid)}; "
                                    f"valid options: {', '.join(valid) or 'none'}", key=key)

    def create(self, name: str, *args, **kwargs):
        self.check_args(name, kwargs)
        return self.get(name)(*args, **kwargs)


MODELS = Registry("model")
MIXERS = Registry("mixer")
STEMS = Registry("stem")

register_model = MODELS.register
register_mixer = MIXERS.register
register_stem = STEMS.register


def _import_model_packages() -> None:
    for package in MODEL_PACKAGES:
        importlib.import_module(package)


def import_packages(packages: list[str]) -> None:
    """Import packages that register models, mixers or figure tasks (a config's `custom_imports`)."""
    for package in packages:
        if not isinstance(package, str) or not package:
            raise UserError(f"custom_imports must list importable package names, got {package!r}")
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise UserError(f"custom_imports: cannot import '{package}' ({exc}); it must be importable from the "
                            f"repository root or be installed") from None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _import_model_packages()
    return MODELS.names(pattern)


def check_model_args(name: str, kwargs: dict) -> None:
    """Raise `ArgumentError` if `name` is unknown or does not take one of `kwargs`."""
    _import_model_packages()
    MODELS.check_args(name, kwargs)


def create_model(name: str, **kwargs):
    """Build a registered model; unknown names and keywords are `UserError`s listing the valid ones."""
    _import_model_packages()
    return MODELS.create(name, **kwargs)


def create_mixer(name: str, in_channels: int, out_channels: int, stride: int = 1, **kwargs):
    """A spatial mixer: maps (B, in, H, W) to (B, out, H/stride, W/stride)."""
    _import_model_packages()
    return MIXERS.create(name, in_channels, out_channels, stride=stride, **kwargs)


def create_stem(name: str, in_channels: int, out_channels: int, **kwargs):
    _import_model_packages()
    return STEMS.create(name, in_channels, out_channels, **kwargs)


@dataclass(frozen=True)
class FigureTask:
    """A `--task` that draws a figure some models can make of their weights, once per checkpoint."""

    name: str
    help: str  # one line for --help
    needs: str  # what a model must have to draw it, e.g. "Gaussian attention heads"
    hint: str  # how to get such a model, for the error when a model has none
    file_stem: str  # PNGs are <file_stem>_epoch_EEEE.png (<file_stem>_init.png without a checkpoint)


FIGURE_TASKS: dict[str, FigureTask] = {}


def register_figure_task(name: str, help: str, needs: str, hint: str, file_stem: str | None = None) -> FigureTask:
    """Declare a figure task; models that can draw it return it from their `figures()` hook."""
    task = FigureTask(name, help, needs, hint, file_stem or name)
    if FIGURE_TASKS.get(name, task) != task:
        raise ValueError(f"figure task '{name}' is registered twice")
    FIGURE_TASKS[name] = task
    return task


def figure_tasks() -> dict[str, FigureTask]:
    """Every registered figure task, by name."""
    _import_model_packages()
    return dict(sorted(FIGURE_TASKS.items()))
