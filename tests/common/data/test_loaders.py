"""The loaders users train with: device-side augmentation, splits, sharding, real on-disk formats."""

from __future__ import annotations

import pytest
import torch

from common.config import AugmentConfig, DataConfig, SyntheticConfig
from common.data.loaders import DeviceLoader, augment_batch, balanced_subset, build_data, split_indices
from common.errors import UserError
from tests.common.data.dataset_writers import write_cifar10, write_fashion_mnist, write_imagefolder, write_mnist

CPU = torch.device("cpu")


def reference_augment(image: torch.Tensor, offset, flip: bool, padding: int) -> torch.Tensor:
    """One image at a time, the obvious way: zero-pad, crop, mirror."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    y, x = int(offset[0]), int(offset[1])
    crop = padded[:, y:y + image.shape[1], x:x + image.shape[2]]
    return crop.flip(-1) if flip else crop


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_batched_crop_and_flip_equal_the_per_image_version(padding):
    g = torch.Generator().manual_seed(padding)
    images = torch.randint(0, 256, (16, 3, 9, 7), dtype=torch.uint8, generator=g)  # non-square on purpose
    offsets = torch.randint(0, 2 * padding + 1, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    out = augment_batch(images, offsets, flips, padding)
    expected = torch.stack([reference_augment(images[i], offsets[i], bool(flips[i]), padding) for i in range(16)])
    assert out.dtype == torch.uint8 and torch.equal(out, expected)


def make_loader(n=50, train=True, rank=0, world=1, seed=0, batch=8):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 4, 4, 3).contiguous()
    labels = torch.arange(n)
    return DeviceLoader(images, labels, batch, CPU, mean=(0, 0, 0), std=(1 / 255,) * 3, train=train,
                        crop_padding=0, hflip=False, seed=seed, rank=rank, world=world)


def epoch_labels(loader):
    return torch.cat([y for _, y in loader])


def test_device_loader_shuffles_per_epoch_deterministically_and_normalises():
    loader = make_loader()
    loader.set_epoch(0)
    first = epoch_labels(loader)
    assert len(loader) == 50 // 8 and len(first) == 48  # incomplete batch dropped in training
    assert len(set(first.tolist())) == 48
    loader.set_epoch(1)
    assert not torch.equal(epoch_labels(loader), first)
    loader.set_epoch(0)
    x, y = next(iter(loader))
    assert torch.equal(x[:, 0, 0, 0], y.float())  # pixel value == index, normalised with std 1/255
    assert torch.equal(epoch_labels(loader), first)  # a fresh pass repeats the epoch


def test_mid_epoch_start_skips_exactly_the_done_steps():
    loader = make_loader()
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(3, start_step=2)
    rest = list(loader)
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rest, full[2:]))


def test_ranks_take_disjoint_equal_shards():
    shards = []
    for rank in range(3):
        loader = make_loader(n=50, rank=rank, world=3, batch=4)
        loader.set_epoch(5)
        shards.append(epoch_labels(loader))
    assert len({len(s) for s in shards}) == 1
    together = torch.cat(shards)
    assert len(set(together.tolist())) == len(together)


def test_eval_loader_covers_every_sample_once_across_ranks():
    seen = torch.cat([epoch_labels(make_loader(n=23, train=False, rank=r, world=2, batch=4)) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(23))


def test_validation_split_is_fixed_by_its_seed_and_disjoint():
    train_a, val_a = split_indices(100, 0.1, seed=3)
    train_b, val_b = split_indices(100, 0.1, seed=3)
    assert torch.equal(val_a, val_b) and len(val_a) == 10 and len(train_a) == 90
    assert not set(train_a.tolist()) & set(val_a.tolist())
    assert not torch.equal(split_indices(100, 0.1, seed=4)[1], val_a)
    train, val = split_indices(100, 0.0, seed=0)
    assert len(train) == 100 and len(val) == 0


def test_synthetic_bundle():
    cfg = DataConfig(synthetic=SyntheticConfig(train_size=100, test_size=40, image_size=16), val_fraction=0.2)
    data = build_data(cfg, batch_size=10, eval_batch_size=16, device=CPU, seed=0)
    assert data.num_classes == 10 and data.input_size == (3, 16, 16)
    assert data.train.num_samples == 80 and data.val.num_samples == 20 and data.test.num_samples == 40
    x, y = next(iter(data.train))
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar10_on_disk_goes_through_the_user_path(tmp_path):
    written = write_cifar10(tmp_path, n_train=60, n_test=20)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.25,
                     augment=AugmentConfig(crop_padding=0, hflip=False))
    data = build_data(cfg, batch_size=15, eval_batch_size=100, device=CPU, seed=0)
    assert data.classes == written.classes and data.num_classes == 10
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (45, 15, 20)
    x, y = next(iter(data.test))
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    pixels = torch.from_numpy(written.test_images).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(x, (pixels - mean) / std, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(written.test_labels))


@pytest.mark.parametrize("name, writer, stats", [("mnist", write_mnist, ((0.1307,), (0.3081,))),
                                                  ("fashion_mnist", write_fashion_mnist, ((0.2860,), (0.3530,)))])
def test_greyscale_datasets_have_one_channel_and_their_own_statistics(tmp_path, name, writer, stats):
    written = writer(tmp_path, n_train=20, n_test=10)
    data = build_data(DataConfig(dataset=name, root=str(tmp_path), val_fraction=0.0), 5, 10, CPU, seed=0)
    assert data.val is None and data.input_size == (1, 28, 28) and (data.mean, data.std) == stats
    x, _ = next(iter(data.test))
    pixels = torch.from_numpy(written.test_images).permute(0, 3, 1, 2).float() / 255
    assert x.shape == (10, 1, 28, 28) and torch.allclose(x, (pixels - stats[0][0]) / stats[1][0], atol=1e-5)


def test_statistics_must_fit_the_channels(tmp_path):
    write_mnist(tmp_path, n_train=20, n_test=10)
    cfg = DataConfig(dataset="mnist", root=str(tmp_path), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    with pytest.raises(UserError, match=r"data.mean must list 1 number \(one per channel of mnist\)"):
        build_data(cfg, 5, 10, CPU, seed=0)


def test_an_image_folder_needs_its_statistics_named(tmp_path):
    write_imagefolder(tmp_path, ["cat", "dog"], per_class=2, size=12)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, num_workers=0)
    with pytest.raises(UserError, match="set data.mean and data.std .* configs/datasets/imagenet.yaml"):
        build_data(cfg, 2, 2, CPU, seed=0)


def test_balanced_subset_takes_equal_shares_and_fills_from_larger_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 12)
    keep = balanced_subset(labels, 30, seed=3)
    assert len(keep) == len(set(keep.tolist())) == 30
    assert torch.bincount(labels[keep]).tolist() == [10, 10, 10]
    keep = balanced_subset(labels, 50, seed=3)  # class 2 has 12 < 50 / 3: the other two make up the rest
    assert torch.bincount(labels[keep]).tolist() == [19, 19, 12]
    odd = torch.bincount(labels[balanced_subset(labels, 31, seed=3)]).tolist()
    assert sorted(odd) == [10, 10, 11]
    assert torch.equal(balanced_subset(labels, 30, seed=3), balanced_subset(labels, 30, seed=3))
    assert not torch.equal(balanced_subset(labels, 30, seed=3), balanced_subset(labels, 30, seed=4))
    assert torch.equal(balanced_subset(labels, None, seed=3), torch.arange(len(labels)))
    with pytest.raises(UserError, match=r"data.train_subset \(93\) is larger than the training split \(92"):
        balanced_subset(labels, 93, seed=0)


def test_train_subset_is_drawn_before_the_validation_split():
    synthetic = SyntheticConfig(train_size=200, test_size=20, image_size=16)
    data = build_data(DataConfig(synthetic=synthetic, train_subset=60, val_fraction=0.25), 5, 10, CPU, seed=0)
    assert (data.train.num_samples, data.val.num_samples, data.test.num_samples) == (45, 15, 20)
    labels = torch.cat([data.train.labels, data.val.labels])
    assert torch.bincount(labels, minlength=10).tolist() == [6] * 10


def test_imagefolder_train_subset(tmp_path):
    write_imagefolder(tmp_path, ["a", "b", "c"], per_class=4, size=12)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.0, num_workers=0,
                     train_subset=6, mean=[0.5] * 3, std=[0.25] * 3)
    data = build_data(cfg, batch_size=2, eval_batch_size=4, device=CPU, seed=0)
    assert data.train.num_samples == 6


def test_imagefolder_uses_a_worker_dataloader(tmp_path):
    write_imagefolder(tmp_path, ["cat", "dog"], per_class=4, size=20)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25, num_workers=0,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    data = build_data(cfg, batch_size=2, eval_batch_size=4, device=CPU, seed=0)
    assert data.classes == ["cat", "dog"] and data.input_size == (3, 16, 16)
    assert (data.train.num_samples, data.val.num_samples) == (6, 2)
    data.train.set_epoch(0)
    batches = list(data.train)
    assert len(batches) == len(data.train) == 3 and batches[0][0].shape == (2, 3, 16, 16)
    data.train.set_epoch(0, start_step=1)
    assert len(list(data.train)) == 2


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), 8, 8, CPU, seed=0)


def test_batch_must_split_evenly_across_ranks():
    cfg = DataConfig(synthetic=SyntheticConfig(train_size=40, test_size=20, image_size=16))
    with pytest.raises(UserError, match="divisible by the number of processes"):
        build_data(cfg, batch_size=9, eval_batch_size=8, device=CPU, seed=0, rank=0, world=2)


def test_imagefolder_eval_shards_count_every_image_once(tmp_path):
    write_imagefolder(tmp_path, ["a", "b", "c"], per_class=3, size=12)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.0, num_workers=0,
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    seen = []
    for rank in range(2):
        data = build_data(cfg, batch_size=2, eval_batch_size=4, device=CPU, seed=0, rank=rank, world=2)
        seen += torch.cat([y for _, y in data.test]).tolist()
    assert sorted(seen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 9 images over 2 ranks: none padded or dropped


def recipe_config(**augment) -> DataConfig:
    """Synthetic data with the ViT recipe's strong augmentation (see configs/vit/recipe.yaml)."""
    options = dict(policy="autoaugment", erase_prob=0.5, erase_value="random", repeats=3, mixup_alpha=1.0,
                   cutmix_alpha=1.0, mix_prob=0.5)
    options.update(augment)
    return DataConfig(synthetic=SyntheticConfig(train_size=120, test_size=20, image_size=16), val_fraction=0.0,
                      augment=AugmentConfig(**options))


