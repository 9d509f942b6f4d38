"""Input-pipeline throughput: the device-resident loader against a torchvision DataLoader, in one run.

    python bench/data_loader.py [--n 10000] [--batch 256] [--device cpu|cuda] [--augment basic|strong]

Both pipelines do the same work on CIFAR-shaped uint8 data: random crop with 4-pixel
zero padding, horizontal flip, normalisation, batching; with `--augment strong` also the
ViT recipe's AutoAugment (CIFAR-10 policy) and random erasing (p 0.25). The DataLoader is
the usual PIL + torchvision.transforms path. Prints images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data.augment import BatchAugment, BatchErasing  # noqa: E402
from common.data.loaders import DeviceLoader  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


class PilDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, strong: bool):
        self.images, self.labels = images.numpy(), labels
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        if strong:
            steps.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10))
        steps += [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        if strong:
            steps.append(transforms.RandomErasing(0.25, value=0))
        self.transform = transforms.Compose(steps)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def images_per_second(loader, device: torch.device, epochs: int = 2) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    seen = 0
    for x, _ in loader:  # warm-up epoch (worker start-up, allocator)
        break
    sync()
    start = time.perf_counter()
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            seen += len(y)
    sync()
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--augment", choices=("basic", "strong"), default="basic")
    args = parser.parse_args()
    strong = args.augment == "strong"
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.n,), generator=g)

    policy = BatchAugment("autoaugment", (32, 32), autoaugment_policy="cifar10") if strong else None
    erasing = BatchErasing(0.25, value="zero") if strong else None
    device_loader = DeviceLoader(images, labels, args.batch, device, MEAN, STD, train=True, crop_padding=4,
                                 hflip=True, policy=policy, erasing=erasing)
    torch_loader = DataLoader(PilDataset(images, labels, strong), batch_size=args.batch, shuffle=True,
                              drop_last=True, num_workers=args.workers, persistent_workers=args.workers > 0,
                              pin_memory=device.type == "cuda")
    fast = images_per_second(device_loader, device)
    slow = images_per_second(torch_loader, device)
    print(f"device: {device} ({torch.get_num_threads()} threads), {args.n} images, batch {args.batch}")
    work = "crop+flip+AutoAugment+normalise+erasing" if strong else "crop+flip+normalise"
    print(f"DeviceLoader ({work} on {device.type}): {fast:,.0f} img/s")
    print(f"DataLoader ({args.workers} workers, PIL + torchvision transforms): {slow:,.0f} img/s")
    print(f"ratio: {fast / slow:.1f}x")


if __name__ == "__main__":
    main()
