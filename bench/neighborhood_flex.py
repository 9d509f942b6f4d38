"""Neighbourhood attention against FlexAttention with a sliding-window block mask: the anchor.

    python bench/neighborhood_flex.py [--device cuda|cpu] [--batch 64] [--heads 4] [--head-dim 16] [--size 32]
                                      [--kernel 7] [--dtype bf16|fp32] [--repeats 7] [--json PATH]

FlexAttention (torch.nn.attention.flex_attention) is PyTorch's generic fused attention: compiled with a
`mask_mod`, it writes a Triton kernel that skips the blocks the mask empties. Given the k x k window over the
H*W tokens in row-major order (keep key j for query i when |dy| <= k//2 and |dx| <= k//2) and a BlockMask of
128 x 128 token blocks, it is what a user would get for neighbourhood attention without our kernels, so it is
the yardstick for them. Both compute the same function here: scale 1, no relative term and border="mask"
(neighborhood_attention(q, k, v, kernel, rel_pos=None)); the script checks that their outputs agree.

On CUDA it times forward+backward (the median of --repeats interleaved rounds after warm-up) and the peak
memory of one step for our backends (every registered one of this device, auto among them), compiled
FlexAttention, and a 3x3 nn.Conv2d(heads*d, heads*d) on the same activation. FlexAttention's CUDA kernels need
a head dim of at least 16, so the default layer is 4 heads of 16 (the 64 channels of bench/neighborhood.py's
headline). On the CPU FlexAttention has no backward and compiles only for inference, so the CPU run checks
agreement and times forward passes of eager FlexAttention (which materialises the scores): a smoke run of
this script, not a benchmark. Nothing is asserted; --json writes the figures for bench/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.inspect.timing import timed_rounds  # noqa: E402
from common.ops import neighborhood as nb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # max |flex - ours| / max(1, max |ours|)


def window_block_mask(size: int, kernel: int, device: torch.device):
    """The k x k window over size x size tokens in row-major order, as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    radius = kernel // 2

    def in_window(b, h, q_idx, kv_idx):
        dy = q_idx // size - kv_idx // size
        dx = q_idx % size - kv_idx % size
        return (dy.abs() <= radius) & (dx.abs() <= radius)

    tokens = size * size
    return create_block_mask(in_window, None, None, tokens, tokens, device=str(device))


def peak_mib(step, device: torch.device) -> float | None:
    """Peak CUDA memory (MiB) allocated by one step on top of what is held before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 2 on the CPU")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="the map is size x size (default: 32; 16 on CPU)")
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 2)
    size = args.size or (32 if cuda else 16)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = DTYPES[dtype_name]

    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(0)
    shape = (batch, args.heads, size, size, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(cuda) for _ in range(3))
    channels = args.heads * args.head_dim
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device, dtype).requires_grad_(cuda)
    block_mask = window_block_mask(size, args.kernel, device)
    flex = torch.compile(flex_attention) if cuda else flex_attention
    if not cuda:  # eager on purpose (no CPU backward to compile for): its advice to compile is noise here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")

    def tokens(t):  # (B, heads, H, W, d) -> (B, heads, H*W, d), a view
        return t.flatten(2, 3)

    def run_flex():
        return flex(tokens(q), tokens(k), tokens(v), block_mask=block_mask, scale=1.0)

    def run_ours(backend):
        return nb.neighborhood_attention(q, k, v, args.kernel, backend=backend)

    if cuda:
        nb._ensure_triton()
    auto = nb.select_backend(q, cuda, kernel_size=args.kernel)
    on_other_device = {"triton"} if not cuda else {"fused_cpu"}  # kernels of one device only
    backends = [name for name in nb.BACKENDS if name not in on_other_device]
    if auto not in backends:
        backends.append(auto)

    with torch.no_grad():
        ours = run_ours(auto).float()
        theirs = run_flex().float().view(ours.shape)
    error = ((theirs - ours).abs().max() / ours.abs().max().clamp_min(1.0)).item()

    def step(fn):
        if not cuda:  # FlexAttention has no CPU backward: forward passes only
            def forward():
                with torch.no_grad():
                    fn()
            return forward

        def forward_backward():
            out = fn()
            out.backward(torch.ones_like(out))
        return forward_backward

    steps = {name: step(lambda name=name: run_ours(name)) for name in backends}
    steps["flex"] = step(run_flex)
    steps["conv3x3"] = step(lambda: conv(x))
    seconds = timed_rounds(steps, args.repeats, device)
    peaks = {name: peak_mib(fn, device) for name, fn in steps.items()}

    where = torch.cuda.get_device_name(device) if cuda else \
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    mode = "fwd+bwd" if cuda else "forward only (FlexAttention has no CPU backward)"
    print(f"B={batch}, heads={args.heads}, d={args.head_dim}, {size}x{size}, kernel {args.kernel}, {dtype_name}, "
          f"{device} ({where}), {mode}, median of {args.repeats}; auto = {auto}; torch {torch.__version__}")
    print(f"FlexAttention vs {auto}: max |difference| / max(1, max |{auto}|) = {error:.2e} "
          f"(tolerance {TOLERANCE[dtype_name]:g})")
    print(f"{'step':<10} {'ms':>9} {'vs flex':>8} {'peak MiB':>9}")
    for name, s in seconds.items():
        peak = "" if peaks[name] is None else f"{peaks[name]:.1f}"
        print(f"{name:<10} {s * 1e3:>9.2f} {seconds['flex'] / s:>7.2f}x {peak:>9}")
    if args.json:
        figures = {"device": str(device), "device_name": where, "torch": torch.__version__, "batch": batch,
                   "heads": args.heads, "head_dim": args.head_dim, "size": size, "kernel": args.kernel,
                   "dtype": dtype_name, "mode": mode, "repeats": args.repeats, "auto_backend": auto,
                   "flex_error": error, "tolerance": TOLERANCE[dtype_name],
                   "ms": {name: s * 1e3 for name, s in seconds.items()}, "peak_mib": peaks}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
