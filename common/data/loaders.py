"""Train / val / test loaders from the `data:` config.

In-memory datasets (synthetic, CIFAR, SVHN, MNIST, Fashion-MNIST) are held as uint8 on the
training device; random crop, flip and normalisation run batched there, and
the shuffle is an on-device index permutation. That removes the input
pipeline from the critical path on GPUs (the trick behind fast CIFAR
training). Large datasets (imagefolder) go through a DataLoader with workers,
each rank reading its shard of the epoch's order.

Every random choice of an epoch (order, crop offsets, flips, policy ops,
erased boxes) is drawn from a generator seeded by (seed, epoch), and each
batch's erasing noise and mixing from one seeded by (seed, epoch, step), so a
run resumed mid-epoch sees exactly the batches the interrupted run would have
seen.

Training augmentation runs in this order: random crop and flip, the policy
(AutoAugment or RandAugment), normalisation, random erasing, then mixup or
CutMix of the whole batch (`common.data.mix`), which turns the labels into class
probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from common.config import AugmentConfig, DataConfig
from common.data import datasets, synthetic
from common.data.augment import BatchAugment, BatchErasing
from common.data.mix import MixedBatches
from common.errors import UserError

# Offsets keep the synthetic test set and each epoch's draws apart from other seeds.
_SYNTHETIC_TEST_SEED_OFFSET = 7919
_EPOCH_SEED_STRIDE = 1_000_003


class Loader(Protocol):
    """What the engine needs from a loader: a fixed number of batches per epoch, already on the device."""

    num_samples: int  # samples in the whole split, across all ranks

    def set_epoch(self, epoch: int, start_step: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataBundle:
    train: Loader
    val: Loader | None  # None when data.val_fraction is 0
    test: Loader
    num_classes: int
    classes: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) the model sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop after zero padding plus horizontal flip, for a whole uint8 batch at once.

    images: (B, C, H, W); offsets: (B, 2) crop corner (y, x) in [0, 2*padding];
    flips: (B,) bool. One gather does both: the flip reverses the column index.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = offsets[:, :1] + ar_h  # (B, H)
    cols = torch.where(flips[:, None], offsets[:, 1:] + (w - 1 - ar_w), offsets[:, 1:] + ar_w)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_order(n: int, repeats: int, generator: torch.Generator, mode: str = "in_batch") -> torch.Tensor:
    """The sample order of one training epoch.

    repeats 1: a permutation of range(n). mode "in_batch" (repeated augmentation, Hoffer et al. 2020):
    ceil(n / repeats) random samples, each `repeats` times in a row, n positions in all. mode "official":
    `repeats` independent permutations back to back, repeats * n positions: what the small-data ViT script's
    RASampler(len, batch, repetitions=1, len_factor=repeats) yields. Each pass shows every sample once, so a
    batch holds no sample twice unless it straddles two passes.
    """
    if mode == "official":
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(repeats)])
    if mode != "in_batch":
        raise ValueError(f"repeat mode must be 'in_batch' or 'official', got {mode!r}")
    order = torch.randperm(n, generator=generator)
    if repeats > 1:
        order = order[:-(-n // repeats)].repeat_interleave(repeats)[:n]
    return order


def _batch_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * _EPOCH_SEED_STRIDE + epoch) * _EPOCH_SEED_STRIDE + step


class DeviceLoader:
    """Batches of an in-memory uint8 dataset, shuffled and augmented on `device`.

    Each rank takes every `world`-th sample of the epoch's order (so the copies of a repeated sample land on
    different ranks). Training drops the incomplete last batch so all ranks take the same number of steps;
    evaluation keeps every sample exactly once across ranks.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 mean, std, train: bool, crop_padding: int = 0, hflip: bool = False, seed: int = 0,
                 rank: int = 0, world: int = 1, policy: BatchAugment | None = None,
                 erasing: BatchErasing | None = None, repeats: int = 1, repeat_mode: str = "in_batch"):
        self.images = images.permute(0, 3, 1, 2).contiguous().to(device)  # (N, C, H, W) uint8
        self.labels = labels.to(device)
        self.num_samples = len(labels)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.crop_padding = crop_padding if train else 0
        self.hflip = hflip and train
        self.policy, self.erasing = (policy, erasing) if train else (None, None)
        self.repeats, self.repeat_mode = (repeats, repeat_mode) if train else (1, "in_batch")
        self.seed, self.rank, self.world = seed, rank, world
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        n = self.num_samples
        self._epoch = epoch
        if self.train:
            # Draws are per position in the epoch's order, so repeated copies of a sample differ.
            g = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
            order = epoch_order(n, self.repeats, g, self.repeat_mode)
            length = len(order)  # n, or repeats * n with the official sampler
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (length, 2), generator=g)
            flips = torch.rand(length, generator=g) < 0.5
            positions = torch.arange(length - length % self.world)[self.rank::self.world]
            self._steps = len(positions) // self.batch_size
            if self._steps == 0:
                raise UserError(f"the training split has {n} samples, fewer than one batch per rank "
                                f"({self.batch_size} x {self.world}): lower train.batch_size")
            self._index = order[positions].to(self.device)
            self._offsets = offsets[positions].to(self.device)
            self._flips = (flips[positions] & self.hflip).to(self.device)
            if self.policy is not None:
                self._plan = self.policy.draw(length, g)[positions].to(self.device)
            if self.erasing is not None:
                self._boxes = self.erasing.draw(length, tuple(self.images.shape[-2:]), g)[positions].to(self.device)
        else:
            self._index = torch.arange(self.rank, n, self.world, device=self.device)
            self._steps = -(-len(self._index) // self.batch_size)
        self._start = start_step

    def __len__(self) -> int:
        return self._steps

    def __iter__(self):
        for step in range(self._start, self._steps):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            idx = self._index[sl]
            x = self.images[idx]
            if self.train and (self.crop_padding > 0 or self.hflip):
                x = augment_batch(x, self._offsets[sl], self._flips[sl], self.crop_padding)
            if self.policy is not None:
                x = self.policy(x, self._plan[sl])
            x = (x.float() - self.mean) / self.std
            if self.erasing is not None:
                noise = torch.Generator(self.device).manual_seed(_batch_seed(self.seed, self._epoch, step))
                x = self.erasing(x, self._boxes[sl], noise)
            yield x, self.labels[idx]
        self._start = 0


class _EpochSampler(torch.utils.data.Sampler):
    """This rank's indices for one epoch.

    Training: every `world`-th position of the epoch's order (`epoch_order`), the same number on every rank,
    optionally starting after the first `skip` samples (mid-epoch resume). Evaluation: every `world`-th
    index without padding, so each sample counts exactly once.
    """

    def __init__(self, n: int, train: bool, seed: int, rank: int, world: int, repeats: int = 1,
                 repeat_mode: str = "in_batch"):
        self.n, self.train, self.seed, self.rank, self.world, self.repeats = n, train, seed, rank, world, repeats
        self.repeat_mode = repeat_mode
        self.skip, self.indices = 0, list(range(rank, n, world))
        if train:
            self.set_epoch(0, 0)

    def set_epoch(self, epoch: int, skip: int) -> None:
        if self.train:
            g = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
            order = epoch_order(self.n, self.repeats, g, self.repeat_mode)
            self.indices = order[:len(order) - len(order) % self.world][self.rank::self.world].tolist()
            self.skip = skip

    def __iter__(self):
        return iter(self.indices[self.skip:])

    def __len__(self):
        return len(self.indices) - self.skip


class WorkerLoader:
    """A DataLoader with workers over a map-style dataset, batches moved to `device`."""

    def __init__(self, dataset, batch_size: int, device: torch.device, train: bool, num_workers: int,
                 seed: int, rank: int, world: int, repeats: int = 1, repeat_mode: str = "in_batch"):
        self.num_samples = len(dataset)
        self.batch_size, self.device = batch_size, device
        self.sampler = _EpochSampler(len(dataset), train, seed, rank, world, repeats if train else 1,
                                     repeat_mode if train else "in_batch")
        per_rank = len(self.sampler)
        self._steps = per_rank // batch_size if train else -(-per_rank // batch_size)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", drop_last=train,
                                 persistent_workers=num_workers > 0)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step * self.batch_size)

    def __len__(self) -> int:
        return self._steps

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.sampler.skip = 0


