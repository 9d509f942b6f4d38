"""Neighbourhood attention backends against a 3x3 convolution and a large GEMM, in one run.

    python bench/neighborhood.py [--device cpu|cuda] [--shapes all|headline] [--repeats 7] [--threads 2]
                                 [--omp-wait-policy passive|active|default] [--no-policy-ratio] [--inductor]

Shapes (fp32, a shared relative embedding, border="mask", forward+backward): the headline layer, 64 channels
as 8 heads of d=8 on a 32x32 map at B=8 with kernel 7, and its variations kernel 3, kernel 11, 8 heads of
d=32 on 16x16, and B=2 on 56x56 (--shapes headline runs the first only). For each shape, every backend, a
3x3 nn.Conv2d(C, C) on the same (B, C, H, W) activation and a 1024x1024 torch.mm run in interleaved rounds
(so that load from other processes hits all of them alike; the median of --repeats after warm-up, and the
fastest round, whose distance from the median shows how steady the machine was) and are printed as time / conv
and achieved GFLOP/s: the attention core counts 6 x 2 x B*heads*H*W*k*k*d FLOPs
(q.k and p.v forward, their four products backward; the embedding terms and the softmax not counted), the
conv 3 x 2 x B*C*C*9*H*W, the GEMM 2 x 1024^3. Bytes saved for backward come from
torch.autograd.graph.saved_tensors_hooks (each storage once, the inputs included). The `reference` backend
runs on the headline shape only (it takes seconds per step elsewhere).

PASS/FAIL lines report the targets (nothing is asserted): on every shape the CPU backend `auto` picks at most
1.5x the conv and at least 25% of the GEMM's GFLOP/s; on the headline tiled at least 4x faster than the
reference (on the CPU) and at most 1/4 of its saved bytes; and the OpenMP wait-policy ratio at most 1.2. On CUDA
the backends are reference, tiled and triton (fused_cpu is a CPU kernel); bench/gpu_check.py judges triton there.
On the CPU the shapes end with the GEMM's median GFLOP/s in each and an UNSTEADY line for every shape whose GEMM
ran under 85% of the run's fastest GEMM round, or whose `auto` or conv step's median is over 1.33x its fastest
round: other load slowed the machine there, and the shape's figures then depend on how that load fell on each
step (a share of the GEMM mostly reads high), so they are not results.

OpenMP wait policy: this process runs under OMP_WAIT_POLICY=PASSIVE unless the environment or
--omp-wait-policy says otherwise ("default" = unset), as main.py does. The policy is read once, when torch's
OpenMP runtime loads, so the ratio "default policy / PASSIVE" of the `auto` headline step (and of `tiled`, for
comparison, and of the conv) is measured in child processes, each running one step alone, that alternate the two
policies: the median of 3 processes each (of 2, which is their mean, one process disturbed by other load once
read 1.42 where the next two runs read 0.74 and 0.85), with the fastest and slowest process beside it;
--no-policy-ratio skips it.

--inductor adds, on the headline shape, the step `inductor`: torch.compile (inductor) of the reference unfold
formulation, the alternative to the C++ kernel that issue 17 asked to weigh; its compile time is printed apart.
On a machine whose cores are busy with other processes, spin-waiting threads tax an op by its number of parallel
regions rather than by its work, which is what the ratio exposes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--shapes", choices=("all", "headline"), default="all")
    parser.add_argument("--batch", type=int, default=None, help="CUDA only: batch of the headline (default 8 and 64)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "default"), default=None,
                        help="OMP_WAIT_POLICY for this process (default: the environment's, else passive)")
    parser.add_argument("--no-policy-ratio", action="store_true", help="skip the default-vs-PASSIVE child runs")
    parser.add_argument("--inductor", action="store_true",
                        help="also time torch.compile of the reference formulation on the headline shape")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # a child of the policy ratio
    return parser.parse_args(argv)


if __name__ == "__main__":  # must happen before torch (and its OpenMP runtime) is loaded
    _ARGS = parse_args()
    if _ARGS.omp_wait_policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    elif _ARGS.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = _ARGS.omp_wait_policy.upper()
    elif _ARGS.probe is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.inspect.memory import SavedTensors  # noqa: E402
from common.inspect.rounds import timed_rounds, timed_workloads  # noqa: E402
from common.ops import neighborhood as nb  # noqa: E402

# name: (batch, heads, head dim, height = width, kernel)
SHAPES = {"headline": (8, 8, 8, 32, 7), "kernel 3": (8, 8, 8, 32, 3), "kernel 11": (8, 8, 8, 32, 11),
          "d=32, 16x16": (8, 8, 32, 16, 7), "B=2, 56x56": (2, 8, 8, 56, 7)}
CONV_RATIO_TARGET, GEMM_SHARE_TARGET, POLICY_TARGET = 1.5, 0.25, 1.2
SPEED_TARGET, MEMORY_TARGET = 4.0, 0.25
GEMM_N = 1024
# Other load on the machine shows in two ways, each of which flags a shape's figures as not results (UNSTEADY):
# its GEMM's median under STEADY_GEMM of the run's fastest GEMM round (the machine slower for the whole shape; quiet
# runs here stay above 0.85), or a step's median over STEADY_SPREAD times its own fastest round (most of its rounds
# slowed; in the runs here that were otherwise steady, medians stayed within 1.25x of it).
STEADY_GEMM, STEADY_SPREAD = 0.85, 1.33


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while running fn()."""
    with SavedTensors() as saved:
        out = fn()
    del out
    return saved.bytes


