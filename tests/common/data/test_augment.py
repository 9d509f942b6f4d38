"""Batched AutoAugment / RandAugment / random erasing against torchvision applied one image at a time."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from common.data.augment import (
    AUTOAUGMENT_POLICIES,
    NO_OP,
    OP_ID,
    OPS,
    RANDAUGMENT_OPS,
    BatchAugment,
    BatchErasing,
    magnitude_values,
)

SIZE = (20, 24)  # non-square on purpose
NEAREST = T.InterpolationMode.NEAREST
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate") + BLENDS


def random_images(n=8, channels=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels) + SIZE, dtype=torch.uint8, generator=g)


def reference_op(name: str, image: torch.Tensor, value: float) -> torch.Tensor:
    """One op on one image with torchvision, called as its AutoAugment / RandAugment call it."""
    affine = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST, fill=None)
    shear = math.degrees(math.atan(value))
    calls = {
        "Identity": lambda: image,
        "ShearX": lambda: TF.affine(image, **{**affine, "shear": [shear, 0.0]}, center=[0, 0]),
        "ShearY": lambda: TF.affine(image, **{**affine, "shear": [0.0, shear]}, center=[0, 0]),
        "TranslateX": lambda: TF.affine(image, **{**affine, "translate": [int(value), 0]}),
        "TranslateY": lambda: TF.affine(image, **{**affine, "translate": [0, int(value)]}),
        "Rotate": lambda: TF.rotate(image, angle=value, interpolation=NEAREST, fill=None),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + value),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + value),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + value),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + value),
        "Posterize": lambda: TF.posterize(image, int(value)),
        "Solarize": lambda: TF.solarize(image, value),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }
    return calls[name]()


def reference_plan(images: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    """A plan applied image by image, slot by slot, with torchvision."""
    out = []
    for image, slots in zip(images, plan):
        for op, value in slots.tolist():
            if op != NO_OP:
                image = reference_op(OPS[int(op)], image, value)
        out.append(image)
    return torch.stack(out)


def assert_close_to_torchvision(out: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Exact, except that blends may round a few pixels one grey level apart.

    Blends compute in float32 and truncate to uint8, so the order of float
    operations matters. Ours fuses the multiply-add as torchvision does and
    matches it bit for bit on x86 CPUs (measured on every bin and sign); the
    slack is for platforms whose kernels fuse differently.
    """
    assert out.dtype == torch.uint8 and out.shape == expected.shape
    if name not in BLENDS:
        assert torch.equal(out, expected), name
        return
    diff = (out.int() - expected.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.03, name


def single_op_plan(name: str, values: list[float]) -> torch.Tensor:
    return torch.tensor([[[float(OP_ID[name]), v]] for v in values])


def augmenter_for(plan: torch.Tensor) -> BatchAugment:
    return BatchAugment("randaugment", SIZE, num_ops=plan.shape[1])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("channels", [3, 1])
def test_each_op_equals_torchvision_per_sample(name, channels):
    """Every sample of the batch gets its own magnitude: the bins' extremes and middle, with both signs."""
    values = magnitude_values(31, *SIZE)[OP_ID[name]][[0, 9, 30, 17]].tolist()
    if name in SIGNED:
        values = values + [-v for v in values]
    images = random_images(len(values), channels)
    plan = single_op_plan(name, values)
    out = augmenter_for(plan)(images, plan)
    assert_close_to_torchvision(out, reference_plan(images, plan), name)


@pytest.mark.parametrize("name", ["Equalize", "AutoContrast"])
def test_histogram_ops_equal_torchvision_on_narrow_flat_and_larger_images(name):
    """Larger images give equalize a step above 1; narrow, two-valued and flat channels hit the special cases."""
    g = torch.Generator().manual_seed(0)
    size = (40, 48)
    images = torch.randint(0, 256, (6, 3) + size, dtype=torch.uint8, generator=g)
    images[1] = images[1] // 16 + 100  # narrow range
    images[2, 0] = 77  # flat channel
    images[3] = torch.where(images[3] < 128, 10, 200).to(torch.uint8)  # two values
    images[4, :, :, :47] = 255  # almost flat: step 0 for equalize
    images[5] = images[5].sqrt().to(torch.uint8)  # a dark image
    plan = single_op_plan(name, [0.0] * 6)
    out = BatchAugment("randaugment", size, num_ops=1)(images, plan)
    assert torch.equal(out, reference_plan(images, plan))


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_drawn_plans_equal_torchvision_and_do_not_depend_on_the_rest_of_the_batch(policy):
    augment = BatchAugment(policy, SIZE, num_ops=3)
    images = random_images(48)
    plan = augment.draw(48, torch.Generator().manual_seed(1))
    out = augment(images, plan)
    one_by_one = torch.cat([augment(images[i:i + 1], plan[i:i + 1]) for i in range(48)])
    assert torch.equal(out, one_by_one)
    expected = reference_plan(images, plan)
    # Chained ops can carry a blend's one-level rounding difference into a larger one (equalize, solarize).
    assert (out != expected).float().mean() <= 0.03


def test_two_different_plans_in_one_batch_equal_their_single_sample_results():
    image = random_images(1)
    plans = torch.tensor([[[OP_ID["Rotate"], 20.0], [OP_ID["Color"], 0.5]],
                          [[OP_ID["Rotate"], -7.0], [OP_ID["Posterize"], 3.0]]])
    augment = BatchAugment("randaugment", SIZE, num_ops=2)
    both = augment(image.expand(2, -1, -1, -1), plans)
    first, second = augment(image, plans[:1]), augment(image, plans[1:])
    assert torch.equal(both[:1], first) and torch.equal(both[1:], second)
    assert not torch.equal(first, second)


def test_output_is_a_new_uint8_batch_of_the_same_shape_and_works_under_no_grad():
    augment = BatchAugment("randaugment", SIZE, num_ops=4, magnitude=20)
    images = random_images(16)
    before = images.clone()
    with torch.no_grad():
        out = augment(images, augment.draw(16, torch.Generator().manual_seed(0)))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(images, before)
    assert not torch.equal(out, images)


def test_images_of_another_size_are_refused():
    augment = BatchAugment("randaugment", SIZE)
    with pytest.raises(ValueError, match="built for"):
        augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 2, 2))


