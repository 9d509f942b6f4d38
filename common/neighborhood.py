"""Neighbourhood (local-window) attention: every query pixel attends to its k x k neighbourhood.

    out[b, h, i, j] = sum_o softmax_o( q[b, h, i, j] . (k[b, h, i+dy_o, j+dx_o] + rel_pos[o]) ) v[b, h, i+dy_o, j+dx_o]

over the window offsets o = (dy, dx) in [-k//2, k//2]^2, per head, with no
implicit scaling (a layer scales q itself if it wants). The window is centred
on the query; at the image border it is clipped, not shifted.

- rel_pos: (k, k, d) shared by all heads, or (heads, k, k, d): a relative
  embedding per window offset, added to the keys.
- window_mask: (heads, k, k), multiplies the softmax weights, which are then
  renormalised (adaptive span). Equivalent to adding log(mask) to the logits.
- border="mask": out-of-image neighbours are excluded from the softmax;
  border="zeros": they are zero keys and values (the public SASA code), so they
  still get the weight exp(q . rel_pos[o]).

Backends share this signature; `reference` is the plain unfold formulation and
the test oracle for the others.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

BORDERS = ("mask", "zeros")


def _window_offsets(kernel_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy, dx) of each window position, row-major, as two (k*k,) tensors."""
    r = kernel_size // 2
    ar = torch.arange(-r, r + 1, device=device)
    return ar.repeat_interleave(kernel_size), ar.repeat(kernel_size)


def inside_image(height: int, width: int, kernel_size: int, device=None) -> torch.Tensor:
    """(H, W, k*k) bool: is window position o of query (i, j) inside the image?"""
    dy, dx = _window_offsets(kernel_size, device)
    rows = torch.arange(height, device=device)[:, None, None] + dy
    cols = torch.arange(width, device=device)[None, :, None] + dx
    return (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)