def attention_flops(batch, heads, head_dim, size, kernel) -> int:
    return 6 * 2 * batch * heads * size * size * kernel * kernel * head_dim


def disturbed(record: dict, fastest_gemm: float) -> list:
    """Why other load disturbed a shape's timings; empty when it ran steadily. record: the shape's "gemm_rate" (its
    GEMM's median), "share" (of that GEMM) and "spread" ({step: median / fastest round} of the steps its figures
    come from); fastest_gemm: the rate of the run's fastest GEMM round (what the machine gives unloaded).

    Each share of the GEMM is taken against the GEMM's median in the shape's own rounds, which would cancel a
    machine uniformly slower for a whole shape. But other processes slow the GEMM, whose threads wait for each
    other at every step, and the kernel, whose work items go to whichever thread is free, by different factors:
    on a busy host a shape's share has read 1.3-1.6x its quiet value, and sometimes lower.
    """
    why = []
    fraction = record["gemm_rate"] / fastest_gemm
    if fraction < STEADY_GEMM:
        why.append(f"its GEMM ran at {100 * fraction:.0f}% of this run's fastest round "
                   f"(against which its share is {100 * record['share'] * fraction:.1f}%)")
    why += [f"{step}'s median is {spread:.2f}x its fastest round"
            for step, spread in record["spread"].items() if spread > STEADY_SPREAD]
    return why


def report_unsteady(records: dict) -> None:
    """After the shapes: the GEMM's median rate in each, and an UNSTEADY line for each shape `disturbed` flags
    against the run's fastest GEMM round. records: {shape: `steadiness` of its rounds}."""
    fastest_gemm = max(record["gemm_best"] for record in records.values())
    print("\nGEMM GFLOP/s (median) by shape: "
          + "; ".join(f"{name} {record['gemm_rate'] / 1e9:.1f}" for name, record in records.items())
          + f"; fastest round of the run {fastest_gemm / 1e9:.1f}")
    for name, record in records.items():
        why = disturbed(record, fastest_gemm)
        if why:
            print(f"UNSTEADY {name}: {'; '.join(why)}. Other load slowed the machine, so this shape's figures (its "
                  f"{100 * record['share']:.1f}% of the GEMM among them) are not results; re-run when it is quiet")


def steadiness(workloads: dict, share: float, steps) -> dict:
    """`disturbed`'s record of one shape's timed rounds (workloads, the GEMM's among them, and the share of the
    GEMM its figures reached), with the rate of its GEMM's fastest round ("gemm_best"); steps: the workloads whose
    spread (median over fastest round) counts."""
    gemm = workloads["gemm"]
    return {"gemm_rate": 2 * GEMM_N ** 3 / gemm.median(), "gemm_best": 2 * GEMM_N ** 3 / min(gemm.per_round()),
            "share": share, "spread": {name: workloads[name].median() / min(workloads[name].per_round())
                                       for name in steps}}


