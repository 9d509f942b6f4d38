"""AACN layer: the fused path against a straightforward one that builds the full (HW x HW) relative logits.

    python bench/aacn.py [--repeats 9] [--warmup 2] [--batch 8] [--size 32]

One AugmentedConv2d (64 -> 64 channels, 3x3, dk=40, dv=32, 4 heads, relative
logits) on an (8, 64, 32, 32) input, CPU, 2 threads. Both paths share the
layer's weights, so they compute the same function (the script checks it):

- straightforward: per-axis relative logits q . r (B, heads, HW, 2H-1 / 2W-1)
  gathered into two full (B, heads, HW, HW) tensors, added to q k^T, softmax,
  weighted sum of v: what the paper's equations say, written directly;
- fused: `AugmentedConv2d.forward`: per-axis logits appended to q, one-hot key
  coordinates to k, one scaled_dot_product_attention call.

Measured, in one process, alternating the two: forward+backward time (median
over repeats after warm-up) and bytes saved for backward (each storage counted
once, via torch.autograd.graph.saved_tensors_hooks). Targets: the fused path
at least 2x faster and at most 1/2 the memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aacn import AugmentedConv2d  # noqa: E402
from aacn.layer import merge_heads, split_heads  # noqa: E402
from common.inspect.memory import SavedTensors  # noqa: E402

MIB = 2 ** 20


def straightforward_forward(layer: AugmentedConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's function with the relative logits built as full (B, heads, HW, HW) tensors."""
    pooled = layer.pool(x)
    height, width = pooled.shape[-2:]
    length = height * width
    q, k, v = torch.split(layer.qkv(pooled), [layer.dk, layer.dk, layer.dv], dim=1)
    q = split_heads(q, layer.heads) * layer.scale
    k, v = split_heads(k, layer.heads), split_heads(v, layer.heads)
    rows, cols = layer.relative.tables((height, width))  # offset o at index o + n - 1
    y = torch.arange(length) // width
    x_pos = torch.arange(length) % width
    shape = (*q.shape[:2], length, length)
    row_offset = (y[None, :] - y[:, None] + height - 1).expand(shape)
    col_offset = (x_pos[None, :] - x_pos[:, None] + width - 1).expand(shape)
    s_h = torch.gather(q @ rows.T, -1, row_offset)  # S_H[i, j] = q_i . r^H[y_j - y_i]
    s_w = torch.gather(q @ cols.T, -1, col_offset)  # S_W[i, j] = q_i . r^W[x_j - x_i]
    weights = (q @ k.transpose(-1, -2) + s_h + s_w).softmax(-1)
    attention = layer.out(merge_heads(weights @ v, (height, width)))
    return torch.cat([layer.conv(x), attention], dim=1)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn()."""
    with SavedTensors() as saved:
        out = fn()
    del out
    return saved.bytes


def step_seconds(fn, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    fn().backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    layer = AugmentedConv2d(64, 64, 3, dk=40, dv=32, heads=4, relative=True, max_size=args.size)
    x = torch.randn(args.batch, 64, args.size, args.size)
    paths = {"straightforward (full HW x HW logits)": lambda: straightforward_forward(layer, x),
             "fused (per-axis logits + SDPA)": lambda: layer(x)}

    with torch.no_grad():
        ref, fused = (fn() for fn in paths.values())
        max_diff = (ref - fused).abs().max().item()
    grad = torch.randn_like(ref)
    memory = {name: saved_bytes(fn) for name, fn in paths.items()}
    times = {name: [] for name in paths}
    for i in range(args.warmup + args.repeats):
        for name, fn in paths.items():  # alternate, so load from other jobs hits both alike
            layer.zero_grad(set_to_none=True)
            seconds = step_seconds(fn, grad)
            if i >= args.warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}

    print(f"AugmentedConv2d 64->64, k=3, dk=40, dv=32, heads=4, relative; input ({args.batch}, 64, {args.size}, "
          f"{args.size}); CPU, {torch.get_num_threads()} threads; median of {args.repeats} after {args.warmup} "
          f"warm-up; max |difference| of outputs {max_diff:.2e}")
    print("| path | fwd+bwd median (ms) | fwd+bwd best (ms) | saved for backward (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for name in paths:
        print(f"| {name} | {1000 * median[name]:.1f} | {1000 * best[name]:.1f} | {memory[name] / MIB:.1f} |")
    (ref_name, fused_name) = paths
    speedup = median[ref_name] / median[fused_name]
    memory_ratio = memory[fused_name] / memory[ref_name]
    print(f"speed:  fused is {speedup:.2f}x faster on medians (target >= 2x): {'PASS' if speedup >= 2 else 'FAIL'}"
          f"  [best runs, least disturbed by other jobs: {best[ref_name] / best[fused_name]:.2f}x]")
    print(f"memory: fused saves {memory_ratio:.3f} of the reference's bytes (target <= 0.5): "
          f"{'PASS' if memory_ratio <= 0.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
