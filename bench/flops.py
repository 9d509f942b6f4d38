"""FLOPs of the math against the papers' tables, and what counting costs the hot path.

    python bench/flops.py [--skip-papers] [--skip-overhead] [--repeats 7]

1. Every model of configs/*/metafile.yaml that has a paper figure (reference.gflops, or SAN's gmacs), counted at
   its dataset's resolution (224x224 on ImageNet) on meta tensors (`common.inspect.timing.count_flops_by_op`):
   our GFLOPs as the paper counts them (without the ops it leaves out, reference.gflops_excludes), the paper's,
   the difference, and what the attention ops of `common.inspect.flops` contribute.
2. The price of `common.inspect.flops.counted_op` outside a FlopCounterMode: a SASA layer's forward + backward
   (B=8, 64 channels, 32x32, kernel 7, fp32) through the counted op and through the bare function, in
   interleaved rounds; and the wrapper's own cost per call (a trivial op, 20,000 calls).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.inspect.timing import count_flops_by_op, timed_rounds  # noqa: E402
from common.train.engine import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def papers() -> None:
    print(f"{'metafile':<10} {'model':<16} {'options':<42} {'size':>4} {'ours':>7} {'paper':>6} {'diff':>6}  "
          f"attention ops, GFLOPs (* left out, as the paper does)")
    for path in sorted(glob.glob(str(ROOT / "configs" / "*" / "metafile.yaml"))):
        for entry in yaml.safe_load(Path(path).read_text())["models"]:
            reference = entry.get("reference") or {}
            if not (reference.get("gflops") or reference.get("gmacs")):
                continue
            size = (3, 224, 224) if entry["dataset"] == "imagenet" else (3, 32, 32)
            model = build_model(entry["name"], entry.get("kwargs", {}), CLASSES[entry["dataset"]])
            counts = count_flops_by_op(model, size)
            excluded = set(reference.get("gflops_excludes", []))
            ours = sum(n for op, n in counts.items() if op.split(".")[-1] not in excluded) / 1e9
            paper = reference.get("gflops") or 2 * reference["gmacs"]
            attention = ", ".join(f"{op.split('.')[-1]}{'*' * (op.split('.')[-1] in excluded)} {n / 1e9:.3f}"
                                  for op, n in counts.items() if "attention" in op)
            options = ", ".join(f"{k}={v}" for k, v in (entry.get("kwargs") or {}).items())
            print(f"{Path(path).parent.name:<10} {entry['name']:<16} {options:<42} {size[-1]:>4} {ours:7.3f} "
                  f"{paper:6.2f} {100 * (ours / paper - 1):+5.1f}%  {attention}")


def overhead(repeats: int) -> None:
    from common.inspect.flops import counted_op
    from common.ops import neighborhood
    from sasa import LocalSelfAttention2d

    torch.manual_seed(0)
    layer = LocalSelfAttention2d(64, 64, kernel_size=7, heads=8)
    x = torch.randn(8, 64, 32, 32, requires_grad=True)
    counted, bare = neighborhood.neighborhood_attention, neighborhood.neighborhood_attention.__wrapped__

    def step(fn):
        def run():
            neighborhood.neighborhood_attention = fn  # attend_and_record looks the op up at call time
            try:
                layer(x).sum().backward()
            finally:
                neighborhood.neighborhood_attention = counted
        return run

    times = timed_rounds({"counted": step(counted), "bare": step(bare)}, repeats, torch.device("cpu"))
    print(f"SASA layer fwd+bwd, B=8, 64 ch, 32x32, k=7, fp32, median of {repeats}: counted op "
          f"{times['counted'] * 1e3:.1f} ms, bare function {times['bare'] * 1e3:.1f} ms, "
          f"ratio {times['counted'] / times['bare']:.3f}")

    @counted_op("bench_trivial", macs=lambda t: 1)
    def trivial(t):
        return t

    t, calls = torch.zeros(1), 20_000
    per_call = {}
    for name, fn in (("counted", trivial), ("bare", trivial.__wrapped__)):
        start = time.perf_counter()
        for _ in range(calls):
            fn(t)
        per_call[name] = (time.perf_counter() - start) / calls * 1e6
    print(f"wrapper: {per_call['counted'] - per_call['bare']:.2f} us per call "
          f"({per_call['counted']:.2f} us counted, {per_call['bare']:.2f} us bare)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-papers", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    if not args.skip_papers:
        papers()
    if not args.skip_overhead:
        overhead(args.repeats)


if __name__ == "__main__":
    main()
