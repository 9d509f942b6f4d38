"""A procedurally generated 10-class image dataset that needs no download.

Every image shows one shape on a plain background, and the label is the shape:

    0 horizontal bar        5 square outline
    1 vertical bar          6 filled square
    2 plus                  7 two blobs side by side
    3 x cross               8 two blobs stacked
    4 ring                  9 triangle (apex up)

The label depends only on spatial structure. Foreground and background
colours are drawn at random for each image, independently of the label, and
the class shapes are sized so their areas overlap, so neither colour nor mean
brightness gives the class away: a model has to look at where the pixels are.
Position, size, stroke thickness and a small rotation vary per image, and a
faint illumination gradient, a few specks of clutter and Gaussian pixel noise
keep the task from being solved after one epoch.

Every class maps to itself under a horizontal mirror and survives a shift of a
few pixels, so the usual CIFAR-style training augmentation (random crop with
4 px padding, random horizontal flip) never changes a label. That is why there
is no diagonal or anti-diagonal class: those two are each other's mirror.

Rendering is vectorised: each shape is a signed distance function evaluated on
a pixel grid for a whole batch at once, and anti-aliased by turning the
distance into coverage over a one-pixel ramp.
"""

import contextlib
import dataclasses
import math

import torch

CLASSES: tuple[str, ...] = (
    "horizontal bar",
    "vertical bar",
    "plus",
    "x cross",
    "ring",
    "square outline",
    "filled square",
    "two blobs side by side",
    "two blobs stacked",
    "triangle",
)

# Shape geometry, as fractions of the image size so any resolution looks alike.
_SIZE_RANGE = (0.22, 0.34)  # half-extent of the shape
_STROKE_RANGE = (0.035, 0.065)  # half-thickness of lines
_MAX_ROTATION = math.radians(12)  # small, so a bar never turns into a diagonal
_MIN_COLOUR_DISTANCE = 0.35  # RGB distance that keeps the shape visible
_GRADIENT_AMPLITUDE = 0.08  # peak illumination change from centre to corner
_SPECKS_PER_IMAGE = 3  # at most; each is present with probability 1/2
_SPECK_RADIUS_RANGE = (0.016, 0.04)  # clearly smaller than any shape
_CHUNK = 1024  # images rendered at once: small enough for the buffers to stay in cache