def make_problem(batch, heads, head_dim, size, kernel, device):
    """q, k, v as the layers make them (channel-major views of one conv output), a shared embedding, the conv."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    channels = heads * head_dim
    x = torch.randn(batch, 3 * channels, size, size, generator=gen).to(device)
    q, k, v = (t.detach().requires_grad_() for t in nb.split_heads(x, 3 * heads).chunk(3, dim=1))
    rel = (torch.randn(kernel, kernel, head_dim, generator=gen) * 0.5).to(device).requires_grad_()
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
    image = torch.randn(batch, channels, size, size, generator=gen).to(device).requires_grad_()
    return q, k, v, rel, conv, image


def attention_step(q, k, v, kernel, rel, grad, backend):
    """The timed attention step: the op through `neighborhood_attention`, then the gradient of every input."""
    def step():
        out = nb.neighborhood_attention(q, k, v, kernel, rel_pos=rel, backend=backend)
        torch.autograd.grad(out, (q, k, v, rel), grad)
    return step


def conv_step(conv, image):
    """The timed conv step: forward, then the gradients of the input and the weight."""
    return lambda: torch.autograd.grad(conv(image).sum(), (image, conv.weight))


def backends_for(device, shape_name):
    on_device = {"triton": device.type == "cuda", "fused_cpu": device.type == "cpu"}
    names = [name for name in nb.BACKENDS if on_device.get(name, True)]  # elsewhere they would only run tiled
    if device.type == "cpu" and "fused_cpu" in names and not nb.neighborhood_cpu.ensure_built():
        names.remove("fused_cpu")
    if shape_name != "headline":
        names = [name for name in names if name != "reference"]
    return names


def compiled_reference(q, k, v, kernel, rel, grad):
    """A fwd+bwd step of torch.compile(reference_attention), compiled (and the seconds that took) before timing."""
    import time

    compiled = torch.compile(nb.reference_attention)

    def step():
        torch.autograd.grad(compiled(q, k, v, kernel, rel), (q, k, v, rel), grad)

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def run_shape(shape_name, device, repeats, inductor=False) -> dict:
    """Time and print one shape. Returns whether its targets held ("ok") and, on the CPU, the `steadiness` of its
    rounds (the share of the GEMM that `auto` reached, the spread of the `auto` and conv steps)."""
    batch, heads, head_dim, size, kernel = SHAPES[shape_name]
    q, k, v, rel, conv, image = make_problem(batch, heads, head_dim, size, kernel, device)
    backends = backends_for(device, shape_name)
    auto = nb.select_backend(q, True, k, v, kernel, rel_pos=rel)
    a, b = (torch.randn(GEMM_N, GEMM_N, device=device) for _ in range(2))
    grad = torch.ones_like(q)

    steps = {name: attention_step(q, k, v, kernel, rel, grad, name) for name in backends}
    compile_seconds = None
    if inductor and shape_name == "headline":
        steps["inductor"], compile_seconds = compiled_reference(q, k, v, kernel, rel, grad)
    steps["conv3x3"] = conv_step(conv, image)
    steps["gemm"] = lambda: torch.mm(a, b)
    workloads = timed_workloads(steps, repeats, device)
    times = {name: w.median() for name, w in workloads.items()}
    memory = {name: saved_bytes(lambda name=name: nb.neighborhood_attention(q, k, v, kernel, rel_pos=rel,
                                                                              backend=name))
              for name in backends}
    memory["conv3x3"] = saved_bytes(lambda: conv(image))

    channels = heads * head_dim
    timed = [name for name in steps if name not in ("conv3x3", "gemm")]
    flops = {name: attention_flops(batch, heads, head_dim, size, kernel) for name in timed}
    flops["conv3x3"] = 3 * 2 * batch * channels * channels * 9 * size * size
    gemm_rate = 2 * GEMM_N ** 3 / times["gemm"]
    conv_t = times["conv3x3"]
    where = (f"threads={torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
             if device.type == "cpu" else torch.cuda.get_device_name(device))
    print(f"\n{shape_name}: B={batch}, heads={heads}, d={head_dim}, {size}x{size}, kernel {kernel}, fp32, "
          f"device={device} ({where}), median of {repeats}; auto -> {auto}")
    if compile_seconds is not None:
        print(f"inductor: torch.compile of the reference took {compile_seconds:.1f} s to compile (first call)")
    print(f"{'step':<10} {'fwd+bwd ms':>11} {'fastest ms':>11} {'time / conv':>12} {'GFLOP/s':>8} {'% of GEMM':>10} "
          f"{'saved MiB':>10}{' saved / ref':>12}")
    for name in [*timed, "conv3x3", "gemm"]:
        rate = (2 * GEMM_N ** 3 if name == "gemm" else flops[name]) / times[name]
        saved = f"{memory[name] / 2 ** 20:>10.2f}" if name in memory else f"{'':>10}"
        ratio = f"{memory[name] / memory['reference']:>12.3f}" if "reference" in memory and name in memory else ""
        print(f"{name:<10} {times[name] * 1e3:>11.2f} {min(workloads[name].per_round()) * 1e3:>11.2f} "
              f"{times[name] / conv_t:>12.2f} {rate / 1e9:>8.1f} {100 * rate / gemm_rate:>9.1f}% {saved}{ratio}")
    ok = True
    checks = []
    result = {}
    if device.type == "cpu":
        ratio, share = times[auto] / conv_t, flops[auto] / times[auto] / gemm_rate
        result = steadiness(workloads, share, (auto, "conv3x3"))
        checks += [(ratio <= CONV_RATIO_TARGET,
                    f"{auto} fwd+bwd = {ratio:.2f}x the conv (target <= {CONV_RATIO_TARGET}x)"),
                   (share >= GEMM_SHARE_TARGET, (f"{auto} at {100 * share:.1f}% of the GEMM's GFLOP/s "
                                                 f"(target >= {100 * GEMM_SHARE_TARGET:.0f}%)"))]
    if "reference" in times and "tiled" in times:
        speed, mem = times["reference"] / times["tiled"], memory["tiled"] / memory["reference"]
        if device.type == "cpu":  # on a GPU both are launch-bound chains of torch ops; Triton is the fast path there
            checks.append((speed >= SPEED_TARGET,
                           f"tiled is {speed:.2f}x faster than reference (target >= {SPEED_TARGET:g}x)"))
        checks.append((mem <= MEMORY_TARGET, (f"tiled saves {mem:.3f} of reference's bytes for backward "
                                              f"(target <= {MEMORY_TARGET:g})")))
    for good, text in checks:
        print(f"{'PASS' if good else 'FAIL'} {shape_name}: {text}")
        ok &= good
    return {**result, "ok": ok}


PROBES = ("auto", "tiled", "conv3x3")


def probe(step_name: str, repeats: int) -> dict:
    """One child of the policy ratio: the median seconds of one headline step, alone in its process (an
    OpenMP op run before it, with the default policy, would leave threads spinning into it)."""
    q, k, v, rel, conv, image = make_problem(*SHAPES["headline"], torch.device("cpu"))
    kernel = SHAPES["headline"][4]
    auto = nb.select_backend(q, True, k, v, kernel, rel_pos=rel)
    grad = torch.ones_like(q)

    if step_name == "conv3x3":
        step = conv_step(conv, image)
    else:
        step = attention_step(q, k, v, kernel, rel, grad, auto if step_name == "auto" else "tiled")
    seconds = timed_rounds({step_name: step}, repeats, torch.device("cpu"))[step_name]
    return {"step": step_name, "backend": auto, "seconds": seconds}


def policy_ratio(threads: int, repeats: int, rounds: int = 3) -> bool:
    """Median step time with OpenMP's default wait policy over that with PASSIVE, each step alone in child
    processes that alternate the two policies."""
    results = {(name, policy): [] for name in PROBES for policy in ("default", "PASSIVE")}
    auto = None
    for _ in range(rounds):
        for name in PROBES:
            for policy in ("default", "PASSIVE"):
                env = {key: value for key, value in os.environ.items()
                       if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                if policy == "PASSIVE":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                command = [sys.executable, __file__, "--probe", name, "--device", "cpu", "--threads", str(threads),
                           "--repeats", str(repeats)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                auto = result["backend"]
                results[(name, policy)].append(result["seconds"])
    print(f"\nOpenMP wait policy, headline shape, {threads} threads, each step alone in its process, median of "
          f"{rounds} processes per policy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    ok = True
    for name in PROBES:
        default = statistics.median(results[(name, "default")])
        passive = statistics.median(results[(name, "PASSIVE")])
        label = f"auto ({auto})" if name == "auto" else name
        spans = {policy: "{:.1f}-{:.1f}".format(*(1e3 * f(results[(name, policy)]) for f in (min, max)))
                 for policy in ("default", "PASSIVE")}
        print(f"{label:<18} default {default * 1e3:8.1f} ms ({spans['default']:>11})   "
              f"PASSIVE {passive * 1e3:8.1f} ms ({spans['PASSIVE']:>11})   ratio {default / passive:.2f}")
    default = statistics.median(results[("auto", "default")])
    passive = statistics.median(results[("auto", "PASSIVE")])
    good = default / passive <= POLICY_TARGET
    print(f"{'PASS' if good else 'FAIL'} policy: {auto} default / PASSIVE = {default / passive:.2f} "
          f"(target <= {POLICY_TARGET})")
    return ok and good


def main(args=None) -> int:
    args = args if args is not None else parse_args([])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.probe is not None:
        print(json.dumps(probe(args.probe, args.repeats)))
        return 0
    if device.type == "cuda":
        nb._ensure_triton()
        for batch in [args.batch] if args.batch else [8, 64]:
            SHAPES["headline"] = (batch, *SHAPES["headline"][1:])
            run_shape("headline", device, args.repeats, args.inductor)
        return 0
    results = {name: run_shape(name, device, args.repeats, args.inductor)
               for name in (SHAPES if args.shapes == "all" else ["headline"])}
    report_unsteady(results)
    if not args.no_policy_ratio:
        policy_ratio(args.threads, min(args.repeats, 5))
    return 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
