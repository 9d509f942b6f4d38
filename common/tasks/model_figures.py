"""Figure tasks of model packages: a figure a model draws of its own weights, once per checkpoint.

A package registers the task (`common.registry.register_figure_task`), and its models
declare that they can draw it through the `figures` hook (common/models/hooks.py). This
module knows neither: it finds the checkpoints, loads each one's weights into a copy of
the model, asks the hook for the figure and writes the PNGs.

    python main.py --task NAME --load RUN_DIR     one PNG per kept checkpoint, in epoch order
    python main.py --task NAME --config C         the random init

Files are <stem>_epoch_EEEE.png (EEEE = epochs finished; a mid-epoch checkpoint adds _stepSSSSSS)
in <run>/<task>/ (or --output); without --load, <stem>_init.png in runs/<config>/<task>/<timestamp>/.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

from torch import nn

from common.config import Config
from common.errors import UserError
from common.inspect.capture import has_attention
from common.models.hooks import ModelHooks
from common.registry import FigureTask, figure_tasks
from common.tasks.run_folder import checkpoint_run_dir, model_to_inspect, timestamp
from common.files import check_output_dir
from common.train.checkpoint import load_checkpoint


def figure_task(name: str) -> FigureTask:
    tasks = figure_tasks()
    if name not in tasks:
        raise UserError(f"unknown figure task '{name}'; registered: {', '.join(tasks) or 'none'}")
    return tasks[name]


def _drawer(model: nn.Module, task: FigureTask):
    draw = ModelHooks.collect(model).figure_drawers().get(task.name)
    if draw is None:
        no_attention = "" if has_attention(model) else " (this one has no attention layers at all)"
        raise UserError(f"`{task.name}` draws {task.needs}, and this model ({type(model).__name__}) has none; "
                        f"{task.hint}{no_attention}")
    return draw


def checkpoint_files(paths: Sequence[str | Path]) -> list[tuple[Path, bool]]:
    """Each given file, or every *.ckpt inside a given run folder (recursively); (path, from_folder)."""
    out = []
    for item in paths:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.rglob("*.ckpt") if p.is_file())
            if not found:
                raise UserError(f"no checkpoint (*.ckpt) in {item}")
            out += [(p, True) for p in found]
        elif item.is_file():
            out.append((item, False))
        else:
            raise UserError(f"checkpoint not found: {item}")
    return out


def draw_current(model: nn.Module, task: FigureTask, out_dir: str | Path, dpi: int = 100) -> Path:
    """One PNG of the model's current weights (e.g. a fresh init when no checkpoint is given)."""
    draw = _drawer(model, task)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{task.file_stem}_init.png"
    draw("current weights", dpi).savefig(png)
    return png


def draw_checkpoints(model: nn.Module, task: FigureTask, checkpoints: Sequence[str | Path], out_dir: str | Path,
                     prefer_ema: bool = True, dpi: int = 100) -> list[Path]:
    """One PNG per checkpoint in `out_dir`, drawn from a copy of `model` loaded with its weights.

    checkpoints: files (each gets its PNG) and/or run folders (every *.ckpt inside, e.g. last.ckpt,
    best.ckpt and kept per-epoch files; one PNG per distinct saved training position). `prefer_ema` draws the
    EMA weights when a checkpoint has them (what eval uses). Returns the PNG paths in saved-epoch order.
    """
    model = copy.deepcopy(model).cpu().eval()
    draw = _drawer(model, task)
    files = checkpoint_files(checkpoints)
    if not files:
        raise UserError(f"{task.name} needs at least one checkpoint (a .ckpt file or a run folder)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: dict[tuple, Path] = {}  # (epoch, step in epoch, global step) -> first PNG of that position
    written: list[tuple[tuple, Path]] = []
    used_names: set[str] = set()
    for path, from_folder in files:
        saved = load_checkpoint(path, needs=("model",))
        state = saved.get("state") or {}
        position = (int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0)), int(state.get("global_step", 0)))
        if from_folder and position in drawn:
            continue  # best.ckpt and last.ckpt of the same epoch hold the same weights
        weights = saved["ema"] if prefer_ema and saved.get("ema") is not None else saved.get("model")
        try:
            model.load_state_dict(weights)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"checkpoint {path} does not fit this model ({first[:200]}); check --config") from None
        epoch, step, _ = position
        name = f"{task.file_stem}_epoch_{epoch:04d}" + (f"_step{step:06d}" if step else "")
        label = f"epoch {epoch}" + (f", step {step} of epoch {epoch + 1}" if step else "")
        suffix, n = "", 1
        while name + suffix in used_names:  # the same position from another file: keep both
            n += 1
            suffix = f"_{n}"
        used_names.add(name + suffix)
        png = out_dir / f"{name}{suffix}.png"
        draw(f"{label} ({path.name})", dpi).savefig(png)
        drawn.setdefault(position, png)
        written.append((position, png))
    return [png for _, png in sorted(written, key=lambda item: (item[0], str(item[1])))]


def draw_model_figure(name: str, cfg: Config | None, load: str | None = None,
                      output: str | None = None) -> list[Path]:
    """The figure task `name` for the config's model: per checkpoint of --load, else of the random init."""
    cfg, model, _, _ = model_to_inspect(cfg, load)  # the config's custom_imports may register the task
    task = figure_task(name)
    _drawer(model, task)  # a model that cannot draw it is refused before anything is written
    if load:
        source = Path(load)
        run_dir = source if source.is_dir() else checkpoint_run_dir(source)
        out_dir = Path(output) if output else run_dir / name
    else:
        out_dir = Path(output) if output else Path(cfg.output_root) / cfg.name / name / timestamp()
    check_output_dir(out_dir, "--output" if output else None)
    written = draw_checkpoints(model, task, [source], out_dir) if load else [draw_current(model, task, out_dir)]
    print("wrote " + "\n      ".join(str(p) for p in written))
    return written
