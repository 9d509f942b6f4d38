"""The data pipeline: from files on disk to augmented training batches on the device.

- `datasets`: readers for CIFAR-10/100, SVHN, MNIST, Fashion-MNIST and image folders, in torchvision's layouts;
- `synthetic`: the built-in procedurally generated dataset;
- `loaders`: train / val / test loaders, splits, sharding, device-resident augmentation;
- `augment`: AutoAugment, RandAugment and random erasing on whole uint8 batches;
- `mix`: mixup and CutMix of training batches.

May import: torch, torchvision, the foundation. Never `models`, `train`, `inspect` or `tasks`.
"""