def test_repeated_augmentation_shows_each_drawn_sample_repeats_times_in_a_row():
    from common.data.loaders import epoch_order

    order = epoch_order(10, 3, torch.Generator().manual_seed(0))
    assert len(order) == 10 and len(set(order.tolist())) == 4  # ceil(10 / 3) samples, cut to 10 positions
    assert all(order[i] == order[i - i % 3] for i in range(10))
    assert torch.equal(epoch_order(7, 1, torch.Generator().manual_seed(1)).sort().values, torch.arange(7))
    data = build_data(recipe_config(policy="randaugment", mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0),
                      batch_size=12, eval_batch_size=16, device=CPU, seed=0)
    data.train.set_epoch(0)
    x, y = next(iter(data.train))
    assert torch.equal(y[0::3], y[1::3]) and torch.equal(y[0::3], y[2::3])
    assert not torch.equal(x[0], x[1])  # the copies of a sample are augmented independently


def test_strong_augmentation_and_mixing_resume_mid_epoch_exactly():
    data = build_data(recipe_config(), batch_size=12, eval_batch_size=16, device=CPU, seed=4)
    data.train.set_epoch(2)
    full = list(data.train)
    data.train.set_epoch(2, start_step=4)
    rest = list(data.train)
    assert len(rest) == len(full) - 4 > 0
    for (xa, ya), (xb, yb) in zip(full[4:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, target = full[0]
    assert target.shape == (12, 10) and torch.allclose(target.sum(1), torch.ones(12))
    assert any(t.max() < 1 for _, t in full for t in t)  # some batches were mixed
    data.train.set_epoch(3)
    assert not torch.equal(next(iter(data.train))[0], x)


def test_evaluation_is_never_augmented_or_mixed():
    plain = build_data(recipe_config(policy="none", erase_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0),
                       batch_size=12, eval_batch_size=16, device=CPU, seed=0)
    strong = build_data(recipe_config(), batch_size=12, eval_batch_size=16, device=CPU, seed=0)
    for a, b in zip(plain.test, strong.test):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].ndim == 1


def test_imagefolder_takes_the_same_recipe_through_torchvision(tmp_path):
    write_imagefolder(tmp_path, ["cat", "dog"], per_class=6, size=20)
    augment = AugmentConfig(policy="randaugment", erase_prob=1.0, erase_value="zero", repeats=2,
                            cutmix_alpha=1.0)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.0, num_workers=0,
                     augment=augment, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    data = build_data(cfg, batch_size=4, eval_batch_size=4, device=CPU, seed=0)
    names = [type(t).__name__ for t in data.train.loader.loader.dataset.dataset.transform.transforms]
    assert names[-4:] == ["RandAugment", "ToTensor", "Normalize", "RandomErasing"]
    data.train.set_epoch(0)
    order = data.train.loader.sampler.indices
    assert all(order[i] == order[i - i % 2] for i in range(len(order)))  # repeated augmentation, pairs
    x, target = next(iter(data.train))
    assert x.shape == (4, 3, 16, 16) and target.shape == (4, 2)
    assert (x == 0).any()  # the erased boxes


def test_official_repeat_mode_is_repeats_fresh_passes_back_to_back():
    """The small-data ViT script's RASampler(len, batch, repetitions=1, len_factor=3): an epoch of 3 passes."""
    from common.data.loaders import epoch_order

    order = epoch_order(10, 3, torch.Generator().manual_seed(0), "official")
    assert len(order) == 30
    passes = order.view(3, 10)
    assert all(torch.equal(p.sort().values, torch.arange(10)) for p in passes)  # each pass shows every sample once
    assert not torch.equal(passes[0], passes[1])  # fresh permutations
    assert torch.equal(epoch_order(10, 1, torch.Generator().manual_seed(3), "official"),
                       epoch_order(10, 1, torch.Generator().manual_seed(3)))  # repeats 1: a plain permutation
    with pytest.raises(ValueError, match="repeat mode"):
        epoch_order(10, 3, torch.Generator(), "batched")


def official_loader(n, batch, repeats=3, rank=0, world=1, seed=0):
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 2, 2, 3).to(torch.uint8).contiguous()
    return DeviceLoader(images, torch.arange(n), batch, CPU, mean=(0, 0, 0), std=(1,) * 3, train=True,
                        seed=seed, rank=rank, world=world, repeats=repeats, repeat_mode="official")


