"""`train`: a validated config becomes a run folder with checkpoints, logs and a summary."""

from __future__ import annotations

import time

from common.config import Config, dump_config
from common.data.loaders import build_data
from common.tasks.run_folder import check_resumable, configure_determinism, resolve_run_dir, seed_everything
from common.train import checkpoint as ckpt
from common.train.distributed import barrier, broadcast_object, init_distributed, shutdown
from common.train.engine import Trainer, build_model


def train(cfg: Config, output: str | None = None, resume: bool = False, quiet: bool = False) -> dict:
    started_at = time.perf_counter()  # the summary's wall time covers the whole run, data loading included
    dist = init_distributed(cfg.device)
    try:
        configure_determinism(cfg.deterministic)
        run_dir, last = broadcast_object(resolve_run_dir(cfg, output, resume) if dist.is_main else None)
        saved = ckpt.load_checkpoint(last) if last is not None else None
        if saved is not None:
            check_resumable(saved["config"], cfg, run_dir)
        seed_everything(cfg.seed)
        data_start = time.perf_counter()
        data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, dist.device, cfg.seed,
                          dist.rank, dist.world)
        data_seconds = time.perf_counter() - data_start
        model = build_model(cfg.model.name, cfg.model.kwargs, data.num_classes, data.input_size)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        barrier()
        trainer = Trainer(cfg, dist, run_dir, data, model, resume_from=saved, quiet=quiet, started_at=started_at,
                          data_seconds=data_seconds)
        return trainer.fit()
    finally:
        shutdown()