def test_magnitude_tables_match_torchvision():
    """Our tables in torchvision's units for each op call (pixels, bits, grey levels)."""
    h, w = SIZE
    for transform, bins in ((T.RandAugment, 31), (T.AutoAugment, 10)):
        ours = magnitude_values(bins, h, w)
        for name, (magnitudes, signed) in transform._AUGMENTATION_SPACE.items():
            assert signed == (name in SIGNED), name
            theirs = magnitudes(bins, h, w)
            if theirs is None:
                assert not ours[OP_ID[name]].any(), name
                continue
            theirs = [float(v) for v in theirs]
            if name.startswith("Translate"):
                theirs = [int(v) for v in theirs]
            if name == "Solarize":
                theirs = [255.0 * v for v in theirs]
            assert ours[OP_ID[name]].tolist() == pytest.approx(theirs, rel=1e-6, abs=0), name
    assert set(T.RandAugment._AUGMENTATION_SPACE) == set(RANDAUGMENT_OPS)


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn"])
def test_autoaugment_policy_tables_match_torchvision(policy):
    theirs = T.AutoAugment(T.AutoAugmentPolicy(policy))._policies
    assert [tuple(sub) for sub in theirs] == list(AUTOAUGMENT_POLICIES[policy])


def test_draw_is_deterministic_and_in_range():
    for policy in ("randaugment", "autoaugment"):
        augment = BatchAugment(policy, SIZE)
        plan = augment.draw(500, torch.Generator().manual_seed(3))
        assert plan.shape == (500, 2, 2) and plan.dtype == torch.float32
        assert torch.equal(plan, augment.draw(500, torch.Generator().manual_seed(3)))
        assert not torch.equal(plan, augment.draw(500, torch.Generator().manual_seed(4)))
        ops = plan[..., 0]
        assert torch.equal(ops, ops.round()) and ops.min() >= NO_OP and ops.max() < len(OPS)


def test_randaugment_uses_every_op_at_the_given_magnitude_with_both_signs():
    augment = BatchAugment("randaugment", SIZE, num_ops=2, magnitude=13, num_magnitude_bins=31)
    plan = augment.draw(4000, torch.Generator().manual_seed(0)).view(-1, 2)
    ops, values = plan[:, 0].long(), plan[:, 1]
    assert set(ops.tolist()) == set(range(len(RANDAUGMENT_OPS)))
    table = magnitude_values(31, *SIZE)[:, 13]
    assert torch.equal(values.abs(), table[ops])
    rotations = values[ops == OP_ID["Rotate"]]
    assert 0.4 < (rotations < 0).float().mean() < 0.6


@pytest.mark.parametrize("policy", ["cifar10", "svhn"])
def test_autoaugment_op_frequencies_follow_the_policy(policy):
    n = 20000
    sub_policies = AUTOAUGMENT_POLICIES[policy]
    plan = BatchAugment("autoaugment", SIZE, autoaugment_policy=policy).draw(n, torch.Generator().manual_seed(0))
    for slot in range(2):
        expected = torch.zeros(len(OPS))
        for sub in sub_policies:
            name, prob, _ = sub[slot]
            expected[OP_ID[name]] += prob / len(sub_policies)
        counts = torch.bincount(plan[:, slot, 0].long() + 1, minlength=len(OPS) + 1).float() / n
        assert counts[0] == pytest.approx(1 - expected.sum().item(), abs=0.015)  # slots that do nothing
        assert counts[1:].tolist() == pytest.approx(expected.tolist(), abs=0.015)