def test_official_repeat_mode_epochs_are_three_times_longer_without_duplicates_in_a_batch():
    loader = official_loader(n=200, batch=16)
    assert len(loader) == 3 * 200 // 16 == 37  # in_batch would keep 200 // 16 = 12
    for epoch in range(3):
        loader.set_epoch(epoch)
        labels = [y for _, y in loader]
        for step, y in enumerate(labels):
            first, last = step * 16, (step + 1) * 16 - 1
            if first // 200 == last // 200:  # a batch inside one pass holds no image twice
                assert len(set(y.tolist())) == 16
        shown = torch.cat(labels).bincount(minlength=200)
        # 592 of the 600 positions (the incomplete last batch is dropped): twice or three times each, never more
        assert shown.sum() == 37 * 16 and shown.min() == 2 and shown.max() == 3 and (shown == 2).sum() == 8
    loader.set_epoch(1)
    full = [y for _, y in loader]
    loader.set_epoch(1, start_step=20)
    assert all(torch.equal(a, b) for a, b in zip(full[20:], [y for _, y in loader]))  # mid-epoch resume


def test_official_repeat_mode_shards_the_longer_epoch_across_ranks():
    shards = [official_loader(n=60, batch=5, rank=r, world=2) for r in range(2)]
    for s in shards:
        s.set_epoch(0)
    assert [len(s) for s in shards] == [18, 18]  # 180 positions, 90 per rank
    seen = torch.cat([torch.cat([y for _, y in s]) for s in shards])
    assert torch.equal(seen.bincount(minlength=60), torch.full((60,), 3))