def _windows(t: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, heads, H, W, d) -> (B, heads, H, W, k*k, d), zero outside the image."""
    b, heads, h, w, d = t.shape
    r = kernel_size // 2
    padded = F.pad(t, (0, 0, r, r, r, r))
    win = padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # (B, heads, H, W, d, k, k)
    return win.permute(0, 1, 2, 3, 5, 6, 4).reshape(b, heads, h, w, kernel_size * kernel_size, d)


def _rel_as_window(rel_pos: torch.Tensor, heads: int, kernel_size: int) -> torch.Tensor:
    """rel_pos as (1, heads or 1, 1, 1, k*k, d), ready to broadcast against the windows."""
    rel = rel_pos if rel_pos.dim() == 4 else rel_pos.unsqueeze(0)
    return rel.reshape(1, rel.shape[0], 1, 1, kernel_size * kernel_size, rel.shape[-1])


def reference_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask",
                        return_weights=False):
    """The unfold formulation: clear and slow; it keeps k*k-expanded keys and values for backward."""
    b, heads, h, w, d = q.shape
    kk = kernel_size * kernel_size
    keys = _windows(k, kernel_size)
    if rel_pos is not None:
        keys = keys + _rel_as_window(rel_pos, heads, kernel_size)
    logits = (q.unsqueeze(-2) * keys).sum(-1)  # (B, heads, H, W, k*k)
    if border == "mask":
        logits = logits.masked_fill(~inside_image(h, w, kernel_size, q.device), float("-inf"))
    weights = logits.softmax(-1)
    if window_mask is not None:
        weights = weights * window_mask.reshape(1, heads, 1, 1, kk).to(weights.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    out = (weights.unsqueeze(-1) * _windows(v, kernel_size)).sum(-2)
    return (out, weights) if return_weights else out




# ---------------------------------------------------------------------------------------------------------------
# The "tiled" backend: query tiles against their key halos as batched GEMMs, with a hand-written backward.
# ---------------------------------------------------------------------------------------------------------------

TILE = 8  # target tile side; the tile actually used is ceil(n / ceil(n / TILE)) so that padding stays small


def _tile_side(n: int, target: int) -> int:
    tiles = -(-n // max(1, target))
    return -(-n // tiles)


@functools.lru_cache(maxsize=64)
def _tile_plan(height: int, width: int, kernel_size: int, th: int, tw: int, border: str, dtype, device):
    """Static tensors of one shape: the (nT, T2, halo2) 0/-inf bias of the window (and, with border="mask",
    the image) and the (nT, T2, 1) bool "query lies in the image". Tile-local query (ty, tx) sees halo rows
    ty..ty+k-1 and columns tx..tx+k-1."""
    r = kernel_size // 2
    nth, ntw = -(-height // th), -(-width // tw)
    hh, hw = th + 2 * r, tw + 2 * r
    ty, tx = torch.arange(th, device=device).repeat_interleave(tw), torch.arange(tw, device=device).repeat(th)
    ky, kx = torch.arange(hh, device=device).repeat_interleave(hw), torch.arange(hw, device=device).repeat(hh)
    dy, dx = ky[None, :] - ty[:, None], kx[None, :] - tx[:, None]
    in_window = (dy >= 0) & (dy < kernel_size) & (dx >= 0) & (dx < kernel_size)  # (T2, halo2)
    tile_y = torch.arange(nth, device=device).repeat_interleave(ntw) * th  # (nT,)
    tile_x = torch.arange(ntw, device=device).repeat(nth) * tw
    q_in = ((tile_y[:, None] + ty) < height) & ((tile_x[:, None] + tx) < width)  # (nT, T2)
    allowed = in_window.expand(nth * ntw, -1, -1)
    if border == "mask":
        key_y, key_x = tile_y[:, None] + ky - r, tile_x[:, None] + kx - r  # (nT, halo2)
        k_in = (key_y >= 0) & (key_y < height) & (key_x >= 0) & (key_x < width)
        # padding queries (outside the image) keep their whole window, so that no softmax row is empty
        allowed = allowed & (k_in[:, None, :] | ~q_in[:, :, None])
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return bias, q_in.unsqueeze(-1)


class _Tiling:
    """Geometry of one call: the image is cut into nT = nth x ntw tiles of th x tw queries (T2 = th*tw, the
    image zero-padded to whole tiles); tile n sees the (th+k-1) x (tw+k-1) halo of keys around it (halo2)."""

    def __init__(self, shape, kernel_size: int, tile: int | None = None):
        self.b, self.heads, self.h, self.w, self.d = shape
        self.k, self.r, self.kk = kernel_size, kernel_size // 2, kernel_size * kernel_size
        self.th, self.tw = _tile_side(self.h, tile or TILE), _tile_side(self.w, tile or TILE)
        self.nth, self.ntw = -(-self.h // self.th), -(-self.w // self.tw)
        self.hp, self.wp = self.nth * self.th, self.ntw * self.tw
        self.hh, self.hw = self.th + 2 * self.r, self.tw + 2 * self.r
        self.t2, self.halo2, self.nt = self.th * self.tw, self.hh * self.hw, self.nth * self.ntw
        self.bh = self.b * self.heads
        self.n = self.bh * self.nt

    def tiles(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(B, heads, H, W, c) -> (N, T2, c): the query tiles, zero padded."""
        c = x.shape[-1]
        x = F.pad(x.to(dtype), (0, 0, 0, self.wp - self.w, 0, self.hp - self.h))
        x = x.reshape(self.bh, self.nth, self.th, self.ntw, self.tw, c).transpose(2, 3)
        return x.reshape(self.n, self.t2, c)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `tiles`: (N, T2, c) -> (B, heads, H, W, c)."""
        c = x.shape[-1]
        x = x.view(self.b, self.heads, self.nth, self.ntw, self.th, self.tw, c).transpose(3, 4)
        x = x.reshape(self.b, self.heads, self.hp, self.wp, c)
        return x if (self.hp, self.wp) == (self.h, self.w) else x[:, :, :self.h, :self.w].contiguous()

    def halos(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(B, heads, H, W, c) -> (N, halo2, c): each tile's key halo, zero outside the image."""
        c, r = x.shape[-1], self.r
        x = F.pad(x.to(dtype), (0, 0, r, r + self.wp - self.w, r, r + self.hp - self.h))
        x = x.reshape(self.bh, self.hp + 2 * r, self.wp + 2 * r, c)
        x = x.unfold(1, self.hh, self.th).unfold(2, self.hw, self.tw)  # (BH, nth, ntw, c, hh, hw), a view
        return x.permute(0, 1, 2, 4, 5, 3).reshape(self.n, self.halo2, c)

    def fold_halos(self, x: torch.Tensor) -> torch.Tensor:
        """Adjoint of `halos`, from the transposed layout: (N, c, halo2) -> (B, heads, H, W, c), overlaps summed."""
        c, r = x.shape[1], self.r
        cols = x.reshape(self.bh, self.nt, c * self.halo2).transpose(1, 2)
        img = F.fold(cols, (self.hp + 2 * r, self.wp + 2 * r), (self.hh, self.hw), stride=(self.th, self.tw))
        img = img[:, :, r:r + self.h, r:r + self.w]  # (BH, c, H, W)
        return img.reshape(self.b, self.heads, c, self.h, self.w).permute(0, 1, 3, 4, 2)

    def window(self, s: torch.Tensor) -> torch.Tensor:
        """(N, T2, halo2) contiguous -> (N, th, tw, k, k): a strided view of each query's own window in its
        halo row (query (ty, tx) -> halo entries (ty + a, tx + b)), in row-major window order."""
        halo2 = self.halo2
        return s.as_strided((self.n, self.th, self.tw, self.k, self.k),
                            (self.t2 * halo2, self.tw * halo2 + self.hw, halo2 + 1, self.hw, 1), s.storage_offset())

    def compact(self, s: torch.Tensor) -> torch.Tensor:
        """(N, T2, halo2) -> (N, T2, k*k): a copy of each query's window entries."""
        return self.window(s).reshape(self.n, self.t2, self.kk)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tiled_logits(g: _Tiling, qt, kt, rel_pos, log_mask, border, want_raw=False):
    """Logits of every query tile against its halo, (N, T2, halo2): -inf outside each query's window (and
    outside the image with border="mask"), q.(k + rel) + log(mask) inside. With want_raw also the compact
    logits without log(mask), (N, T2, k*k) (for the window_mask gradient)."""
    bias, q_in = _tile_plan(g.h, g.w, g.k, g.th, g.tw, border, qt.dtype, qt.device)
    s = torch.empty(g.bh, g.nt, g.t2, g.halo2, dtype=qt.dtype, device=qt.device)
    s = s.copy_(bias.expand_as(s)).view(g.n, g.t2, g.halo2)  # a fresh tensor: the GEMM accumulates into it
    s.baddbmm_(qt, kt.transpose(1, 2))
    raw = None
    if rel_pos is None and log_mask is None:
        return s, raw
    pad_q = ~q_in.expand(g.bh, -1, -1, -1).reshape(g.n, g.t2, 1)  # padding queries get no extra term
    extra = None
    if rel_pos is not None:  # q . rel[o] for each query and window offset, compact
        rel = rel_pos.reshape(-1, g.kk, g.d).to(qt.dtype).transpose(1, 2)  # (1 or heads, d, k*k)
        extra = torch.matmul(qt.view(g.b, g.heads, g.nt * g.t2, g.d), rel).view(g.n, g.t2, g.kk)
        extra = extra.masked_fill_(pad_q, 0.0)
    if want_raw:
        raw = g.compact(s)
        if extra is not None:
            raw += extra
    if log_mask is not None:
        lm = log_mask.reshape(1, g.heads, 1, g.kk).expand(g.b, -1, g.nt * g.t2, -1).reshape(g.n, g.t2, g.kk)
        extra = lm if extra is None else extra + lm
        extra = extra.masked_fill(pad_q, 0.0)
    g.window(s).add_(extra.view(g.n, g.th, g.tw, g.k, g.k))
    return s, raw


