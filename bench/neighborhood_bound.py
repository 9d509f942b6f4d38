"""How far the fused CPU kernel can go on bench/neighborhood.py's shapes, against the same 1024x1024 GEMM: two
bounds, one from the arithmetic and one from everything else.

    python bench/neighborhood_bound.py [--repeats 15] [--threads 2]

1. Cache-resident: for each shape of bench/neighborhood.py, the fused_cpu forward+backward (op level, fp32, a
shared relative embedding, border="mask", every input gradient) runs on 8 (batch, head) planes of that shape (one
image of the bench's 8 heads), over and over on one thread, so that the inputs, outputs and scratch stay in the
caches and the time is the kernel's own instruction stream (with 8 planes per call and one thread the forward
pass hands out whole planes, as it does on the bench's problems). The time per plane is projected to the bench's
problem (its B*heads planes on --threads threads, scaling perfectly) and turned into GFLOP/s and a share of a
--threads-thread torch.mm measured in the same process (the FLOP count is bench/neighborhood.py's:
6 x 2 x B*heads*H*W*k*k*d). The difference between this projection and bench/neighborhood.py's measurement is
what reading the inputs from memory, writing the outputs, the page faults of fresh outputs and the autograd
wrapper cost there.

2. The floor: each shape's bench step (bench/neighborhood.py's: `neighborhood_attention` on the fused_cpu
backend, then `torch.autograd.grad`, timed in interleaved rounds with that shape's 3x3 conv step and the GEMM)
at its own kernel size and at kernel 1. At kernel 1 the step reads and writes the same tensors and pays the same
Python, dispatch and autograd costs, with 1/k^2 of the window arithmetic. So no kernel of this design, however
fast its arithmetic, can take a shape's step below its kernel-1 time: the shape's FLOPs over that time, as a
share of the GEMM, is the most the shape can reach ("ceiling"). Where that is below the bench's 25% target, the
target is out of reach whatever the arithmetic costs. The table ends with bench/neighborhood.py's UNSTEADY lines
(shapes whose GEMM, step or kernel-1 step other load slowed). Nothing is asserted; BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before torch loads its OpenMP runtime, as main.py does
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.neighborhood import (  # noqa: E402
    GEMM_N,
    GEMM_SHARE_TARGET,
    SHAPES,
    attention_flops,
    attention_step,
    conv_step,
    make_problem,
    report_unsteady,
    steadiness,
)
from common.inspect.rounds import timed_workloads  # noqa: E402
from common.inspect.timing import threads_label  # noqa: E402
from common.ops import neighborhood as nb  # noqa: E402
from common.ops import neighborhood_cpu  # noqa: E402

PLANES = 8  # per timed call: whole-plane work items on one thread, and data that stays in the caches


def plane_step(head_dim: int, size: int, kernel: int):
    """A forward+backward of the kernel's two ops on PLANES planes, inputs laid out as the layers make them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * PLANES * head_dim, size, size, generator=gen)
    q, k, v = nb.split_heads(x, 3 * PLANES).chunk(3, dim=1)
    rel = torch.randn(kernel, kernel, head_dim, generator=gen)
    grad = nb.split_heads(torch.randn(1, PLANES * head_dim, size, size, generator=gen), PLANES)
    ops = torch.ops.neighborhood_cpu

    def step():
        out, _, stats = ops.forward(q, k, v, rel, None, kernel, True, False)
        ops.backward(grad, None, q, k, v, stats, rel, None, kernel, True, 15)

    return step


def bench_steps(batch: int, heads: int, head_dim: int, size: int, kernel: int):
    """bench/neighborhood.py's attention step on the fused_cpu backend, and its conv step, on one problem."""
    q, k, v, rel, conv, image = make_problem(batch, heads, head_dim, size, kernel, torch.device("cpu"))
    return attention_step(q, k, v, kernel, rel, torch.ones_like(q), "fused_cpu"), conv_step(conv, image)


