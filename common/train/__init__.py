"""The training machinery: one loop for every model, on one process or many.

- `engine`: the loop (AMP, EMA, DDP, hooks, signals, the non-finite guard, the run state as one unit) and
  `evaluate`;
- `optim`: optimisers with weight-decay groups, warmup + cosine / multistep / constant schedules;
- `checkpoint`: atomic checkpoints with a checksum, safe loading, RNG state;
- `distributed`: process groups for torchrun and the collectives the engine needs;
- `ema`: the exponential moving average of the weights;
- `logger`: progress bar, TensorBoard and metrics.jsonl.

May import every layer below it: the foundation, `ops`, `models`, `data` and `inspect`. Never `tasks`.
"""
