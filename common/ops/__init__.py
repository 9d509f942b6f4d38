"""Attention kernels shared by the paper packages.

- `neighborhood`: local-window attention (every query pixel attends to its k x k window) with the
  `reference`, `tiled`, `fused_cpu` and `triton` backends behind one function;
- `neighborhood_cpu`: the fused C++ kernel for the CPU (csrc/), built on first use by `jit_build`;
- `neighborhood_triton`: the fused Triton kernels, imported lazily on the first CUDA call;
- `fresh_thread`: where the fused kernels' self-checks run, away from the caller's grad mode and autocast.

May import: torch, the foundation (errors, config, registry), `common.inspect.capture` and
`common.inspect.flops`. Never `data`, `train`, `tasks` or the rest of `inspect`.
"""
