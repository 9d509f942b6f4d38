"""`eval`: the accuracy of a checkpoint on the val and test splits, written to eval.json."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import Config, config_from_dict
from common.data.loaders import build_data
from common.files import check_output_dir, write_atomic
from common.tasks.run_folder import load_weights
from common.train import checkpoint as ckpt
from common.train.distributed import init_distributed, shutdown
from common.train.engine import AMP_DTYPES, build_model, evaluate


def evaluate_checkpoint(cfg: Config | None, load: str, output: str | None = None) -> dict:
    """Accuracy of a checkpoint on the val and test splits; the config defaults to the checkpoint's own."""
    path = ckpt.resolve_checkpoint(load)
    out_dir = Path(output) if output else path.parent
    check_output_dir(out_dir, "--output" if output else None)
    saved = ckpt.load_checkpoint(path, needs=("config", "model", "state"))
    cfg = cfg or config_from_dict(saved["config"], source=str(path))
    dist = init_distributed(cfg.device)
    try:
        data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, dist.device, cfg.seed,
                          dist.rank, dist.world)
        model = build_model(cfg.model.name, cfg.model.kwargs, data.num_classes, data.input_size)
        weights = load_weights(model, saved, path)
        model.to(dist.device)
        amp = AMP_DTYPES[cfg.train.amp]
        result = {"checkpoint": str(path), "weights": weights, "model": cfg.model.name, "dataset": cfg.data.dataset,
                  "epoch": saved["state"]["epoch"]}
        for split, loader in (("val", data.val), ("test", data.test)):
            if loader is not None:
                loss, acc = evaluate(model, loader, dist.device, amp, cfg.train.channels_last)
                result[f"{split}_loss"], result[f"{split}_acc"] = loss, acc
        if dist.is_main:
            write_atomic(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
            lines = [f"{split} acc {100 * result[f'{split}_acc']:.2f}%  loss {result[f'{split}_loss']:.4f}"
                     for split in ("val", "test") if f"{split}_acc" in result]
            print(f"{path} ({weights} weights, epoch {result['epoch']}):\n  " + "\n  ".join(lines))
        return result
    finally:
        shutdown()