def _softmax_(s: torch.Tensor, lse: torch.Tensor | None = None):
    """In place: logits -> probabilities. Returns (p, lse); a row with no finite logit gets weights 0."""
    if lse is None:
        lse = torch.logsumexp(s, -1)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return s.sub_(lse.unsqueeze(-1)).exp_(), lse


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_pos, window_mask, kernel_size, border, return_weights, tile):
        g = _Tiling(q.shape, kernel_size, tile)
        cdt = _compute_dtype(q.dtype)
        log_mask = None if window_mask is None else window_mask.to(cdt).log()
        qt, kt, vt = g.tiles(q, cdt), g.halos(k, cdt), g.halos(v, cdt)
        p, lse = _softmax_(_tiled_logits(g, qt, kt, rel_pos, log_mask, border)[0])
        out = g.untile(torch.bmm(p, vt)).to(q.dtype)
        weights = g.untile(g.compact(p)).to(q.dtype) if return_weights else None
        # saved: the inputs, the output and one fp32/fp64 log-sum-exp per query; the (N, T2, halo2)
        # probabilities and every halo tensor are recomputed in backward
        ctx.save_for_backward(q, k, v, rel_pos, window_mask, out, lse)
        ctx.setup = (kernel_size, border, tile)
        ctx.set_materialize_grads(False)
        return (out, weights) if return_weights else out

    @staticmethod
    def backward(ctx, grad_out, grad_weights=None):
        q, k, v, rel_pos, window_mask, out, lse = ctx.saved_tensors
        kernel_size, border, tile = ctx.setup
        need_q, need_k, need_v, need_rel, need_mask = ctx.needs_input_grad[:5]
        g = _Tiling(q.shape, kernel_size, tile)
        cdt = _compute_dtype(q.dtype)
        log_mask = None if window_mask is None else window_mask.to(cdt).log()
        qt, kt, vt = g.tiles(q, cdt), g.halos(k, cdt), g.halos(v, cdt)
        s, raw = _tiled_logits(g, qt, kt, rel_pos, log_mask, border, want_raw=need_mask)
        p, _ = _softmax_(s, lse)
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dot = g.tiles(grad_out, cdt)  # (N, T2, dv)
        dvt = torch.bmm(dot.transpose(1, 2), p) if need_v else None  # (N, dv, halo2)
        # dP (the gradient of the weights), then D = sum_o w_o dP_o per query and dS = P (dP - D)
        dp = torch.bmm(dot, vt.transpose(1, 2))
        ot = g.tiles(out, cdt) if out.dtype == cdt else torch.bmm(p, vt)
        dsum = (dot * ot).sum(-1, keepdim=True)  # (N, T2, 1)
        if grad_weights is not None:
            gw = g.tiles(grad_weights, cdt)
            g.window(dp).add_(gw.view(g.n, g.th, g.tw, g.k, g.k))
            dsum += (g.compact(p) * gw).sum(-1, keepdim=True)
        grad_mask = None
        if need_mask:  # d/dm_o = sum over queries of (dP_o - D) exp(raw_o - lse): compact
            dm = (g.compact(dp) - dsum) * (raw - lse.unsqueeze(-1)).exp()
            grad_mask = dm.view(g.b, g.heads, -1, g.kk).sum((0, 2)).view(g.heads, g.k, g.k)
            grad_mask = grad_mask.to(window_mask.dtype)
        ds = dp.sub_(dsum).mul_(p)
        del p, dp
        grad_q = grad_k = grad_v = grad_rel = None
        if need_v:
            grad_v = g.fold_halos(dvt).to(v.dtype)
        if need_k:
            grad_k = g.fold_halos(torch.bmm(qt.transpose(1, 2), ds)).to(k.dtype)
        dqt = torch.bmm(ds, kt) if need_q else None
        if rel_pos is not None and (need_q or need_rel):
            dqr = g.compact(ds).view(g.b, g.heads, g.nt * g.t2, g.kk)
            rel = rel_pos.reshape(-1, g.kk, g.d).to(cdt)  # (1 or heads, k*k, d)
            if need_q:
                dqt += torch.matmul(dqr, rel).view(g.n, g.t2, g.d)
            if need_rel:
                grad_rel = torch.matmul(dqr.transpose(2, 3), qt.view(g.b, g.heads, g.nt * g.t2, g.d)).sum(0)
                if rel_pos.dim() == 3:
                    grad_rel = grad_rel.sum(0)
                grad_rel = grad_rel.view(rel_pos.shape).to(rel_pos.dtype)
        if need_q:
            grad_q = g.untile(dqt).to(q.dtype)
        return grad_q, grad_k, grad_v, grad_rel, grad_mask, None, None, None, None


