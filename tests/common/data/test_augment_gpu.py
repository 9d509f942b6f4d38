"""The device-side input pipeline on CUDA: crop and flip, AutoAugment / RandAugment, random erasing, mixup and
CutMix, and whole DeviceLoader epochs give the pixels and targets the CPU gives (and torchvision's ops).

Marked `gpu`: `pytest -m gpu` (and bench/gpu_check.py) runs them on a GPU; without one they are skipped, and
GPU_TESTS_ON_CPU=1 dry-runs them on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from common.data.augment import OP_ID, OPS, BatchAugment, BatchErasing, magnitude_values
from common.data.loaders import DeviceLoader, augment_batch
from common.data.mix import MixedBatches
from tests.common.data.test_augment import BLENDS, SIGNED, SIZE, random_images, reference_plan, single_op_plan
from tests.common.data.test_mix import FixedBatches

pytestmark = pytest.mark.gpu
CPU = torch.device("cpu")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def assert_close_to_reference(out: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Exact, except where the device's float arithmetic may round differently from the CPU's: blends (float32
    multiply-add truncated to uint8) by one grey level on a few pixels, and the warps (nearest-neighbour sampling
    at coordinates computed in another summation order) on a tie now and then."""
    assert out.dtype == torch.uint8 and out.shape == expected.shape
    differ = out != expected
    if name in BLENDS:
        assert (out.int() - expected.int()).abs().max() <= 1 and differ.float().mean() <= 0.03, name
    elif name in GEOMETRIC:
        assert differ.float().mean() <= 0.01, name
    else:
        assert not differ.any(), name


def test_crop_and_flip_equal_the_cpu(gpu_device):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 9, 7), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 9, (64, 2), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    out = augment_batch(images.to(gpu_device), offsets.to(gpu_device), flips.to(gpu_device), 4)
    assert out.device.type == gpu_device.type
    assert torch.equal(out.cpu(), augment_batch(images, offsets, flips, 4))


@pytest.mark.parametrize("name", OPS)
def test_each_op_equals_torchvision(gpu_device, name):
    """Per-sample magnitudes (the bins' extremes and middle, both signs), as tests/common/data/test_augment.py
    checks on the CPU; blends may round a few pixels one grey level apart."""
    values = magnitude_values(31, *SIZE)[OP_ID[name]][[0, 9, 30, 17]].tolist()
    if name in SIGNED:
        values = values + [-v for v in values]
    images = random_images(len(values))
    plan = single_op_plan(name, values)
    out = BatchAugment("randaugment", SIZE, num_ops=1)(images.to(gpu_device), plan.to(gpu_device))
    assert out.device.type == gpu_device.type
    assert_close_to_reference(out.cpu(), reference_plan(images, plan), name)


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_drawn_plans_equal_the_cpu(gpu_device, policy):
    augment = BatchAugment(policy, SIZE, num_ops=3)
    images = random_images(96)
    plan = augment.draw(96, torch.Generator().manual_seed(1))
    on_device = augment(images.to(gpu_device), plan.to(gpu_device)).cpu()
    on_cpu = augment(images, plan)
    differ = on_device != on_cpu
    # Only blends and warps may round differently (see assert_close_to_reference), and a chained op can carry
    # that further; a sample whose plan has neither must come out identical.
    inexact = torch.tensor([OP_ID[name] for name in BLENDS + GEOMETRIC], dtype=plan.dtype)
    may_differ = torch.isin(plan[:, :, 0], inexact).any(dim=1)
    assert (~may_differ).sum() > 0 and not differ[~may_differ].any()
    assert differ.float().mean() <= 0.03


def test_erasing_fills_the_same_boxes_as_on_the_cpu(gpu_device):
    n = 64
    for value in ("zero", "random"):
        erasing = BatchErasing(1.0, value=value)
        boxes = erasing.draw(n, SIZE, torch.Generator().manual_seed(0))
        x = torch.full((n, 3) + SIZE, 100.0)
        noise = torch.Generator(gpu_device).manual_seed(0) if value == "random" else None
        out = erasing(x.to(gpu_device), boxes.to(gpu_device), noise).cpu()
        expected = erasing(x, boxes, torch.Generator().manual_seed(0))
        inside = expected != 100.0
        assert torch.equal(out != 100.0, inside)  # the same pixels erased
        if value == "zero":
            assert torch.equal(out, expected)
        else:  # the noise comes from the device's generator: standard normal, not the CPU's numbers
            fill = out[inside]
            assert abs(fill.mean()) < 0.05 and abs(fill.std() - 1) < 0.05


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def test_mixup_and_cutmix_equal_the_cpu(gpu_device):
    on_device = MixedBatches(FixedBatches(steps=40, device=gpu_device), 5, 0.8, 1.0, prob=0.9, seed=3)
    on_cpu = MixedBatches(FixedBatches(steps=40), 5, 0.8, 1.0, prob=0.9, seed=3)
    for (x, target), (x_cpu, target_cpu) in zip(_epoch(on_device), _epoch(on_cpu)):
        assert x.device.type == gpu_device.type and target.device.type == gpu_device.type
        torch.testing.assert_close(x.cpu(), x_cpu, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(target.cpu(), target_cpu, atol=1e-7, rtol=1e-6)
        assert torch.allclose(target.sum(1).cpu(), torch.ones(len(target)))


def _strong_loader(device, train=True):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (200,) + SIZE + (3,), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    policy = BatchAugment("autoaugment", SIZE, autoaugment_policy="cifar10")
    return DeviceLoader(images, labels, 32, device, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), train=train,
                        crop_padding=4, hflip=True, seed=7, policy=policy, erasing=BatchErasing(0.5, value="zero"),
                        repeats=2)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_device_loader_epochs_equal_the_cpu(gpu_device, train):
    """Order, crop, flip, AutoAugment, normalisation and erasing: the batches a GPU run trains on are the CPU's,
    so a run moved between devices (or resumed on another) sees the same data."""
    gpu_batches = _epoch(_strong_loader(gpu_device, train), epoch=2)
    cpu_batches = _epoch(_strong_loader(CPU, train), epoch=2)
    assert len(gpu_batches) == len(cpu_batches) > 0
    for (x, y), (x_cpu, y_cpu) in zip(gpu_batches, cpu_batches):
        assert x.device.type == gpu_device.type and x.dtype == torch.float32
        assert torch.equal(y.cpu(), y_cpu)
        # Normalisation may differ in the last bit; AutoAugment's blends and warps on a few pixels (see
        # assert_close_to_reference); anything else (order, crop, flip, erased boxes) would differ everywhere.
        assert ((x.cpu() - x_cpu).abs() > 1e-4).float().mean() <= 0.03

