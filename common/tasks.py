"""What each `main.py --task` does, from a validated config to files in a run folder.

Everything that can fail because of the user's input (config, dataset,
checkpoint, model options) is checked before the run folder is created, so a
bad command writes nothing.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import checkpoint as ckpt
from common.config import Config, config_from_dict, config_to_dict, dump_config
from common.data import build_data, input_spec
from common.distributed import barrier, broadcast_object, init_distributed, select_device, shutdown
from common.engine import AMP_DTYPES, Trainer, build_model, evaluate
from common.errors import UserError
from common.inspect import has_attention
from common.timing import format_table, measure, write_results

# Keys that may change between a run and its resumption; anything else would silently change the method.
RESUMABLE_CHANGES = ("name", "output_root", "train.epochs", "train.eval_every_epochs", "train.checkpoint_every_steps",
                     "train.keep_every_epochs", "log.", "data.root", "data.download", "data.num_workers", "time.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def resolve_run_dir(cfg: Config, output: str | None, resume: bool) -> tuple[Path, Path | None]:
    """The run folder and, when continuing a run, its last checkpoint."""
    if output:
        run_dir = Path(output)
        last = run_dir / ckpt.LAST
        if last.is_file():
            return run_dir, last
        if resume:
            raise UserError(f"--resume: there is no {last} to resume from; drop --resume to start a new run there")
        return run_dir, None
    parent = Path(cfg.output_root) / cfg.name
    if resume:
        runs = sorted(d for d in parent.glob("*") if (d / ckpt.LAST).is_file())
        if not runs:
            raise UserError(f"--resume: no run of '{cfg.name}' with a {ckpt.LAST} under {parent}; "
                            f"pass --output RUN_DIR to pick one")
        return runs[-1], runs[-1] / ckpt.LAST
    return parent / _timestamp(), None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and not (prefix == "" and key == "model"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict, cfg: Config, run_dir: Path) -> None:
    before, now = _flatten(saved), _flatten(config_to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                     and not any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES))
    if changed:
        raise UserError(f"{run_dir} holds a run with a different config ({', '.join(changed)} changed); resume it "
                        f"with its own config ({run_dir / 'config.yaml'}) or use a new --output")


def _load_weights(model: nn.Module, saved: dict, source: Path | str, prefer_ema: bool = True) -> str:
    weights = saved["ema"] if prefer_ema and saved.get("ema") is not None else saved["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"checkpoint {source} does not fit this model ({first[:200]}); check --config/--load") \
            from None
    return "ema" if weights is saved.get("ema") else "model"


# ---------------------------------------------------------------------------- tasks


def train(cfg: Config, output: str | None = None, resume: bool = False, quiet: bool = False) -> dict:
    dist = init_distributed(cfg.device)
    try:
        configure_determinism(cfg.deterministic)
        run_dir, last = broadcast_object(resolve_run_dir(cfg, output, resume) if dist.is_main else None)
        saved = ckpt.load_checkpoint(last) if last is not None else None
        if saved is not None:
            check_resumable(saved["config"], cfg, run_dir)
        seed_everything(cfg.seed)
        data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, dist.device, cfg.seed,
                          dist.rank, dist.world)
        model = build_model(cfg.model.name, cfg.model.kwargs, data.num_classes)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        barrier()
        trainer = Trainer(cfg, dist, run_dir, data, model, resume_from=saved, quiet=quiet)
        return trainer.fit()
    finally:
        shutdown()


def evaluate_checkpoint(cfg: Config | None, load: str, output: str | None = None) -> dict:
    """Accuracy of a checkpoint on the val and test splits; the config defaults to the checkpoint's own."""
    path = ckpt.resolve_checkpoint(load)
    saved = ckpt.load_checkpoint(path)
    cfg = cfg or config_from_dict(saved["config"], source=str(path))
    dist = init_distributed(cfg.device)
    try:
        data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, dist.device, cfg.seed,
                          dist.rank, dist.world)
        model = build_model(cfg.model.name, cfg.model.kwargs, data.num_classes)
        weights = _load_weights(model, saved, path)
        model.to(dist.device)
        amp = AMP_DTYPES[cfg.train.amp]
        result = {"checkpoint": str(path), "weights": weights, "model": cfg.model.name, "dataset": cfg.data.dataset,
                  "epoch": saved["state"]["epoch"]}
        for split, loader in (("val", data.val), ("test", data.test)):
            if loader is not None:
                loss, acc = evaluate(model, loader, dist.device, amp, cfg.train.channels_last)
                result[f"{split}_loss"], result[f"{split}_acc"] = loss, acc
        if dist.is_main:
            out_dir = Path(output) if output else path.parent
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            lines = [f"{split} acc {100 * result[f'{split}_acc']:.2f}%  loss {result[f'{split}_loss']:.4f}"
                     for split in ("val", "test") if f"{split}_acc" in result]
            print(f"{path} ({weights} weights, epoch {result['epoch']}):\n  " + "\n  ".join(lines))
        return result
    finally:
        shutdown()


