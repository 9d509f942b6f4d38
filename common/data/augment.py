"""AutoAugment, RandAugment and random erasing for whole uint8 batches on the training device.

The strong augmentation used to train ViTs on small datasets (Lee et al. 2021, the
DeiT recipe) is usually run per image in DataLoader workers. Our in-memory
datasets live on the device (see common/data/loaders.py), so these run there instead:
each op is applied once to the sub-batch of samples that drew it, with
per-sample magnitudes, and never in a Python loop over samples.

Randomness is split from the pixels: `draw` takes every random choice on the
CPU from a seeded generator and returns it as a small tensor (a plan), and
`__call__` applies a plan deterministically. A run resumed mid-epoch redraws
the same plans and so sees the same batches.

The ops follow torchvision.transforms.v2 (magnitude ranges, bin mapping,
geometry conventions, uint8 rounding), so results match torchvision's per-image
AutoAugment / RandAugment up to float rounding (see tests/common/data/test_augment.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_ID = {name: i for i, name in enumerate(OPS)}
RANDAUGMENT_OPS = OPS[:14]  # RandAugment leaves out Invert
NO_OP = -1  # op id of a slot that does nothing (an AutoAugment op that lost its coin flip)

_SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_AUTOAUGMENT_BINS = 10

# AutoAugment sub-policies (Cubuk et al. 2019, appendix): two (op, probability, magnitude bin of 10) each.
AUTOAUGMENT_POLICIES = {
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


def magnitude_values(num_bins: int, height: int, width: int) -> torch.Tensor:
    """(len(OPS), num_bins) unsigned op argument for each magnitude bin, 0 for ops without one.

    Units are what each op takes: shear as tan(angle), translation in whole pixels
    (torchvision truncates with int()), rotation in degrees, enhance ops as the
    factor minus 1, posterize as bits kept, solarize as a threshold in grey levels.
    The float32 linspaces are torchvision's, so the values agree to the bit.
    """
    table = torch.zeros(len(OPS), num_bins, dtype=torch.float64)
    table[OP_ID["ShearX"]] = table[OP_ID["ShearY"]] = torch.linspace(0.0, 0.3, num_bins).double()
    table[OP_ID["TranslateX"]] = torch.linspace(0.0, 150.0 / 331.0 * width, num_bins).trunc().double()
    table[OP_ID["TranslateY"]] = torch.linspace(0.0, 150.0 / 331.0 * height, num_bins).trunc().double()
    table[OP_ID["Rotate"]] = torch.linspace(0.0, 30.0, num_bins).double()
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        table[OP_ID[name]] = torch.linspace(0.0, 0.9, num_bins).double()
    table[OP_ID["Posterize"]] = (8 - torch.arange(num_bins) / ((num_bins - 1) / 4)).round().double()
    table[OP_ID["Solarize"]] = torch.linspace(1.0, 0.0, num_bins).double() * 255.0
    return table.float()


# ---------------------------------------------------------------------------------------------------------------
# Kernels: each takes the uint8 sub-batch of samples that drew it (B, C, H, W) and their op arguments (B,).


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """Float back to uint8 the way torchvision does it: clamp, then truncate."""
    return x.clamp_(0, 255).to(torch.uint8)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _inverse_affine(ops: torch.Tensor, values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) maps from each output pixel to the source pixel it samples.

    Coordinates are pixels with the origin at the image centre (torchvision's
    convention). Rotation is about the centre, counter-clockwise for positive
    angles; shears are about the top-left corner, as torchvision's AutoAugment
    applies them (centre=[0, 0]); translations move the content by +value.
    Computed in float64, as torchvision does in Python, then cast: float32 sines
    shift a few rotated pixels across a nearest-neighbour rounding boundary.
    """
    v = values.to(torch.float32 if values.device.type == "mps" else torch.float64)  # MPS has no float64
    is_op = {name: ops == OP_ID[name] for name in _GEOMETRIC}
    zero, one = torch.zeros_like(v), torch.ones_like(v)
    angle = torch.deg2rad(v.remainder(360.0))
    cos = torch.where(is_op["Rotate"], angle.cos(), one)
    sin = torch.where(is_op["Rotate"], angle.sin(), zero)
    shear_x = torch.where(is_op["ShearX"], v, zero)
    shear_y = torch.where(is_op["ShearY"], v, zero)
    # A shear about the top-left corner (-w/2, -h/2) is one about the centre plus a shift.
    shift_x = torch.where(is_op["TranslateX"], -v, shear_x * (height / 2))
    shift_y = torch.where(is_op["TranslateY"], -v, shear_y * (width / 2))
    rows = (torch.stack([cos, shear_x - sin, shift_x], dim=-1),
            torch.stack([sin + shear_y, cos, shift_y], dim=-1))
    return torch.stack(rows, dim=1).float()


