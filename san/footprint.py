"""The footprint R(i): the k x k window of pixels around each pixel i, and what "outside the image" means.

Offsets are row-major: offset o = a * k + b reads pixel (y + a - r, x + b - r), r = k // 2.
`padding` says what a pixel outside the image holds:

- "reflection": the mirrored in-image pixel, without repeating the edge (the official code's
  choice). The footprint then always holds k*k real pixels; the map must be larger than r.
- "zeros": zero features (a zero-padded unfold). Out-of-image pixels keep their geometric
  position, so the position term still sees the true offset there.

Padding is applied to the projected maps (phi, psi, beta), the way an unfold of a projected map
pads: a zero-padded key contributes psi = 0, not psi(0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDINGS = ("reflection", "zeros")


def check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")


def pad(x: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H + 2r, W + 2r), filled as `padding` says."""
    if radius == 0:
        return x
    if padding == "zeros":
        return F.pad(x, (radius,) * 4)
    height, width = x.shape[-2:]
    if radius >= min(height, width):
        raise ValueError(f"reflection padding of {radius} needs a feature map larger than {radius} on each side, "
                         f"got {height}x{width}: use a layout that keeps more resolution (stem='cifar' at 32x32) "
                         "or padding='zeros'")
    return F.pad(x, (radius,) * 4, mode="reflect")


def pad_adjoint(grad_padded: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """The gradient of `pad` with respect to its input: each mirrored border entry is added back onto
    the pixel it copies, then the border is cropped."""
    r = radius
    if r == 0:
        return grad_padded
    if padding == "reflection":
        g = grad_padded.clone()
        for dim in (-1, -2):
            n = g.shape[dim] - 2 * r  # the input size along dim
            # padded index p < r copies index 2r - p; padded index n + r + q copies n + r - 2 - q
            g.narrow(dim, r + 1, r).add_(g.narrow(dim, 0, r).flip(dim))
            g.narrow(dim, n - 1, r).add_(g.narrow(dim, n + r, r).flip(dim))
        grad_padded = g
    return grad_padded[..., r:-r, r:-r]


def windows(x: torch.Tensor, kernel_size: int, padding: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, k*k, H*W): every pixel's footprint (a k*k-expanded copy of x)."""
    b, c, h, w = x.shape
    cols = F.unfold(pad(x, kernel_size // 2, padding), kernel_size)
    return cols.view(b, c, kernel_size * kernel_size, h * w)


def offsets(kernel_size: int) -> list[tuple[int, int]]:
    """(a, b) of each offset, row-major: where the window of pixel (y, x) starts in the padded map."""
    return [(a, b) for a in range(kernel_size) for b in range(kernel_size)]


def neighbour_index(size: int, kernel_size: int, padding: str, device=None) -> torch.Tensor:
    """(size, k) long: along one axis, the pixel that offset a of pixel i reads.

    With zeros it is i + a - r and may lie outside [0, size); with reflection it is mirrored in.
    """
    r = kernel_size // 2
    t = torch.arange(size, device=device)[:, None] + torch.arange(-r, r + 1, device=device)
    if padding == "reflection":
        t = torch.where(t < 0, -t, t)
        t = torch.where(t > size - 1, 2 * (size - 1) - t, t)
    return t


def fold_reflected(weights: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Reflection padding only: move each out-of-image offset's weight onto the offset of the pixel it reads.

    weights: (..., H, W, k*k). A mirrored pixel is always inside the same window (it lies at most r
    from the query), so the result is again (..., H, W, k*k), now with every weight on the image
    pixel it was applied to: ready for `common.inspect.capture.windows_to_dense`.
    """
    h, w, kk = weights.shape[-3:]
    r = kernel_size // 2
    dy = neighbour_index(h, kernel_size, "reflection", weights.device) - torch.arange(h, device=weights.device)[:, None]
    dx = neighbour_index(w, kernel_size, "reflection", weights.device) - torch.arange(w, device=weights.device)[:, None]
    index = (dy[:, None, :, None] + r) * kernel_size + (dx[None, :, None, :] + r)  # (H, W, k, k)
    index = index.reshape(h, w, kk).expand(weights.shape)
    return torch.zeros_like(weights).scatter_add_(-1, index, weights)
