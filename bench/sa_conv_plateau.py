"""Why the paper's Gaussian-attention network stays at chance on the built-in dataset (README, "Quickstart").

    python bench/sa_conv_plateau.py [--steps 600]

On one thread, deterministic (seed 0), about 3 minutes of CPU (174 s user + sys, measured). Prints:

1. the colour symmetry of the data: the between-class spread of the class-mean images against its sampling
   error, and linear probes (validation accuracy) on the pixels and on |image gradient|;
2. linear probes on the paper network's mean-pooled features at init, and on the mean of their squares;
3. short trainings (AdamW 3e-3, batch 32, 100-step warmup, flips) of the paper's network (`sa_quadratic`:
   2 layers, 9 heads, hidden 64) on the dataset as it is, with every image white on black, and with white on
   black or black on white at random; and of the same Gaussian heads as the mixers of the quickstart's
   ResNet body (configs/quickstart/sa_conv.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sa_conv  # noqa: E402,F401  (registers the models and the mixer)
from common.data import synthetic  # noqa: E402
from common.registry import create_model  # noqa: E402


def images(n: int, seed: int, colours=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (N, 3, 16, 16) images and labels; `colours(n, gen) -> (fg, bg)` replaces the random colours."""
    with mock.patch.object(synthetic, "_contrasting_colours", colours or synthetic._contrasting_colours):
        x, y = synthetic.generate(n, seed=seed, image_size=16)
    x = x.permute(0, 3, 1, 2).float() / 255
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True), y


def probe(features: torch.Tensor, labels: torch.Tensor, train: int) -> float:
    """Validation accuracy of an L2-regularised logistic regression fitted by L-BFGS on the first `train` rows."""
    f = (features - features.mean(0)) / (features.std(0) + 1e-6)
    w = torch.zeros(f.shape[1], 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(f[:train] @ w + b, labels[:train]) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((f[train:] @ w + b).argmax(1) == labels[train:]).float().mean().item()


def paper_network():
    return create_model("sa_quadratic", layers=2, heads=9, hidden=64, intermediate=128, image_size=16,
                        dropout=0.0, attention_dropout=0.0)


def quickstart_network():
    return create_model("resnet", block="basic", layers=[1, 1, 1], widths=[16, 32, 64], stem="cifar",
                        stem_width=16, mixer=["conv", "gaussian", "gaussian"],
                        mixer_kwargs=[{}, {"heads": 9}, {"heads": 9}], downsample="avgpool")


def train(model, colours, steps: int) -> list[tuple[int, float]]:
    """(step, validation accuracy) every 100 steps."""
    x, y = images(10000, 0, colours)
    xv, yv = images(1000, 99, colours)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (32,), generator=gen)
        xb = x[idx]
        flip = torch.rand(32, generator=gen) < 0.5
        xb[flip] = xb[flip].flip(-1)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, step / 100)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                curve.append((step, (model(xv).argmax(1) == yv).float().mean().item()))
            model.train()
    return curve


def white_on_black(n, gen):
    return torch.ones(n, 3), torch.zeros(n, 3)


def random_sign(n, gen):
    fg = (torch.rand(n, 1, generator=gen) < 0.5).float().expand(n, 3)
    return fg, 1 - fg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    x, y = images(10000, 0)
    flat = x.flatten(1)
    class_means = torch.stack([flat[y == c].mean(0) for c in range(10)])
    print(f"class-mean images: between-class std {class_means.std(0).mean():.3f} per pixel, "
          f"sampling error {(1 / (y == 0).sum()) ** 0.5:.3f}")
    grad = torch.cat([(x[:, :, 1:] - x[:, :, :-1]).abs().mean(1).flatten(1),
                      (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(1).flatten(1)], 1)
    print(f"linear probe, pixels: {probe(flat, y, 8000):.1%}; |image gradient|: {probe(grad, y, 8000):.1%}")

    model = paper_network().eval()
    tokens = {}
    model.layers[-1].register_forward_hook(lambda m, i, o: tokens.__setitem__("last", o))
    with torch.no_grad():
        model(x[:4000])
    print(f"paper network at init, linear probe on mean-pooled features: {probe(tokens['last'].mean((1, 2)), y[:4000], 3000):.1%}"
          f"; on the mean of their squares: {probe(tokens['last'].pow(2).mean((1, 2)), y[:4000], 3000):.1%}")

    runs = [("paper network, the dataset's colours", paper_network, None),
            ("paper network, white on black", paper_network, white_on_black),
            ("paper network, white on black or black on white", paper_network, random_sign),
            ("Gaussian heads in the ResNet body (quickstart)", quickstart_network, None)]
    for name, build, colours in runs:
        torch.manual_seed(0)
        curve = train(build(), colours, args.steps)
        print(f"{name}: validation accuracy " + ", ".join(f"{acc:.0%} @ {step}" for step, acc in curve), flush=True)


if __name__ == "__main__":
    main()
