"""Draw sa_conv/theorem1.png: how far conv_as_attention(conv, alpha) is from conv, as alpha grows.

    python -m sa_conv.theorem1_figure [--out sa_conv/theorem1.png]

Random convs (8 -> 8 channels, K = 3 and 5, zero padding K // 2) on a random 16 x 20 input, float64 and
float32; the error is max |attention(x) - conv(x)| / max |conv(x)|. It falls like exp(-alpha) (the weight
left on the next-nearest pixel) until it reaches the dtype's round-off. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sa_conv.theorem1 import conv_as_attention, relative_error

ALPHAS = [2 ** (i / 2) for i in range(-2, 13)]  # 0.5 ... 64
DEFAULT_OUT = Path(__file__).resolve().parent / "theorem1.png"


def errors(kernel_size: int, dtype: torch.dtype, alphas=ALPHAS, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, 8, kernel_size, padding=kernel_size // 2).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=dtype))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=dtype))
    x = torch.randn(2, 8, 16, 20, generator=gen, dtype=dtype)
    return [relative_error(conv, conv_as_attention(conv, alpha), x) for alpha in alphas]


def draw(out: Path = DEFAULT_OUT) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for kernel_size, colour in ((3, "tab:blue"), (5, "tab:orange")):
        for dtype, style in ((torch.float64, "-o"), (torch.float32, "--s")):
            err = [max(e, 1e-17) for e in errors(kernel_size, dtype)]  # exact zeros would vanish on a log axis
            name = str(dtype).removeprefix("torch.")
            ax.semilogy(ALPHAS, err, style, color=colour, markersize=3.5,
                        label=f"{kernel_size}x{kernel_size} conv, {kernel_size ** 2} heads, {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("alpha (sharpness of every head's Gaussian)")
    ax.set_ylabel("max |MHSA(x) - conv(x)| / max |conv(x)|")
    ax.set_title("Theorem 1: quadratic-encoding attention tends to the conv", fontsize=10)
    ax.grid(which="major", alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(f"wrote {draw(parser.parse_args().out)}")


if __name__ == "__main__":
    main()