def _model_for(cfg: Config, load: str | None) -> nn.Module:
    _, num_classes = input_spec(cfg.data)
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes)
    if load:
        path = ckpt.resolve_checkpoint(load)
        _load_weights(model, ckpt.load_checkpoint(path), path)
    return model


def time_models(cfgs: list[Config], load: str | None = None, output: str | None = None) -> list:
    """Params, MACs/FLOPs, throughput, latency and peak memory of each config's model, as one table."""
    if load and len(cfgs) > 1:
        raise UserError("--load gives weights for one model: use it with a single --config")
    models = [(cfg, _model_for(cfg, load)) for cfg in cfgs]
    results = []
    for cfg, model in models:
        input_size, _ = input_spec(cfg.data)
        device = select_device(cfg.device)
        results.append(measure(model, cfg.name, input_size=input_size, batch_size=cfg.time.batch_size,
                               device=str(device), warmup=cfg.time.warmup, iters=cfg.time.iters,
                               latency_iters=cfg.time.latency_iters, amp_dtype=AMP_DTYPES[cfg.train.amp],
                               channels_last=cfg.train.channels_last))
    out_dir = Path(output) if output else Path(cfgs[0].output_root) / "time" / _timestamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = write_results(results, out_dir)
    from common.report import plot_cost

    plot_path = plot_cost(results, out_dir / "time_vs_params.png")
    print(format_table(results))
    print(f"wrote {json_path}, {md_path} and {plot_path}")
    return results


def _checkpoint_run_dir(path: Path) -> Path:
    """The run folder a checkpoint belongs to (kept per-epoch checkpoints live one folder down)."""
    folder = path.parent
    if not (folder / "config.yaml").is_file() and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return folder


def visualize(task: str, cfg: Config | None, load: str | None = None, output: str | None = None,
              image: str | None = None, index: int | None = None, pixel: tuple[int, int] | None = None,
              layers: str | None = None) -> list[Path]:
    """`viz` / `viz_1`: attention figures of the config's model (random init, or the --load checkpoint).

    The config defaults to the checkpoint's own. Output: --output, else `<run>/viz/` beside the checkpoint,
    else `runs/<config name>/viz/<timestamp>`.
    """
    from common import viz

    path = saved = None
    if load:
        path = ckpt.resolve_checkpoint(load)
        saved = ckpt.load_checkpoint(path)
        cfg = cfg or config_from_dict(saved["config"], source=str(path))
    input_size, num_classes = input_spec(cfg.data)
    seed_everything(cfg.seed)  # the same random-init figures every time
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes)
    if not has_attention(model):
        raise UserError(f"model '{cfg.model.name}' has no attention layers, so `{task}` has nothing to draw; "
                        f"use a config of an attention model (sasa, adaptive_span, aacn, sa_conv, san or vit)")
    if task == "gauss_viz":
        return _gauss_viz(cfg, model, load, output)
    if saved is not None:
        which = _load_weights(model, saved, path)
        weights = f"weights {path} ({which}, epoch {saved['state']['epoch']})"
    else:
        weights = "random init (no --load)"
    if image is not None and index is not None:
        raise UserError("give either --image PATH or --index N (an image of the test split), not both")
    if image is not None:
        picture = viz.image_from_file(image, cfg.data, input_size, cfg.seed)
    else:
        picture = viz.image_from_dataset(cfg.data, 0 if index is None else index, cfg.seed)
    if output:
        out_dir = Path(output)
    elif path is not None:
        out_dir = _checkpoint_run_dir(path) / "viz"
    else:
        out_dir = Path(cfg.output_root) / cfg.name / "viz" / _timestamp()
    request = viz.VizRequest(task=task, model=model, image=picture, output_dir=out_dir, pixel=pixel,
                             layers=layers, title=f"{cfg.name}: {cfg.model.name}, {weights}",
                             model_name=cfg.model.name, device=select_device(cfg.device))
    written = viz.run(request)
    print("wrote " + "\n      ".join(str(p) for p in written))
    return written


def _gauss_viz(cfg: Config, model: nn.Module, load: str | None, output: str | None) -> list[Path]:
    """Gaussian heads' contours: one PNG per checkpoint of --load (a run folder: every kept epoch)."""
    from sa_conv.gauss_viz import draw_checkpoints, draw_current, has_gaussian_heads

    if not has_gaussian_heads(model):
        raise UserError(f"`gauss_viz` draws Gaussian attention heads and model '{cfg.model.name}' has none; "
                        f"use a quadratic-attention model (sa_quadratic, sa_quadratic_aniso)")
    if load:
        source = Path(load)
        run_dir = source if source.is_dir() else _checkpoint_run_dir(source)
        out_dir = Path(output) if output else run_dir / "gauss_viz"
        written = draw_checkpoints(model, [source], out_dir)
    else:
        out_dir = Path(output) if output else Path(cfg.output_root) / cfg.name / "gauss_viz" / _timestamp()
        written = [draw_current(model, out_dir)]
    print("wrote " + "\n      ".join(str(p) for p in written))
    return written