def tiled_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask", return_weights=False,
                    tile: int | None = None):
    """The fast pure-PyTorch backend (see the module docstring); same results as `reference_attention`."""
    return _TiledAttention.apply(q, k, v, rel_pos, window_mask, kernel_size, border, return_weights, tile)


Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {"reference": reference_attention, "tiled": tiled_attention}


def register_backend(name: str, fn: Backend) -> None:
    BACKENDS[name] = fn


def _check(q, k, v, kernel_size, rel_pos, window_mask, border):
    if q.dim() != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q, k, v must be (B, heads, H, W, d) with matching shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    heads, d = q.shape[1], q.shape[-1]
    if rel_pos is not None and tuple(rel_pos.shape) not in ((kernel_size, kernel_size, d),
                                                           (heads, kernel_size, kernel_size, d)):
        raise ValueError(f"rel_pos must be (k, k, d) or (heads, k, k, d) = ({heads}, {kernel_size}, {kernel_size}, "
                         f"{d}), got {tuple(rel_pos.shape)}")
    if window_mask is not None and tuple(window_mask.shape) != (heads, kernel_size, kernel_size):
        raise ValueError(f"window_mask must be (heads, k, k) = ({heads}, {kernel_size}, {kernel_size}), "
                         f"got {tuple(window_mask.shape)}")


def select_backend(q: torch.Tensor, needs_grad: bool) -> str:
    """The fastest correct backend registered for this device."""
    for name in ("triton", "tiled") if q.device.type == "cuda" else ("tiled",):
        if name in BACKENDS:
            return name
    return "reference"


def neighborhood_attention(q, k, v, kernel_size: int, rel_pos=None, window_mask=None, border: str = "mask",
                           backend: str = "auto", return_weights: bool = False):
    """Local-window attention; see the module docstring. Returns out (B, heads, H, W, d) [, weights]."""
    _check(q, k, v, kernel_size, rel_pos, window_mask, border)
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rel_pos, window_mask))
        backend = select_backend(q, needs_grad)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))} or 'auto'")
    return BACKENDS[backend](q, k, v, kernel_size, rel_pos=rel_pos, window_mask=window_mask, border=border,
                             return_weights=return_weights)
