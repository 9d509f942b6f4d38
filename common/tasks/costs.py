"""`time`: what each config's model costs (params, MACs, throughput, latency, memory), as one table."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common.config import Config
from common.data.loaders import input_spec
from common.errors import UserError
from common.inspect.timing import format_table, measure, write_results
from common.tasks.run_folder import load_weights, timestamp
from common.train import checkpoint as ckpt
from common.train.distributed import select_device
from common.train.engine import AMP_DTYPES, build_model


def _model_for(cfg: Config, load: str | None) -> nn.Module:
    input_size, num_classes = input_spec(cfg.data)
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size)
    if load:
        path = ckpt.resolve_checkpoint(load)
        load_weights(model, ckpt.load_checkpoint(path), path)
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
    out_dir = Path(output) if output else Path(cfgs[0].output_root) / "time" / timestamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = write_results(results, out_dir)
    from common.inspect.report import plot_cost

    plot_path = plot_cost(results, out_dir / "time_vs_params.png")
    print(format_table(results))
    print(f"wrote {json_path}, {md_path} and {plot_path}")
    return results
