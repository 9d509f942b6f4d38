"""Attention kernels shared by the paper packages.

- `neighborhood`: local-window attention (every query pixel attends to its k x k window) with the
  `reference`, `tiled` and `triton` backends behind one function;
- `neighborhood_triton`: the fused Triton kernels, imported lazily on the first CUDA call.

May import: torch, the foundation (errors, config, registry), `common.inspect.capture` and
`common.inspect.flops`. Never `data`, `train`, `tasks` or the rest of `inspect`.
"""