# Input shape and class count of each in-memory dataset, known without reading it (the `time` task needs them).
_SHAPES = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10),
           "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10)}


def input_spec(cfg: DataConfig) -> tuple[tuple[int, int, int], int | None]:
    """(C, H, W) the model sees and the number of classes (None when only the files would tell)."""
    if cfg.dataset == "synthetic":
        size = cfg.synthetic.image_size
        return (3, size, size), len(synthetic.CLASSES)
    if cfg.dataset == "imagefolder":
        return (3, cfg.image_size, cfg.image_size), None
    return _SHAPES[cfg.dataset]


def normalisation(cfg: DataConfig, stats: tuple | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the loaders normalise with: the config's, else the dataset's own.

    `stats` are the dataset's own when they had to be computed (the synthetic set). An image folder has no
    standard statistics, so its config must name them (configs/datasets/imagenet.yaml gives ImageNet's):
    no dataset silently takes another one's.
    """
    channels = input_spec(cfg)[0][0]
    for key in ("mean", "std"):
        value = getattr(cfg, key)
        if value is not None and len(value) != channels:
            raise UserError(f"data.{key} must list {channels} number{'s' * (channels > 1)} (one per channel of "
                            f"{cfg.dataset}), got {value}")
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    if stats is None and cfg.dataset in datasets.STATS:
        stats = datasets.STATS[cfg.dataset]
    if stats is None:
        raise UserError(f"data.dataset {cfg.dataset} has no standard statistics: set data.mean and data.std "
                        f"(per channel, in [0, 1] units), or base the config on configs/datasets/imagenet.yaml "
                        f"for ImageNet's")
    return tuple(cfg.mean or stats[0]), tuple(cfg.std or stats[1])


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed train/val split of `n` training samples; the same seed always holds out the same samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and (n_val == 0 or n_val == n):
        raise UserError(f"data.val_fraction={val_fraction} leaves an empty train or val split of {n} samples")
    return order[n_val:].sort().values, order[:n_val].sort().values


def balanced_subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """`data.train_subset`: indices of `size` samples, as equal a number per class as the classes allow.

    Drawn with the split seed (the same seed always keeps the same images); a class smaller than its share
    gives all it has and the others make up the difference. None keeps every sample.
    """
    n = len(labels)
    if size is None:
        return torch.arange(n)
    if size > n:
        raise UserError(f"data.train_subset ({size}) is larger than the training split ({n} images); "
                        f"lower it or remove it")
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    members = [(labels == c).nonzero().flatten() for c in classes]
    members = [m[torch.randperm(len(m), generator=g)] for m in members]
    quota = [0] * len(members)
    left = size
    # Water-filling: share what is left equally among the classes that still have images; the remainder
    # goes to classes picked at random.
    while left > 0:
        open_ = [i for i, m in enumerate(members) if len(m) > quota[i]]
        share, extra = divmod(left, len(open_))
        lucky = set(torch.tensor(open_)[torch.randperm(len(open_), generator=g)[:extra]].tolist())
        for i in open_:
            take = min(share + (i in lucky), len(members[i]) - quota[i])
            quota[i] += take
            left -= take
    return torch.cat([m[:q] for m, q in zip(members, quota)]).sort().values


def _per_rank_batch(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise UserError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    return batch_size // world


def _in_memory_arrays(cfg: DataConfig):
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        train = synthetic.generate(s.train_size, seed=s.seed, image_size=s.image_size, noise=s.noise)
        test = synthetic.generate(s.test_size, seed=s.seed + _SYNTHETIC_TEST_SEED_OFFSET,
                                  image_size=s.image_size, noise=s.noise)
        pixels = train[0].reshape(-1, 3).float() / 255
        stats = (tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist()))
        return train, test, list(synthetic.CLASSES), stats
    normalisation(cfg)  # a bad data.mean / data.std fails before the files are read
    train_x, train_y, classes = datasets.load_in_memory(cfg.dataset, cfg.root, train=True, download=cfg.download)
    test_x, test_y, _ = datasets.load_in_memory(cfg.dataset, cfg.root, train=False, download=cfg.download)
    return (train_x, train_y), (test_x, test_y), classes, None


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, device: torch.device, seed: int,
               rank: int = 0, world: int = 1) -> DataBundle:
    """Everything the engine needs to iterate over the configured dataset on this rank."""
    train_bs = _per_rank_batch(batch_size, world)
    eval_bs = max(1, eval_batch_size // world)
    if cfg.dataset == "imagefolder":
        return _build_imagefolder(cfg, train_bs, eval_bs, device, seed, rank, world)
    (train_x, train_y), (test_x, test_y), classes, stats = _in_memory_arrays(cfg)
    mean, std = normalisation(cfg, stats)
    # The subset is drawn before the validation split, so it is the data a data-efficiency study varies.
    keep = balanced_subset(train_y, cfg.train_subset, cfg.split_seed)
    train_x, train_y = train_x[keep], train_y[keep]
    train_idx, val_idx = split_indices(len(train_y), cfg.val_fraction, cfg.split_seed)
    aug = cfg.augment
    _, h, w, c = train_x.shape
    policy = None if aug.policy == "none" else BatchAugment(
        aug.policy, (h, w), autoaugment_policy=aug.autoaugment_policy, num_ops=aug.randaugment_ops,
        magnitude=aug.randaugment_magnitude)
    erasing = BatchErasing(aug.erase_prob, tuple(aug.erase_area), aug.erase_min_aspect, aug.erase_value,
                           aspect=aug.erase_aspect, attempts=aug.erase_attempts, mean=mean) \
        if aug.erase_prob > 0 else None

    def loader(x, y, train: bool):
        return DeviceLoader(x, y, train_bs if train else eval_bs, device, mean, std, train=train,
                            crop_padding=aug.crop_padding, hflip=aug.hflip, seed=seed, rank=rank, world=world,
                            policy=policy, erasing=erasing, repeats=aug.repeats, repeat_mode=aug.repeat_mode)

    val = loader(train_x[val_idx], train_y[val_idx], False) if len(val_idx) else None
    train = _mixed(loader(train_x[train_idx], train_y[train_idx], True), aug, len(classes), seed)
    return DataBundle(train=train, val=val, test=loader(test_x, test_y, False), num_classes=len(classes),
                      classes=classes, input_size=(c, h, w), mean=mean, std=std)


def _mixed(train: Loader, aug: AugmentConfig, num_classes: int, seed: int) -> Loader:
    """The training loader, wrapped in mixup / CutMix when the config turns either on."""
    if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
        return train
    return MixedBatches(train, num_classes, aug.mixup_alpha, aug.cutmix_alpha, prob=aug.mix_prob,
                        switch_prob=aug.mix_switch_prob, seed=seed, partners=aug.mix_partners)


def _build_imagefolder(cfg: DataConfig, train_bs: int, eval_bs: int, device, seed: int, rank: int,
                       world: int) -> DataBundle:
    mean, std = normalisation(cfg)
    aug = cfg.augment

    def transform(train: bool):
        return datasets.imagefolder_transform(train, cfg.image_size, mean, std,
                                              random_resized_crop=aug.random_resized_crop, hflip=aug.hflip,
                                              augment=aug)

    train_all = datasets.imagefolder_dataset(cfg.root, train=True, transform=transform(True))
    keep = balanced_subset(torch.tensor(train_all.targets), cfg.train_subset, cfg.split_seed)
    train_idx, val_idx = split_indices(len(keep), cfg.val_fraction, cfg.split_seed)
    train_idx, val_idx = keep[train_idx], keep[val_idx]

    def loader(dataset, train: bool):
        return WorkerLoader(dataset, train_bs if train else eval_bs, device, train, cfg.num_workers, seed, rank,
                            world, repeats=aug.repeats, repeat_mode=aug.repeat_mode)

    val = None
    if len(val_idx):
        val_all = datasets.imagefolder_dataset(cfg.root, train=True, transform=transform(False))
        val = loader(Subset(val_all, val_idx.tolist()), False)
    test = datasets.imagefolder_dataset(cfg.root, train=False, transform=transform(False))
    classes = list(train_all.classes)
    train = _mixed(loader(Subset(train_all, train_idx.tolist()), True), aug, len(classes), seed)
    return DataBundle(train=train, val=val, test=loader(test, False),
                      num_classes=len(classes), classes=classes, input_size=(3, cfg.image_size, cfg.image_size),
                      mean=mean, std=std)
