"""How far the fused CPU kernel's arithmetic alone goes: bench/neighborhood.py's shapes with the memory traffic
taken out, against the same 1024x1024 GEMM.

    python bench/neighborhood_bound.py [--repeats 15] [--threads 2]

For each shape of bench/neighborhood.py, the fused_cpu forward+backward (op level, fp32, a shared relative
embedding, border="mask", every input gradient) runs on 8 (batch, head) planes of that shape (one image of the
bench's 8 heads), over and over on one thread, so that the inputs, outputs and scratch stay in the caches and
the time is the kernel's own instruction stream (with 8 planes per call and one thread the forward pass hands
out whole planes, as it does on the bench's problems). The time per plane is projected to the bench's problem
(its B*heads planes on --threads threads, scaling perfectly) and turned into GFLOP/s and a share of a
--threads-thread torch.mm measured in the same process (the FLOP count is bench/neighborhood.py's:
6 x 2 x B*heads*H*W*k*k*d). The difference between this projection and bench/neighborhood.py's measurement is
what reading the inputs from memory, writing the outputs, the page faults of fresh outputs and the autograd
wrapper cost there. Nothing is asserted; BENCHMARKS.md records the figures.
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

from bench.neighborhood import GEMM_N, SHAPES, attention_flops  # noqa: E402
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="threads of the projection and of the GEMM")
    args = parser.parse_args(argv)
    if not neighborhood_cpu.ensure_built():
        print(f"the fused CPU kernel is unavailable: {neighborhood_cpu.problem()}", file=sys.stderr)
        return 1
    steps = {name: plane_step(head_dim, size, kernel) for name, (_, _, head_dim, size, kernel) in SHAPES.items()}
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    calls = 3  # per round and shape: one call takes 0.5-6 ms
    times = {name: [] for name in steps}
    gemm_times = []
    for round_ in range(args.repeats + 2):  # two warm-up rounds
        torch.set_num_threads(1)
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) / calls / PLANES)
        torch.set_num_threads(args.threads)
        torch.mm(a, b)  # untimed: the BLAS threads wake up after the change of thread count
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        if round_ >= 2:
            gemm_times.append((time.perf_counter() - start) / calls)
    gemm_rate = 2 * GEMM_N ** 3 / statistics.median(gemm_times)
    threads = threads_label(args.threads)
    print(f"fused_cpu, cache-resident: {PLANES} planes per call on 1 thread, projected to {threads}; "
          f"GEMM {GEMM_N}^3 on {threads} {gemm_rate / 1e9:.1f} GFLOP/s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median of {args.repeats}")
    print(f"{'shape':<14} {'us per plane':>12} {'planes':>7} {'projected ms':>13} {'GFLOP/s':>8} {'% of GEMM':>10}")
    for name, (batch, heads, head_dim, size, kernel) in SHAPES.items():
        per_plane = statistics.median(times[name])
        projected = per_plane * batch * heads / args.threads
        rate = attention_flops(batch, heads, head_dim, size, kernel) / projected
        print(f"{name:<14} {per_plane * 1e6:>12.1f} {batch * heads:>7} {projected * 1e3:>13.2f} {rate / 1e9:>8.1f} "
              f"{100 * rate / gemm_rate:>9.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
