"""Adaptive span: the medium network's training step against its conv twin, and one layer at small and full span.

    python bench/adaptive_span.py [--device cpu|cuda] [--batch 8] [--repeats 7] [--threads 2] [--backend auto]

Networks: adaptive_span_medium (CIFAR-100, 32x32) with attention="adaptive" (the paper's recipe: 4 heads, S = 5,
R = 2, z = 0.3 at initialisation) against the same network with attention="conv" (3x3 convolutions) and with
attention="local" (a fixed 5x5 window); one SGD training step each (forward, cross-entropy, backward, step), in
interleaved rounds. Target (issue 17, CPU fp32): the adaptive step at most 1.5x the conv step.

One AdaptiveSpanAttention2d layer, 64 -> 64 channels as 4 heads, a 32x32 map, largest span S = 8, ramp R = 2,
fp32, border="mask". Three settings of the same layer, forward+backward (the median of --repeats runs after
warm-up, in interleaved rounds so that load from other processes hits all of them alike):

- full:  z = 1 for every head -> window 2S + 1 = 17;
- small: z = 0.1 -> S z + R = 2.8 -> window 5;
- local5: the fixed-window layer with k = 5 (no mask): what the small window costs without the mask.

Everything is printed as a ratio measured in this process; nothing is asserted. The PASS/FAIL lines report the
targets: the adaptive network's step within 1.5x of the conv network's; the small-span layer faster than the
full-span one. Like main.py, the script runs under OMP_WAIT_POLICY=PASSIVE unless the environment sets it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # before torch loads its OpenMP runtime
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_span import AdaptiveSpanAttention2d, LocalAttention2d  # noqa: E402
from common.inspect.timing import timed_rounds  # noqa: E402
from common.registry import create_model  # noqa: E402

CHANNELS, HEADS, SIZE, MAX_SPAN, RAMP = 64, 4, 32, 8, 2.0
NETWORK_TARGET = 1.5


def run_networks(batch: int, device: torch.device, repeats: int, backend: str) -> bool:
    """One training step of adaptive_span_medium with adaptive attention, local attention and 3x3 convs."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    options = {"adaptive": {"backend": backend}, "local": {"backend": backend}, "conv": {}}
    steps, models = {}, {}
    for attention, extra in options.items():
        model = create_model("adaptive_span_medium", num_classes=100, attention=attention, **extra).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[attention], models[attention] = step, model
    times = timed_rounds(steps, repeats, device)
    where = (f"threads={torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
             f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else "")
    print(f"\nadaptive_span_medium training step, batch {batch}, 32x32, fp32, backend={backend}, device={device} "
          f"({where}), median of {repeats}")
    print(f"{'attention':<10} {'params (M)':>10} {'step ms':>9} {'vs conv':>8}")
    for name, t in times.items():
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        print(f"{name:<10} {params:>10.2f} {t * 1e3:>9.1f} {t / times['conv']:>7.2f}x")
    ratio = times["adaptive"] / times["conv"]
    ok = ratio <= NETWORK_TARGET
    print(f"{'PASS' if ok else 'FAIL'} adaptive step / conv step = {ratio:.2f}x (target <= {NETWORK_TARGET}x)")
    return ok


def run(batch: int, device: torch.device, repeats: int, backend: str) -> bool:
    torch.manual_seed(0)
    layers = {}
    for name, z in (("full", 1.0), ("small", 0.1)):
        torch.manual_seed(0)  # the same weights in both
        m = AdaptiveSpanAttention2d(CHANNELS, CHANNELS, heads=HEADS, max_span=MAX_SPAN, R=RAMP, span_init=z,
                                    backend=backend).to(device)
        layers[name] = m
    layers["local5"] = LocalAttention2d(CHANNELS, CHANNELS, kernel_size=5, heads=HEADS, backend=backend).to(device)
    x = torch.randn(batch, CHANNELS, SIZE, SIZE, device=device, requires_grad=True)

    def step_of(m):
        def step():
            m(x).sum().backward()
        return step

    times = timed_rounds({name: step_of(m) for name, m in layers.items()}, repeats, device)
    windows = {name: m.window(SIZE, SIZE) for name, m in layers.items()}
    print(f"\nB={batch}, {CHANNELS} channels, {HEADS} heads, {SIZE}x{SIZE}, S={MAX_SPAN}, R={RAMP:g}, fp32, "
          f"backend={backend}, device={device}, threads={torch.get_num_threads()}, median of {repeats}")
    print(f"{'layer':<8} {'window':>7} {'fwd+bwd ms':>11} {'full / this':>12}")
    for name, t in times.items():
        print(f"{name:<8} {windows[name]:>4}x{windows[name]:<2} {t * 1e3:>11.1f} {times['full'] / t:>12.2f}")
    ratio = times["full"] / times["small"]
    ok = ratio > 1.0
    print(f"{'PASS' if ok else 'FAIL'} small spans are cheaper: full span / small span = {ratio:.2f}x "
          f"(window {windows['full']} vs {windows['small']}; target > 1)")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    parser.add_argument("--backend", default="auto", help="neighbourhood-attention backend (auto, tiled, reference)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    run_networks(args.batch, device, args.repeats, args.backend)
    run(args.batch, device, args.repeats, args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
