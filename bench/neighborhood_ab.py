"""Two builds of the fused CPU kernel against each other in one process: is a change to
common/ops/csrc/neighborhood_cpu.cpp faster, and does it give the same results?

    python bench/neighborhood_ab.py BASE VARIANT [--shape NAME ...] [--rounds 21] [--threads 2]
                                    [--forward-only] [--base-flags "-DX=1"] [--variant-flags "-DX=2"]

BASE and VARIANT are each a kernel source file or a git revision of this repository (its
common/ops/csrc/neighborhood_cpu.cpp at that revision): `HEAD~1 HEAD` times the last commit's change,
`HEAD my_variant.cpp` a change not yet committed. Each is compiled once per machine (common/ops/jit_build.py's
cache, about a minute) under an op namespace of its own, so both load into one process; the same source with
the same flags is built once and run as both (an A/A run: its ratios show the noise of the machine).

The shapes are bench/neighborhood.py's, and two small-map ones where per-call and per-plane overheads dominate:
a CIFAR network's 4x4 stage, and SASA ResNet-26's last stage on CIFAR (8x8 maps, 8 heads of 64 channels).
Each call is the kernel's forward and backward (every input gradient) at the op level: fp32, a shared relative
embedding, border="mask", the inputs laid out as the layers make them. Rounds
alternate base and variant, each call preceded by a 3x3 convolution step and a GEMM on the same threads, so
that neither build finds its data in the caches (as in a network, where other layers run in between); the
first two rounds are warm-up. Printed per shape: each build's median time, then **variant / base**, as the
ratio of the medians and as the median of the rounds' ratios (below 1: the variant is faster; on a noisy
machine trust a change only where both agree), and the largest difference between the two builds' results
relative to the largest value (round-off, about 1e-7, when only the order of a sum changed; a wrong kernel
differs by far more). Nothing is asserted; BENCHMARKS.md records the figures of kept changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before torch loads its OpenMP runtime, as main.py does
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.neighborhood import GEMM_N, make_problem  # noqa: E402
from bench.neighborhood import SHAPES as BENCH_SHAPES  # noqa: E402
from common.inspect.timing import threads_label  # noqa: E402
from common.ops import jit_build, neighborhood_cpu  # noqa: E402

# (batch, heads, head_dim, size, kernel): the bench's shapes, then small maps, where per-plane costs weigh most
SHAPES = {**BENCH_SHAPES, "B=16, 4x4, d=16": (16, 8, 16, 4, 7), "B=8, 8x8, d=64": (8, 8, 64, 8, 7)}
KERNEL_PATH = "common/ops/csrc/neighborhood_cpu.cpp"
NAMESPACE = "neighborhood_cpu"  # the op namespace in the source, renamed per build
WARMUP = 2
_LOADED: set[str] = set()


class Refused(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


def read_source(spec: str) -> tuple[str, str]:
    """(source text, a label for the header) of a file path or a git revision of this repository."""
    path = Path(spec)
    if path.is_file():
        return path.read_text(), str(path)
    result = subprocess.run(["git", "-C", str(REPO), "show", f"{spec}:{KERNEL_PATH}"], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise Refused(f"{spec!r} is neither a file nor a git revision of {REPO} with {KERNEL_PATH}; pass a kernel "
                      "source file or a revision such as HEAD~1")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", spec], capture_output=True, text=True,
                            check=False).stdout.strip()
    return result.stdout, spec if commit.startswith(spec) else f"{spec} ({commit})"


def load_build(source: str, flags: list[str]) -> str:
    """The op namespace (torch.ops.<it>) of `source` compiled with the kernel's flags and `flags`; one per source
    and flags, so the same build loads once."""
    if f"TORCH_LIBRARY({NAMESPACE}," not in source or f"TORCH_LIBRARY_IMPL({NAMESPACE}," not in source:
        raise Refused(f"the source does not register the {NAMESPACE} ops (TORCH_LIBRARY({NAMESPACE}, ...)); "
                      f"pass a version of {KERNEL_PATH}")
    namespace = "neighborhood_ab_" + hashlib.sha256("\0".join([source, *flags]).encode()).hexdigest()[:12]
    if namespace in _LOADED:
        return namespace
    renamed = source.replace(f"TORCH_LIBRARY({NAMESPACE},", f"TORCH_LIBRARY({namespace},").replace(
        f"TORCH_LIBRARY_IMPL({NAMESPACE},", f"TORCH_LIBRARY_IMPL({namespace},").replace(
        f'"{NAMESPACE}::', f'"{namespace}::')  # the ops the source calls by name (its autograd op calls the other two)
    directory = jit_build.cache_root() / "neighborhood_ab"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{namespace}.cpp"
    if not path.exists() or path.read_text() != renamed:
        path.write_text(renamed)
    compile_flags, link_flags = jit_build.torch_flags()
    try:
        library = jit_build.build(namespace, path, neighborhood_cpu.FLAGS + flags + compile_flags + link_flags)
    except jit_build.BuildError as exc:
        raise Refused(str(exc)) from exc
    torch.ops.load_library(str(library))
    _LOADED.add(namespace)
    return namespace


def ratios(base: list[float], variant: list[float]) -> tuple[float, float]:
    """variant / base as the ratio of the medians and as the median of the per-round ratios."""
    return (statistics.median(variant) / statistics.median(base),
            statistics.median(v / b for b, v in zip(base, variant)))


def run_shape(name: str, builds: dict, rounds: int, forward_only: bool) -> dict:
    batch, heads, head_dim, size, kernel = SHAPES[name]
    q, k, v, rel, conv, image = make_problem(batch, heads, head_dim, size, kernel, torch.device("cpu"))
    q, k, v, rel = (t.detach() for t in (q, k, v, rel))
    torch.manual_seed(1)
    grad = torch.randn_like(q)  # q's layout, as the gradient of a layer's output has
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)

    def step(ops):
        out, _, stats = ops.forward(q, k, v, rel, None, kernel, True, False)
        if forward_only:
            return [out]
        return [out, *ops.backward(grad, None, q, k, v, stats, rel, None, kernel, True, 15)]

    results = {role: step(ops) for role, ops in builds.items()}
    scale = max(t.abs().max().item() for t in results["base"] if t.numel())
    diff = max(((x - y).abs().max().item() if x.shape == y.shape else float("inf"))  # inf: a shape differs
               for x, y in zip(results["base"], results["variant"]) if x.numel())
    times = {role: [] for role in builds}
    for round_ in range(rounds + WARMUP):
        for role, ops in builds.items():
            torch.autograd.grad(conv(image).sum(), (image, conv.weight))  # other layers' work in between
            torch.mm(a, b)
            start = time.perf_counter()
            step(ops)
            if round_ >= WARMUP:
                times[role].append(time.perf_counter() - start)
    return {"times": times, "relative_diff": diff / scale if scale > 0 else diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="kernel source file or git revision (e.g. HEAD~1)")
    parser.add_argument("variant", help="kernel source file or git revision (e.g. HEAD)")
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="a shape (repeatable; default all)")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per shape, after 2 of warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the kernel uses torch's count)")
    parser.add_argument("--forward-only", action="store_true", help="time the forward pass alone")
    parser.add_argument("--base-flags", default="", help="extra compiler flags for the base build")
    parser.add_argument("--variant-flags", default="", help="extra compiler flags for the variant build")
    args = parser.parse_args(argv)
    try:
        if args.rounds < 1 or args.threads < 1:
            raise Refused("--rounds and --threads must be at least 1")
        (base_source, base_label), (variant_source, variant_label) = read_source(args.base), read_source(args.variant)
        base = load_build(base_source, args.base_flags.split())
        variant = load_build(variant_source, args.variant_flags.split())
    except Refused as exc:
        print(f"neighborhood_ab: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    same = base == variant
    builds = {"base": getattr(torch.ops, base), "variant": getattr(torch.ops, variant)}
    print(f"fused CPU kernel A/B: base = {base_label} {args.base_flags}".rstrip()
          + f", variant = {variant_label} {args.variant_flags}".rstrip()
          + f"{' (the same build: an A/A run)' if same else ''}; {'forward' if args.forward_only else 'fwd+bwd'}, "
          f"op level, {threads_label(args.threads)}, {args.rounds} interleaved rounds after {WARMUP} of warm-up")
    print(f"{'shape':<18} {'base ms':>8} {'variant ms':>11} {'variant / base':>15} {'(per round)':>12} "
          f"{'max diff':>9} {'load':>5}")
    for name in args.shape or list(SHAPES):
        measured = run_shape(name, builds, args.rounds, args.forward_only)
        times = measured["times"]
        of_medians, of_rounds = ratios(times["base"], times["variant"])
        print(f"{name:<18} {statistics.median(times['base']) * 1e3:>8.3f} "
              f"{statistics.median(times['variant']) * 1e3:>11.3f} {of_medians:>15.3f} {of_rounds:>12.3f} "
              f"{measured['relative_diff']:>9.1e} {os.getloadavg()[0]:>5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
