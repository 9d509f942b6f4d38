"""One SAN block, memory-lean against the straightforward unfold implementation, in one run.

    python bench/san.py [--channels 256] [--size 28] [--batch 4] [--kernel 7] [--reps 3] [--threads N]
                        [--device cpu|cuda]

For a pairwise (subtraction) and a patchwise (concatenation) bottleneck with the same weights in
both implementations (`backend="lean"` and `backend="unfold"` of san.SelfAttention2d), it measures
the forward+backward time (median of --reps after one warm-up) and the bytes autograd saves for
backward (torch.autograd.graph.saved_tensors_hooks, each storage once: common.inspect.memory). The
default block is stage 2 of the ImageNet models (c = 256, k = 7) at 28x28.
Target: the lean block saves at most half of what the unfold block saves. Prints a table and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.inspect.memory import SavedTensors  # noqa: E402
from san import Bottleneck  # noqa: E402

TARGET = 0.5  # lean saved bytes / unfold saved bytes


def step(block, x):
    """One forward+backward; returns (seconds, saved tensors, output, input gradient)."""
    x = x.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with SavedTensors() as saved:
        y = block(x)
    y.square().mean().backward()
    sync()
    return time.perf_counter() - start, saved, y.detach(), x.grad


def measure(mode: str, args, device) -> list[dict]:
    torch.manual_seed(0)
    blocks = {name: Bottleneck(args.channels, args.kernel, mode=mode, backend=name).to(device)
              for name in ("unfold", "lean")}
    blocks["lean"].load_state_dict(blocks["unfold"].state_dict())
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    rows = {}
    for name, block in blocks.items():
        step(block, x)  # warm-up
        runs = [step(block, x) for _ in range(args.reps)]
        _, saved, y, dx = runs[-1]
        rows[name] = {"mode": mode, "impl": name, "ms": 1e3 * statistics.median(r[0] for r in runs),
                      "saved_mb": saved.bytes / 2 ** 20, "largest": saved.largest, "y": y, "dx": dx}
    ref = rows["unfold"]
    for row in rows.values():
        row["mem_ratio"] = row["saved_mb"] / ref["saved_mb"]
        row["time_ratio"] = row["ms"] / ref["ms"]
        row["max_diff"] = (row["y"] - ref["y"]).abs().max().item()
        row["dx_diff"] = ((row["dx"] - ref["dx"]).abs().max() / ref["dx"].abs().max()).item()
    return list(rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    c = args.channels
    print(f"SAN bottleneck c={c} (rel {c // 16}, mid {c // 4}, share 8), k={args.kernel}, "
          f"{args.batch}x{c}x{args.size}x{args.size}, {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}, median of {args.reps}")
    rows = measure("pairwise", args, device) + measure("patchwise", args, device)
    print("| block | implementation | fwd+bwd (ms) | time vs unfold | saved for backward (MB) | memory vs unfold "
          "| largest saved tensor (elements) | max |y - y_unfold| | max rel. dx error |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['impl']} | {r['ms']:.1f} | {r['time_ratio']:.2f}x | {r['saved_mb']:.1f} | "
              f"{r['mem_ratio']:.3f} | {r['largest']:,} | {r['max_diff']:.1e} | {r['dx_diff']:.1e} |")
    expanded = args.batch * (c // 4) * args.kernel ** 2 * args.size ** 2
    ok = True
    for r in rows:
        if r["impl"] != "lean":
            continue
        good = r["mem_ratio"] <= TARGET and r["largest"] < expanded and r["max_diff"] < 1e-3
        ok &= good
        print(f"{'PASS' if good else 'FAIL'}: {r['mode']} lean saves {r['mem_ratio']:.3f}x the unfold block's bytes "
              f"(target <= {TARGET}); largest saved tensor {r['largest']:,} elements, k*k-expanded values "
              f"{expanded:,}; outputs differ by {r['max_diff']:.1e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