def _sampling_grid(inverse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """grid_sample's (B, H, W, 2) grid in [-1, 1] (align_corners=False) for pixel-space inverse maps."""
    device = inverse.device
    xs = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    ys = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    pixels = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                          torch.ones(height, width, device=device)], dim=-1).view(1, height * width, 3)
    to_unit = inverse.transpose(1, 2) / torch.tensor([width / 2, height / 2], device=device)
    return pixels.expand(len(inverse), -1, -1).bmm(to_unit).view(-1, height, width, 2)


def _geometric(images: torch.Tensor, ops: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """All shears, translations and rotations of the batch in one nearest-neighbour warp, zeros outside."""
    height, width = images.shape[-2:]
    grid = _sampling_grid(_inverse_affine(ops, values, height, width), height, width)
    warped = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return warped.round_().to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) float luma (ITU-R 601-2), floored as torchvision does for uint8 images."""
    if images.shape[1] == 1:
        return images.float()
    red, green, blue = images.float().unbind(1)
    return (red * 0.2989 + green * 0.587 + blue * 0.114).floor_().unsqueeze(1)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: interpolate (factor = 1 + magnitude; > 1 extrapolates) away from `degenerate`."""
    m = _per_image(magnitudes)
    # image * factor + degenerate * (1 - factor), with the second product fused into the sum as torchvision's
    # add_(alpha=) does: a separate multiply rounds differently and truncates ~2% of pixels one level lower.
    return _as_image(torch.addcmul(images.float() * (1 + m), degenerate, -m))