def draw_boxes(prob=1.0, n=400, seed=0, **kwargs):
    erasing = BatchErasing(prob, **kwargs)
    return erasing, erasing.draw(n, SIZE, torch.Generator().manual_seed(seed))


def test_erasing_boxes_lie_in_the_image_with_area_and_aspect_in_range():
    _, boxes = draw_boxes(area=(0.05, 0.3), min_aspect=0.5)
    top, left, h, w = boxes.T
    assert boxes.dtype == torch.long and (h > 0).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= SIZE[0]).all() and (left + w <= SIZE[1]).all()
    pixels = SIZE[0] * SIZE[1]
    # Height and width are rounded to whole pixels, so the area is only known to within half a pixel per side.
    assert ((h + 0.5) * (w + 0.5) >= 0.05 * pixels).all() and ((h - 0.5) * (w - 0.5) <= 0.3 * pixels).all()
    assert ((h + 0.5) / (w - 0.5) >= 0.5).all() and ((h - 0.5) / (w + 0.5) <= 2.0).all()
    assert len(set(map(tuple, boxes.tolist()))) > 100  # and they vary


def test_erasing_probability_and_determinism():
    assert not draw_boxes(prob=0.0)[1].any()
    half = draw_boxes(prob=0.5)[1]
    assert 0.4 < (half[:, 2] > 0).float().mean() < 0.6
    assert torch.equal(half, draw_boxes(prob=0.5)[1])


def test_zero_erasing_fills_exactly_the_box_and_nothing_else():
    erasing, boxes = draw_boxes(n=8, value="zero")
    boxes[3] = 0  # one sample not erased
    x = torch.randn((8, 3) + SIZE) + 5  # no zeros by chance
    before = x.clone()
    out = erasing(x, boxes)
    assert torch.equal(x, before)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = x[i].clone()
        expected[:, top:top + h, left:left + w] = 0
        assert torch.equal(out[i], expected)
    assert torch.equal(out[3], x[3])


def test_random_erasing_fills_boxes_with_standard_normal_noise_from_the_generator():
    erasing, boxes = draw_boxes(n=64, value="random")
    x = torch.full((64, 3) + SIZE, 100.0)
    out = erasing(x, boxes, torch.Generator().manual_seed(0))
    noise = out[out != 100.0]
    assert len(noise) == 3 * (boxes[:, 2] * boxes[:, 3]).sum()
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    assert torch.equal(out, erasing(x, boxes, torch.Generator().manual_seed(0)))


def test_zhong_style_erasing_draws_the_aspect_uniformly_and_fills_the_raw_mean():
    """Zhong et al.'s reference code (the small-data ViT script's): aspect ~ U(r1, 1/r1), 100 tries, and the raw
    per-channel mean written into the normalised image."""
    mean = (0.4914, 0.4822, 0.4465)
    n = 4000
    erasing, boxes = draw_boxes(n=n, area=(0.02, 0.4), min_aspect=0.3, aspect="uniform", attempts=100,
                                value="unnormalized_mean", mean=mean)
    _, log_boxes = draw_boxes(n=n, area=(0.02, 0.4), min_aspect=0.3)
    aspect = lambda b: (b[:, 2].double() / b[:, 3].double()).clamp(1e-3)  # noqa: E731
    # U(0.3, 3.33) puts 76% of the mass above aspect 1, log-uniform only half: the two draws are told apart.
    assert (aspect(boxes) > 1.05).float().mean() > 0.65 > 0.55 > (aspect(log_boxes) > 1.05).float().mean()
    _, one_try = draw_boxes(n=n, area=(0.02, 0.4), min_aspect=0.3, aspect="uniform", attempts=1)
    assert (boxes[:, 2] > 0).all() and (one_try[:, 2] == 0).any()  # a box that does not fit is tried again
    x = torch.full((8, 3) + SIZE, -7.0)
    out = erasing(x, boxes[:8])
    for i, (top, left, h, w) in enumerate(boxes[:8].tolist()):
        patch = out[i, :, top:top + h, left:left + w]
        assert torch.equal(patch, torch.tensor(mean).view(3, 1, 1).expand_as(patch))
    assert (out == -7.0).sum() == x.numel() - 3 * (boxes[:8, 2] * boxes[:8, 3]).sum()
    with pytest.raises(ValueError, match="mean"):
        BatchErasing(0.5, value="unnormalized_mean")
