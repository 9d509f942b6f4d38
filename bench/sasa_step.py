"""One training step of SASA ResNet-26 against the conv ResNet-26, same CIFAR input, in one run.

    python bench/sasa_step.py [--device cuda] [--batch 128] [--dtype bf16] [--threads 2]

Both networks: bottleneck [1,2,4,1], CIFAR stem, 10 classes; SASA replaces every
3x3 conv with 7x7 local self-attention (8 heads). The paper's FLOPs for the two
are equal, so the ratio of step times is the overhead of the attention kernels.
The two steps run in interleaved rounds (the median of --repeats after warm-up).
Targets: on a GPU in bf16 (issue 3) the SASA step within 2x of the conv step; on
the CPU in fp32 (issue 17, the fused CPU kernel) within 1.3x.

Like main.py, the script runs under OMP_WAIT_POLICY=PASSIVE unless the environment
sets it (see README, "Threads on the CPU"); the header prints it and the load average.
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

from common.inspect.timing import count_macs, timed_rounds  # noqa: E402
from common.registry import create_model  # noqa: E402

TARGETS = {"cuda": 2.0, "cpu": 1.3}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_step(model, x, y, dtype):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    models = {"conv resnet26": create_model("resnet26", stem="cifar", num_classes=10),
              "sasa_resnet26": create_model("sasa_resnet26", stem="cifar", num_classes=10)}
    steps = {}
    for name, model in models.items():
        model.to(device).train()
        steps[name] = training_step(model, x, y, dtype)
    times = timed_rounds(steps, args.repeats, device)
    threads = (f", {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
               f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else "")
    print(f"training step, batch {batch}, 32x32, {dtype_name}, {device}{threads}, median of {args.repeats}")
    print(f"{'model':<15} {'params (M)':>10} {'GMACs/img':>10} {'step ms':>9} {'vs conv':>8}")
    for name, model in models.items():
        macs = count_macs(model, (3, 32, 32)) / 1e9
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:<15} {params:>10.2f} {macs:>10.3f} {1e3 * times[name]:>9.1f} "
              f"{times[name] / times['conv resnet26']:>7.2f}x")
    ratio = times["sasa_resnet26"] / times["conv resnet26"]
    target = TARGETS["cuda" if device.type == "cuda" else "cpu"]
    verdict = "PASS" if ratio <= target else "FAIL"
    wanted = "bf16" if device.type == "cuda" else "fp32"
    scope = "" if dtype_name == wanted else f" (the target is for {wanted} on this device)"
    print(f"{verdict} SASA step / conv step = {ratio:.2f}x (target <= {target}x){scope}")


if __name__ == "__main__":
    main()
