"""`time`: what each config's model costs (params, MACs, throughput, latency, memory), as one table.

All the configs' models are measured in one call of `measure_all`: their timed rounds interleave, so the
ratios to the first model (the baseline) are taken under the same load. The budget is `time.budget_s` per
model; progress goes to stderr (one line per model and per round; `--quiet`: the first and last only).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from common.config import Config
from common.data.loaders import input_spec
from common.errors import UserError
from common.files import check_output_dir
from common.inspect.rounds import Progress
from common.inspect.timing import ModelSpec, format_table, measure_all, write_results
from common.tasks.run_folder import load_weights, timestamp
from common.train import checkpoint as ckpt
from common.train.distributed import select_device
from common.train.engine import AMP_DTYPES, build_model

SHARED_SETTINGS = ("budget_s", "warmup", "iters", "latency_iters")  # settings of the call, not of one model
# time.batch_size unless set: on the CPU a batch of 64 costs the larger CIFAR models several seconds per training
# step, and configs/compare/cifar.yaml would not fit its 10-minute budget even with the fewest rounds.
DEFAULT_BATCH = {"cuda": 64, "cpu": 16}


def batch_size_for(cfg: Config, device: torch.device) -> int:
    """time.batch_size, or the device's default (DEFAULT_BATCH) when the config leaves it unset."""
    return cfg.time.batch_size or DEFAULT_BATCH.get(device.type, 64)


def _model_for(cfg: Config, load: str | None) -> nn.Module:
    input_size, num_classes = input_spec(cfg.data)
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size)
    if load:
        path = ckpt.resolve_checkpoint(load)
        load_weights(model, ckpt.load_checkpoint(path, needs=("model",)), path)
    return model


def _shared(cfgs: list[Config]) -> dict:
    """The time settings of the whole call; configs that disagree on one are an error."""
    settings = {}
    for key in SHARED_SETTINGS:
        values = {getattr(cfg.time, key) for cfg in cfgs}
        if len(values) > 1:
            raise UserError(f"the configs disagree on time.{key} ({', '.join(map(str, sorted(values)))}), which "
                            f"applies to all the models of one call; pass --set time.{key}=VALUE")
        settings[key] = values.pop()
    return settings


def time_models(cfgs: list[Config], load: str | None = None, output: str | None = None,
                quiet: bool = False) -> list:
    """Params, MACs/FLOPs, throughput, latency and peak memory of each config's model, as one table."""
    if load and len(cfgs) > 1:
        raise UserError("--load gives weights for one model: use it with a single --config")
    settings = _shared(cfgs)
    out_dir = Path(output) if output else Path(cfgs[0].output_root) / "time" / timestamp()
    check_output_dir(out_dir, "--output" if output else "output_root")
    specs = []
    for cfg in cfgs:
        input_size, _ = input_spec(cfg.data)
        device = select_device(cfg.device)
        batch_size = batch_size_for(cfg, device)
        specs.append(ModelSpec(cfg.name, _model_for(cfg, load), input_size=input_size, batch_size=batch_size,
                               device=str(device), amp_dtype=AMP_DTYPES[cfg.train.amp],
                               channels_last=cfg.train.channels_last))
    results = measure_all(specs, warmup=settings["warmup"], iters=settings["iters"],
                          latency_iters=settings["latency_iters"], budget_s=settings["budget_s"] * len(specs),
                          progress=Progress(quiet=quiet))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = write_results(results, out_dir)
    from common.inspect.report import plot_cost

    plot_path = plot_cost(results, out_dir / "time_vs_params.png")
    print(format_table(results))
    print(f"wrote {json_path}, {md_path} and {plot_path}")
    return results