def test_official_repeat_mode_through_the_config_and_the_worker_loader(tmp_path):
    data = build_data(recipe_config(repeat_mode="official", policy="none", erase_prob=0.0, mixup_alpha=0.0,
                                    cutmix_alpha=0.0), batch_size=12, eval_batch_size=16, device=CPU, seed=0)
    assert len(data.train) == 3 * 120 // 12
    write_imagefolder(tmp_path, ["cat", "dog"], per_class=6, size=20)
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.0, num_workers=0,
                     mean=[0.5] * 3, std=[0.25] * 3, augment=AugmentConfig(repeats=3, repeat_mode="official"))
    folder = build_data(cfg, batch_size=4, eval_batch_size=4, device=CPU, seed=0)
    folder.train.set_epoch(0)
    order = folder.train.loader.sampler.indices
    assert len(order) == 36 and len(folder.train) == 9
    assert all(sorted(order[i:i + 12]) == list(range(12)) for i in (0, 12, 24))


def test_imagefolder_erasing_takes_the_raw_mean_and_refuses_what_torchvision_cannot_draw(tmp_path):
    write_imagefolder(tmp_path, ["cat", "dog"], per_class=4, size=20)

    def folder(**augment):
        cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.0, num_workers=0,
                         mean=[0.1, 0.2, 0.3], std=[0.25] * 3, augment=AugmentConfig(erase_prob=1.0, **augment))
        return build_data(cfg, batch_size=4, eval_batch_size=4, device=CPU, seed=0)

    erasing = folder(erase_value="unnormalized_mean").train.loader.dataset.dataset.transform.transforms[-1]
    assert type(erasing).__name__ == "RandomErasing" and erasing.value == (0.1, 0.2, 0.3)
    with pytest.raises(UserError, match="erase_aspect"):
        folder(erase_aspect="uniform")