def cache_resident(repeats: int, threads: int) -> None:
    """Part 1 of the module docstring: the kernel on PLANES cache-resident planes, projected to each shape."""
    steps = {name: plane_step(head_dim, size, kernel) for name, (_, _, head_dim, size, kernel) in SHAPES.items()}
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    calls = 3  # per round and shape: one call takes 0.5-6 ms
    times = {name: [] for name in steps}
    gemm_times = []
    for round_ in range(repeats + 2):  # two warm-up rounds
        torch.set_num_threads(1)
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) / calls / PLANES)
        torch.set_num_threads(threads)
        torch.mm(a, b)  # untimed: the BLAS threads wake up after the change of thread count
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        if round_ >= 2:
            gemm_times.append((time.perf_counter() - start) / calls)
    gemm_rate = 2 * GEMM_N ** 3 / statistics.median(gemm_times)
    label = threads_label(threads)
    print(f"fused_cpu, cache-resident: {PLANES} planes per call on 1 thread, projected to {label}; "
          f"GEMM {GEMM_N}^3 on {label} {gemm_rate / 1e9:.1f} GFLOP/s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median of {repeats}")
    print(f"{'shape':<14} {'us per plane':>12} {'planes':>7} {'projected ms':>13} {'GFLOP/s':>8} {'% of GEMM':>10}")
    for name, (batch, heads, head_dim, size, kernel) in SHAPES.items():
        per_plane = statistics.median(times[name])
        projected = per_plane * batch * heads / threads
        rate = attention_flops(batch, heads, head_dim, size, kernel) / projected
        print(f"{name:<14} {per_plane * 1e6:>12.1f} {batch * heads:>7} {projected * 1e3:>13.2f} {rate / 1e9:>8.1f} "
              f"{100 * rate / gemm_rate:>9.1f}%")


def floor(repeats: int, threads: int) -> None:
    """Part 2 of the module docstring: each shape's bench step at its kernel size and at kernel 1."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    print(f"\nThe floor: each shape's bench step (fused_cpu, autograd, {threads_label(threads)}) at its kernel size "
          f"and at kernel 1, interleaved with its conv step and the GEMM; median of {repeats}")
    print(f"{'shape':<14} {'step ms':>8} {'kernel 1 ms':>12} {'k1 / step':>10} {'% of GEMM':>10} {'ceiling':>8}")
    records = {}
    for name, (batch, heads, head_dim, size, kernel) in SHAPES.items():
        step, conv = bench_steps(batch, heads, head_dim, size, kernel)
        steps = {"step": step, "kernel 1": bench_steps(batch, heads, head_dim, size, 1)[0], "conv3x3": conv,
                 "gemm": lambda: torch.mm(a, b)}
        workloads = timed_workloads(steps, repeats, cpu)
        times = {key: w.median() for key, w in workloads.items()}
        gemm_rate = 2 * GEMM_N ** 3 / times["gemm"]
        flops = attention_flops(batch, heads, head_dim, size, kernel)
        share, ceiling = flops / times["step"] / gemm_rate, flops / times["kernel 1"] / gemm_rate
        records[name] = steadiness(workloads, share, ("step", "kernel 1"))
        print(f"{name:<14} {times['step'] * 1e3:>8.2f} {times['kernel 1'] * 1e3:>12.2f} "
              f"{times['kernel 1'] / times['step']:>10.2f} {100 * share:>9.1f}% {100 * ceiling:>7.1f}%")
        if ceiling < GEMM_SHARE_TARGET:
            print(f"  {name}: even at kernel 1 the step takes {times['kernel 1'] * 1e3:.2f} ms; "
                  f"{100 * GEMM_SHARE_TARGET:.0f}% of the GEMM needs {flops / GEMM_SHARE_TARGET / gemm_rate * 1e3:.2f} "
                  "ms: out of reach for this design")
    report_unsteady(records)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the projection, the floor and the GEMM")
    args = parser.parse_args(argv)
    if not neighborhood_cpu.ensure_built():
        print(f"the fused CPU kernel is unavailable: {neighborhood_cpu.problem()}", file=sys.stderr)
        return 1
    cache_resident(args.repeats, args.threads)
    floor(args.repeats, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