def _box(x: torch.Tensor, y: torch.Tensor, half_w: torch.Tensor, half_h: torch.Tensor) -> torch.Tensor:
    """Signed distance to an axis-aligned rectangle centred at the origin."""
    qx = x.abs() - half_w
    qy = y.abs() - half_h
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _disc_pair(x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance to two discs centred at (+-offset, 0)."""
    dy2 = y**2
    return torch.minimum(torch.sqrt((x - offset) ** 2 + dy2), torch.sqrt((x + offset) ** 2 + dy2)) - radius


def _triangle(x: torch.Tensor, y: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Isosceles triangle, apex up (image y grows downwards), base and height 2*half.

    The maximum of the three edge half-plane distances is exact inside and
    near the edges, which is all anti-aliasing needs.
    """
    slope = 1 / math.sqrt(5)  # unit normals of the slanted edges: (+-2, -1)/sqrt(5)
    left_right = (2 * x.abs() - y) * slope - half * slope
    base = y - half
    return torch.maximum(left_right, base)


# Each shape function gets local coordinates (x, y) of shape (n, S, S) and per-image
# size r and stroke half-thickness t of shape (n, 1, 1), all in pixels.
# Factors on r and t roughly equalise the foreground area across classes
# (about 8*r*t), so the amount of foreground colour says little about the class.
def _horizontal_bar(x, y, r, t):
    return _box(x, y, r, 2 * t)


def _vertical_bar(x, y, r, t):
    return _box(x, y, 2 * t, r)


def _plus(x, y, r, t):
    return torch.minimum(_box(x, y, r, t), _box(x, y, t, r))


def _x_cross(x, y, r, t):
    u = (x + y) * math.sqrt(0.5)
    v = (y - x) * math.sqrt(0.5)
    return torch.minimum(_box(u, v, r, t), _box(u, v, t, r))


def _ring(x, y, r, t):
    return (torch.sqrt(x**2 + y**2) - r).abs() - 0.7 * t


def _square_outline(x, y, r, t):
    a = 0.8 * r
    return _box(x, y, a, a).abs() - 0.7 * t


def _filled_square(x, y, r, t):
    a = torch.sqrt(2 * r * t)
    return _box(x, y, a, a)


def _blobs_side_by_side(x, y, r, t):
    return _disc_pair(x, y, 0.75 * r, torch.sqrt(4 * r * t / math.pi))


def _blobs_stacked(x, y, r, t):
    return _disc_pair(y, x, 0.75 * r, torch.sqrt(4 * r * t / math.pi))


def _triangle_up(x, y, r, t):
    return _triangle(x, y, 2 * torch.sqrt(r * t))


_SHAPES = (
    _horizontal_bar,
    _vertical_bar,
    _plus,
    _x_cross,
    _ring,
    _square_outline,
    _filled_square,
    _blobs_side_by_side,
    _blobs_stacked,
    _triangle_up,
)
assert len(_SHAPES) == len(CLASSES)


@contextlib.contextmanager
def _single_threaded():
    """Run torch ops on one thread, restoring the caller's setting afterwards.

    Rendering is many small elementwise ops. On a busy machine each multi-threaded
    op waits for a thread that the OS has not scheduled yet; measured on 2 shared
    cores, that made generation 5-30x slower than one thread, which is fast anyway.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _uniform(shape, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _contrasting_colours(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random (foreground, background) RGB pairs, redrawn until they differ enough.

    Rejection keeps both colours uniform over the admissible pairs, whatever the class.
    """
    fg = torch.rand(n, 3, generator=gen)
    bg = torch.rand(n, 3, generator=gen)
    for _ in range(100):  # each round fixes ~85% of the rest; 100 rounds never run out
        bad = torch.linalg.vector_norm(fg - bg, dim=1) < _MIN_COLOUR_DISTANCE
        if not bad.any():
            break
        k = int(bad.sum())
        fg[bad] = torch.rand(k, 3, generator=gen)
        bg[bad] = torch.rand(k, 3, generator=gen)
    return fg, bg


@dataclasses.dataclass
class _Layout:
    """Per-image drawing parameters, in pixels and [0, 1] colour units; none depends on the label."""

    cx: torch.Tensor  # (n,) shape centre
    cy: torch.Tensor
    r: torch.Tensor  # (n,) shape half-extent
    t: torch.Tensor  # (n,) stroke half-thickness
    angle: torch.Tensor  # (n,) rotation in radians
    fg: torch.Tensor  # (n, 3) shape colour
    bg: torch.Tensor  # (n, 3) background colour
    gradient: torch.Tensor  # (n, 2) illumination ramp along x and y

    @classmethod
    def draw(cls, n: int, image_size: int, gen: torch.Generator) -> "_Layout":
        s = image_size
        r = _uniform(n, *_SIZE_RANGE, gen) * s
        t = _uniform(n, *_STROKE_RANGE, gen) * s
        angle = _uniform(n, -_MAX_ROTATION, _MAX_ROTATION, gen)
        margin = r * 1.1 + 1  # keeps the shapes inside the frame, bar a pixel at the extremes
        cx = margin + torch.rand(n, generator=gen) * (s - 2 * margin)
        cy = margin + torch.rand(n, generator=gen) * (s - 2 * margin)
        fg, bg = _contrasting_colours(n, gen)
        gradient = _uniform((n, 2), -_GRADIENT_AMPLITUDE, _GRADIENT_AMPLITUDE, gen)
        return cls(cx, cy, r, t, angle, fg, bg, gradient)

    def __getitem__(self, index: slice) -> "_Layout":
        return _Layout(*(getattr(self, field.name)[index] for field in dataclasses.fields(self)))


def _render(shape, layout: _Layout, image_size: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """Draw one image per layout entry, all of one shape; returns uint8 (n, S, S, 3)."""
    n, s = layout.cx.shape[0], image_size
    coords = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    gy = coords.view(1, s, 1)
    gx = coords.view(1, 1, s)

    def per_image(values):  # broadcast a per-image scalar over the grid
        return values.view(n, 1, 1)

    def per_channel(colours):  # broadcast an RGB colour over a channels-first grid
        return colours.view(n, 3, 1, 1)

    # Shape frame: centred on the shape and rotated with it.
    dx, dy = gx - per_image(layout.cx), gy - per_image(layout.cy)
    cos, sin = per_image(torch.cos(layout.angle)), per_image(torch.sin(layout.angle))
    dist = shape(cos * dx + sin * dy, cos * dy - sin * dx, per_image(layout.r), per_image(layout.t))
    coverage = (0.5 - dist).clamp_(0, 1)  # anti-aliasing: linear ramp one pixel wide

    # Clutter: up to a few small specks of one random colour, anywhere on the image.
    k = _SPECKS_PER_IMAGE
    sx = torch.rand(n, k, 1, 1, generator=gen) * s
    sy = torch.rand(n, k, 1, 1, generator=gen) * s
    absent = torch.rand(n, k, 1, 1, generator=gen) < 0.5
    sx[absent] = -1e3  # far off-image, so the speck draws nothing
    speck_radius = _uniform(n, *_SPECK_RADIUS_RANGE, gen) * s
    speck_colour = torch.rand(n, 3, generator=gen)
    speck_dist = ((gx - sx) ** 2 + (gy - sy) ** 2).amin(dim=1).sqrt_()
    speck_coverage = (per_image(speck_radius) + 0.5 - speck_dist).clamp_(0, 1)

    # Illumination: a linear brightness ramp in a random direction.
    ramp_x, ramp_y = per_image(layout.gradient[:, 0]), per_image(layout.gradient[:, 1])
    ramp = 2 * (ramp_x * (gx / s - 0.5) + ramp_y * (gy / s - 0.5))

    # Compose channels-first, where broadcasting a per-pixel weight is cheap.
    image = torch.lerp(per_channel(layout.bg), per_channel(layout.fg), coverage.unsqueeze(1))
    image = torch.lerp(image, per_channel(speck_colour), speck_coverage.unsqueeze(1))
    image += ramp.unsqueeze(1)
    image += noise * torch.randn(image.shape, generator=gen)
    image = image.mul_(255).add_(0.5).clamp_(0, 255)  # +0.5 so truncation below rounds
    return image.permute(0, 2, 3, 1).to(torch.uint8)


def generate(
    num_images: int, seed: int, image_size: int = 32, noise: float = 0.08
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels): images uint8 (N, H, W, 3) contiguous CPU tensor, labels int64 (N,).

    Classes are balanced (each appears num_images // 10 or one more times) and
    shuffled. The output is a pure function of the arguments: a private
    generator seeded with `seed` drives all randomness, and the global torch
    RNG is neither used nor advanced. `noise` is the std of per-pixel Gaussian
    noise in [0, 1] intensity units.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    n, num_classes = num_images, len(CLASSES)

    with _single_threaded():
        layout = _Layout.draw(n, image_size, gen)
        # Render sorted by class, so each shape function gets a contiguous slice,
        # in chunks small enough to stay in cache; shuffle once at the end.
        counts = [n // num_classes + (c < n % num_classes) for c in range(num_classes)]
        labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
        images = torch.empty(n, image_size, image_size, 3, dtype=torch.uint8)
        class_start = 0
        for shape, count in zip(_SHAPES, counts):
            class_end = class_start + count
            for start in range(class_start, class_end, _CHUNK):
                chunk = slice(start, min(start + _CHUNK, class_end))
                images[chunk] = _render(shape, layout[chunk], image_size, noise, gen)
            class_start = class_end
        order = torch.randperm(n, generator=gen)
        return images[order], labels[order]