def _brightness(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    return _as_image(images.float() * _per_image(1 + magnitudes))


def _color(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:  # a grey image has no saturation to change (PIL and torchvision agree)
        return images
    return _blend(images, _grayscale(images), magnitudes)


def _contrast(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    mean_luma = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean_luma, magnitudes)


def _sharpness(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy; the one-pixel border stays as it is (PIL's rule)."""
    channels, height, width = images.shape[1:]
    if height <= 2 or width <= 2:
        return images
    smooth = torch.ones(3, 3, device=images.device) / 13
    smooth[1, 1] = 5 / 13
    x = images.float()
    blurred = F.conv2d(x, smooth.expand(channels, 1, 3, 3), groups=channels).round_()
    inner = x[..., 1:-1, 1:-1]
    # inner + (1 - factor) * (blurred - inner), fused as in torchvision so the truncation agrees.
    x[..., 1:-1, 1:-1] = torch.addcmul(inner, blurred - inner, -_per_image(magnitudes))
    return _as_image(x)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of every value."""
    masks = (255 << (8 - bits.long())) & 255
    return images & _per_image(masks).to(torch.uint8)


def _solarize(images: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Invert every value at or above the threshold."""
    return torch.where(images >= _per_image(thresholds), 255 - images, images)


def _autocontrast(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to the full 0..255 range; a flat channel is left alone."""
    x = images.float()
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    # Scale as torchvision computes it (a multiply by 1/255, then a divide) so the truncation agrees.
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    low = torch.where(flat, 0.0, low)
    return _as_image((x - low) / scale)


def _equalize(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation of each channel, from per-(image, channel) histograms in one scatter_add.

    The lookup table is lut[v] = (cdf[v - 1] + step // 2) // step with
    step = (pixels that are not the channel's maximum value) // 255, and
    lut[0] = 0; a channel with step 0 (nearly flat) is left alone.
    """
    b, c, h, w = images.shape
    pixels = images.reshape(b * c, h * w).long()
    histogram = torch.zeros(b * c, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, pixels, torch.ones_like(pixels))
    top_count = histogram.gather(1, pixels.amax(dim=1, keepdim=True))
    step = (h * w - top_count) // 255
    below = histogram.cumsum(dim=1) - histogram  # cdf[v - 1]: pixels strictly darker than v
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    equalized = lut.gather(1, pixels)
    return torch.where(step > 0, equalized, pixels).to(torch.uint8).view(b, c, h, w)


def _invert(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255 - images


_Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (images, op ids, values)


def _ignoring_op_ids(kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _Kernel:
    return lambda images, ops, values: kernel(images, values)


# One kernel per group of ops; the geometric ops share a warp, so a slot costs one grid_sample.
_KERNELS: tuple[tuple[_Kernel, tuple[str, ...]], ...] = (
    (_geometric, _GEOMETRIC),
    (_ignoring_op_ids(_brightness), ("Brightness",)),
    (_ignoring_op_ids(_color), ("Color",)),
    (_ignoring_op_ids(_contrast), ("Contrast",)),
    (_ignoring_op_ids(_sharpness), ("Sharpness",)),
    (_ignoring_op_ids(_posterize), ("Posterize",)),
    (_ignoring_op_ids(_solarize), ("Solarize",)),
    (_ignoring_op_ids(_autocontrast), ("AutoContrast",)),
    (_ignoring_op_ids(_equalize), ("Equalize",)),
    (_ignoring_op_ids(_invert), ("Invert",)),
)
_UNCHANGED = len(_KERNELS)  # the group of Identity and NO_OP


def _kernel_of_op() -> torch.Tensor:
    """Lookup table: kernel index for op id + 1 (entry 0 is NO_OP)."""
    table = torch.full((len(OPS) + 1,), _UNCHANGED)
    for index, (_, names) in enumerate(_KERNELS):
        for name in names:
            table[OP_ID[name] + 1] = index
    return table


_KERNEL_OF_OP = _kernel_of_op()


class BatchAugment:
    """AutoAugment (Cubuk et al. 2019) or RandAugment (Cubuk et al. 2020) on uint8 batches, per-sample random."""

    def __init__(self, policy: str, image_size: tuple[int, int], autoaugment_policy: str = "cifar10",
                 num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        if policy not in ("autoaugment", "randaugment"):
            raise ValueError(f"policy must be 'autoaugment' or 'randaugment', got {policy!r}")
        self.policy = policy
        self.image_size = tuple(image_size)
        height, width = self.image_size
        self._signed = torch.tensor([name in _SIGNED for name in OPS])
        if policy == "randaugment":
            if num_ops < 0 or not 0 <= magnitude < num_magnitude_bins:
                raise ValueError(f"RandAugment needs num_ops >= 0 and 0 <= magnitude < num_magnitude_bins, got "
                                 f"num_ops={num_ops}, magnitude={magnitude}, num_magnitude_bins={num_magnitude_bins}")
            self.num_slots = num_ops
            self._values = magnitude_values(num_magnitude_bins, height, width)[:, magnitude]
        else:
            if autoaugment_policy not in AUTOAUGMENT_POLICIES:
                raise ValueError(f"autoaugment_policy must be one of {sorted(AUTOAUGMENT_POLICIES)}, "
                                 f"got {autoaugment_policy!r}")
            self.num_slots = 2
            self._set_sub_policies(AUTOAUGMENT_POLICIES[autoaugment_policy], height, width)

    def _set_sub_policies(self, sub_policies, height: int, width: int) -> None:
        """(sub-policy, slot) tables of op id, probability and unsigned op argument."""
        values = magnitude_values(_AUTOAUGMENT_BINS, height, width)
        self._sub_ops = torch.tensor([[OP_ID[name] for name, _, _ in sub] for sub in sub_policies])
        self._sub_probs = torch.tensor([[prob for _, prob, _ in sub] for sub in sub_policies])
        self._sub_values = torch.tensor([[float(values[OP_ID[name], bin_ or 0]) for name, _, bin_ in sub]
                                         for sub in sub_policies])

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample parameters for n samples, drawn on the CPU from `generator`: a float tensor (n, slots, 2)
        holding (op id, signed magnitude value) per op slot; op id -1 means the slot does nothing."""
        if self.policy == "randaugment":
            ops = torch.randint(len(RANDAUGMENT_OPS), (n, self.num_slots), generator=generator)
            values = self._values[ops]
        else:
            sub_policy = torch.randint(len(self._sub_ops), (n,), generator=generator)
            applied = torch.rand(n, self.num_slots, generator=generator) < self._sub_probs[sub_policy]
            ops = torch.where(applied, self._sub_ops[sub_policy], NO_OP)
            values = torch.where(applied, self._sub_values[sub_policy], 0.0)
        negate = (torch.rand(n, self.num_slots, generator=generator) < 0.5) & self._signed[ops.clamp(min=0)]
        return torch.stack([ops.float(), torch.where(negate, -values, values)], dim=-1)

    def __call__(self, images: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """images uint8 (B, C, H, W) on any device; plan (B, slots, 2) on the same device (rows of draw()).
        Applies slot 0 then slot 1 ... to each sample; returns uint8 (B, C, H, W)."""
        self._check(images, plan)
        for slot in range(plan.shape[1]):
            images = _apply_slot(images, plan[:, slot, 0].long(), plan[:, slot, 1])
        return images

    def _check(self, images: torch.Tensor, plan: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, this BatchAugment was built for "
                             f"{self.image_size} (translations scale with the size)")
        if plan.shape != (len(images), self.num_slots, 2):
            raise ValueError(f"plan has shape {tuple(plan.shape)}, expected {(len(images), self.num_slots, 2)}")


def _apply_slot(images: torch.Tensor, ops: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One op per sample: each kernel runs once on the samples routed to it, results scattered back."""
    kernel_index = _KERNEL_OF_OP.to(ops.device)[ops + 1]
    by_kernel = kernel_index.argsort()
    counts = torch.bincount(kernel_index, minlength=len(_KERNELS) + 1).tolist()  # the one host sync per slot
    out = images.clone()
    for (kernel, _), samples in zip(_KERNELS, by_kernel.split(counts)):
        if len(samples):
            out[samples] = kernel(images[samples], ops[samples], values[samples])
    return out


class BatchErasing:
    """Random erasing (Zhong et al. 2020) of one rectangle per sample on a normalised float batch.

    Two conventions exist. torchvision's (the defaults): log-aspect uniform, 10 attempts to fit a box, fill
    with noise or a constant. Zhong et al.'s reference code (used by the small-data ViT script): aspect
    uniform in [min_aspect, 1/min_aspect], 100 attempts, and the box filled with the dataset's unnormalised
    per-channel mean written into the normalised image (value="unnormalized_mean", which needs `mean`).
    """

    def __init__(self, prob: float, area: tuple[float, float] = (0.02, 0.4), min_aspect: float = 0.3,
                 value: str = "random", aspect: str = "log_uniform", attempts: int = 10, mean=None):
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if not 0 < area[0] <= area[1] <= 1:
            raise ValueError(f"area must satisfy 0 < low <= high <= 1, got {area}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        if value not in ("random", "zero", "unnormalized_mean"):
            raise ValueError(f"value must be 'random', 'zero' or 'unnormalized_mean', got {value!r}")
        if value == "unnormalized_mean" and mean is None:
            raise ValueError("value='unnormalized_mean' needs the dataset's per-channel mean")
        if aspect not in ("log_uniform", "uniform"):
            raise ValueError(f"aspect must be 'log_uniform' or 'uniform', got {aspect!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.prob, self.area, self.min_aspect, self.value = prob, tuple(area), min_aspect, value
        self.aspect, self.attempts = aspect, attempts
        self.mean = None if mean is None else tuple(float(m) for m in mean)

    def draw(self, n: int, image_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """(n, 4) long tensor of boxes (top, left, height, width); height 0 = no erasing for that sample.
        Area fraction uniform in `area`, aspect log-uniform (or uniform) in [min_aspect, 1/min_aspect], up to
        `attempts` tries to fit."""
        height, width = image_size
        attempts = (n, self.attempts)
        low, high = self.area
        area = (low + (high - low) * torch.rand(attempts, generator=generator, dtype=torch.float64)) * height * width
        u = torch.rand(attempts, generator=generator, dtype=torch.float64)
        if self.aspect == "log_uniform":
            aspect = (math.log(self.min_aspect) * (1 - 2 * u)).exp()
        else:
            aspect = self.min_aspect + (1 / self.min_aspect - self.min_aspect) * u
        box_h = (area * aspect).sqrt().round().long()
        box_w = (area / aspect).sqrt().round().long()
        fits = (box_h < height) & (box_w < width)
        first_fit = fits.long().argmax(dim=1, keepdim=True)  # argmax finds the first True
        box_h, box_w = box_h.gather(1, first_fit)[:, 0], box_w.gather(1, first_fit)[:, 0]
        erase = (torch.rand(n, generator=generator) < self.prob) & fits.any(dim=1)
        corner = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        top = (corner[:, 0] * (height - box_h + 1)).long()
        left = (corner[:, 1] * (width - box_w + 1)).long()
        boxes = torch.stack([top, left, box_h, box_w], dim=1)
        return torch.where(erase[:, None], boxes, 0)

    def __call__(self, x: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x float (B, C, H, W) normalised; boxes (B, 4) on x's device. Fills each box (vectorised, no Python
        loop over samples) with zeros, the unnormalised mean or standard-normal noise (noise drawn from `generator`, which lives on
        x's device, or the global RNG when None)."""
        top, left, box_h, box_w = boxes.unbind(dim=1)
        rows = torch.arange(x.shape[2], device=x.device)
        cols = torch.arange(x.shape[3], device=x.device)
        in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
        in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
        inside = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (B, 1, H, W)
        if self.value == "zero":
            fill = x.new_zeros(())
        elif self.value == "unnormalized_mean":
            if len(self.mean) != x.shape[1]:
                raise ValueError(f"mean has {len(self.mean)} channels, the images {x.shape[1]}")
            fill = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        else:
            fill = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.where(inside, fill, x)
