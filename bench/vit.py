"""ViT attention: the layer's scaled_dot_product_attention call against the same attention written out.

    python bench/vit.py [--batch 32] [--repeats 7] [--device cpu|cuda] [--dtype fp32|bf16]

One `TokenSelfAttention` at the sizes of `vit_cifar` (65 tokens, dim 192, 12 heads of 16) and `vit_re`
(257 tokens, dim 400, 9 heads of 44), plain and with LSA. Both paths share the layer's weights and compute
the same function (checked):

- written out: softmax(q k^T + mask) v with the (B, heads, N, N) probabilities kept for backward;
- the layer: one `F.scaled_dot_product_attention` call (PyTorch picks a fused kernel where one fits).

Prints forward+backward time (median of interleaved rounds) and bytes saved for backward, with ratios. On CUDA
it then lists the SDPA kernels each plain layer can use (forward+backward under
`torch.nn.attention.sdpa_kernel` with one backend allowed): flash attention needs a head dim divisible by 8, so
vit_cifar (16) can use it and vit_re (44) cannot.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.inspect.memory import SavedTensors  # noqa: E402
from common.inspect.timing import timed_rounds  # noqa: E402
from vit.attention import TokenSelfAttention  # noqa: E402

SIZES = {"vit_cifar": dict(dim=192, heads=12, grid=(8, 8)), "vit_re": dict(dim=400, heads=9, grid=(16, 16))}
MIB = 2 ** 20


def written_out(layer: TokenSelfAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = layer._scaled_qkv(x)
    logits = q @ k.transpose(-1, -2)
    if layer.locality:
        logits = logits.masked_fill(~layer.attend, float("-inf"))
    out = logits.softmax(-1) @ v
    return layer.proj(out.transpose(1, 2).flatten(2))


def usable_sdpa_kernels(layer: TokenSelfAttention, x: torch.Tensor) -> list[str]:
    """The SDPA backends that run this layer's forward+backward when each is the only one allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    usable = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel(backend):
                warnings.simplefilter("ignore")  # "... kernel not used because ..." for each one that cannot
                layer(x).float().sum().backward()
            usable.append(name.split("_")[0].lower())
        except Exception:  # noqa: BLE001 - "no available kernel" is a RuntimeError; any failure means not usable
            pass
    return usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"device {device} ({torch.get_num_threads()} threads), batch {args.batch}, {args.dtype}, "
          f"torch {torch.__version__}")
    print(f"{'size':<10} {'attention':<9} {'written out':>12} {'SDPA':>10} {'speed-up':>9} "
          f"{'saved (written)':>16} {'saved (SDPA)':>13} {'ratio':>6}")
    kernels = []
    for name, size in SIZES.items():
        for lsa in (False, True):
            torch.manual_seed(0)
            layer = TokenSelfAttention(size["dim"], size["heads"], size["grid"], locality=lsa).to(device, dtype)
            n = 1 + size["grid"][0] * size["grid"][1]
            x = torch.randn(args.batch, n, size["dim"], device=device, dtype=dtype, requires_grad=True)
            with torch.no_grad():
                error = (layer(x) - written_out(layer, x)).abs().max().item()
            assert error < (1e-4 if dtype == torch.float32 else 5e-2), error
            paths = {"written": lambda: written_out(layer, x), "sdpa": lambda: layer(x)}
            steps = {key: (lambda f=f: f().float().square().mean().backward()) for key, f in paths.items()}
            seconds = timed_rounds(steps, args.repeats, device)
            saved = {}
            for key, f in paths.items():
                with SavedTensors() as tracker:
                    out = f()
                del out
                saved[key] = tracker.bytes
            print(f"{name:<10} {'LSA' if lsa else 'plain':<9} {seconds['written'] * 1e3:>10.1f}ms "
                  f"{seconds['sdpa'] * 1e3:>8.1f}ms {seconds['written'] / seconds['sdpa']:>8.2f}x "
                  f"{saved['written'] / MIB:>14.1f}MiB {saved['sdpa'] / MIB:>11.1f}MiB "
                  f"{saved['sdpa'] / saved['written']:>6.2f}")
            if device.type == "cuda" and not lsa:
                kernels.append((name, usable_sdpa_kernels(layer, x)))
    for name, usable in kernels:
        print(f"SDPA kernels usable by the plain {name} layer ({args.dtype}): {', '.join(usable) or 'none'}")


if __name__ == "__main__":
    main()
