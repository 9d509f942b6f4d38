"""Neighbourhood attention backends against the unfold reference and a 3x3 convolution, in one run.

    python bench/neighborhood.py [--device cpu|cuda] [--batch 8] [--repeats 7] [--threads 2]
                                 [--omp-wait-policy passive|active]

Headline layer: 64 channels as 8 heads of d=8, a 32x32 map, kernel 7, fp32, a shared relative embedding,
border="mask". For each backend it measures forward+backward time (the median of --repeats runs after
warm-up; the backends run in interleaved rounds so that load from other processes hits all of them alike)
and the bytes saved for backward (torch.autograd.graph.saved_tensors_hooks, each storage counted once, the
inputs included). Everything is printed as a ratio to the `reference` backend and to a 3x3
nn.Conv2d(64, 64) forward+backward on the same (B, 64, 32, 32) activation. On CUDA it runs batch 8 and 64
and includes "triton" when that backend is available. Nothing is asserted: the PASS/FAIL lines report the
targets (tiled at least 4x faster than reference; at most 1/4 of its saved bytes).

OpenMP wait policy: unless OMP_WAIT_POLICY is already set, the script sets it to PASSIVE before torch is
imported (--omp-wait-policy overrides). With the default spin-waiting, on a machine whose cores are busy
with other processes every parallel region waits for a descheduled worker, which taxes an op by its count
of kernels rather than by its work (measured here under load: tiled 2 threads ~2x slower than 1 thread
with ACTIVE, equal with PASSIVE; the reference is barely affected either way). Both backends run in the
same process under the same setting, which the header prints.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on the CPU; 8 and 64 on CUDA")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                        help="OMP_WAIT_POLICY for this process (default: the environment's, else passive)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # must happen before torch (and its OpenMP runtime) is loaded
    _ARGS = parse_args()
    if _ARGS.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = _ARGS.omp_wait_policy.upper()
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.inspect.memory import SavedTensors  # noqa: E402
from common.inspect.timing import timed_rounds  # noqa: E402
from common.ops import neighborhood as nb  # noqa: E402

HEADS, HEAD_DIM, SIZE, KERNEL = 8, 8, 32, 7
SPEED_TARGET, MEMORY_TARGET = 4.0, 0.25


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while running fn()."""
    with SavedTensors() as saved:
        out = fn()
    del out
    return saved.bytes


def run(batch: int, device: torch.device, repeats: int) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, HEADS, SIZE, SIZE, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen).to(device).requires_grad_() for _ in range(3))
    rel = (torch.randn(KERNEL, KERNEL, HEAD_DIM, generator=gen) * 0.5).to(device).requires_grad_()
    channels = HEADS * HEAD_DIM
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
    x = torch.randn(batch, channels, SIZE, SIZE, generator=gen).to(device).requires_grad_()

    if device.type == "cuda":
        nb._ensure_triton()
    backends = [name for name in nb.BACKENDS if not (device.type == "cpu" and name == "triton")]

    def attention_step(name):
        def step():
            out = nb.neighborhood_attention(q, k, v, KERNEL, rel_pos=rel, backend=name)
            out.backward(torch.ones_like(out))
        return step

    def conv_step():
        conv(x).sum().backward()

    steps = {name: attention_step(name) for name in backends}
    steps["conv3x3"] = conv_step
    times = timed_rounds(steps, repeats, device)
    memory = {name: saved_bytes(lambda name=name: nb.neighborhood_attention(q, k, v, KERNEL, rel_pos=rel,
                                                                              backend=name))
              for name in backends}
    memory["conv3x3"] = saved_bytes(lambda: conv(x))

    ref_t, ref_m, conv_t = times["reference"], memory["reference"], times["conv3x3"]
    where = (f"threads={torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
             if device.type == "cpu" else torch.cuda.get_device_name(device))
    print(f"\nB={batch}, heads={HEADS}, d={HEAD_DIM}, {SIZE}x{SIZE}, kernel {KERNEL}, fp32, device={device} ({where}), "
          f"median of {repeats}")
    print(f"{'backend':<10} {'fwd+bwd ms':>11} {'speedup vs ref':>15} {'time / conv':>12} {'saved MiB':>10} "
          f"{'saved / ref':>12}")
    for name in steps:
        print(f"{name:<10} {times[name] * 1e3:>11.1f} {ref_t / times[name]:>15.2f} {times[name] / conv_t:>12.2f} "
              f"{memory[name] / 2 ** 20:>10.2f} {memory[name] / ref_m:>12.3f}")
    ok = True
    if "tiled" in times:
        speed = ref_t / times["tiled"]
        mem = memory["tiled"] / ref_m
        for label, good, text in (
                ("speed", speed >= SPEED_TARGET, f"tiled is {speed:.2f}x faster than reference (target >= "
                                                 f"{SPEED_TARGET:g}x)"),
                ("memory", mem <= MEMORY_TARGET, f"tiled saves {mem:.3f} of reference's bytes for backward "
                                                 f"(target <= {MEMORY_TARGET:g})")):
            print(f"{'PASS' if good else 'FAIL'} {label}: {text}")
            ok &= good
    return ok


def main(args=None) -> int:
    args = args if args is not None else parse_args([])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batches = [args.batch] if args.batch else ([8, 64] if device.type == "cuda" else [8])
    for batch in batches:
        run(batch, device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
