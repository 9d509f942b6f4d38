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

import contextlib
import functools
import math
import threading
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
    """Static tensors of one shape, per tile, query and window offset: the (nT, T2, k*k) additive bias, -inf
    where the neighbour lies outside the image (border="mask"), else 0; and the (nT, T2, 1) bool "the query
    lies in the image" (padding queries get no relative or mask term, so their softmax rows stay finite)."""
    nth, ntw = -(-height // th), -(-width // tw)
    dy, dx = _window_offsets(kernel_size, device)
    tile_y = torch.arange(nth, device=device).repeat_interleave(ntw) * th  # (nT,)
    tile_x = torch.arange(ntw, device=device).repeat(nth) * tw
    qy = tile_y[:, None] + torch.arange(th, device=device).repeat_interleave(tw)  # (nT, T2)
    qx = tile_x[:, None] + torch.arange(tw, device=device).repeat(th)
    q_in = (qy < height) & (qx < width)
    bias = torch.zeros(nth * ntw, th * tw, kernel_size * kernel_size, dtype=dtype, device=device)
    if border == "mask":
        ky, kx = qy[..., None] + dy, qx[..., None] + dx
        k_in = (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width)
        bias.masked_fill_(~k_in & q_in[..., None], float("-inf"))
    return bias, q_in.unsqueeze(-1)


_WORKSPACE = threading.local()


@contextlib.contextmanager
def _workspace(shape: tuple, dtype: torch.dtype, device: torch.device):
    """A scratch tensor of this shape. On the CPU it is kept per thread and reused across calls: a fresh
    allocation of this size is mmapped and page-faulted in on every call, which costs as much as the GEMM that
    fills it. (CUDA's caching allocator already does this.) `release_workspace()` frees it."""
    if device.type != "cpu":
        yield torch.empty(shape, dtype=dtype, device=device)
        return
    pool = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = pool.pop(dtype, None)  # popped while in use, so a nested call gets its own
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
    try:
        yield buf[:numel].view(shape)
    finally:
        pool[dtype] = buf


def release_workspace() -> None:
    """Free this thread's CPU scratch buffers of the tiled backend."""
    _WORKSPACE.__dict__.pop("buffers", None)


class _Tiling:
    """Geometry of one call: the image is cut into nT = nth x ntw tiles of th x tw queries (T2 = th*tw, the
    image zero-padded to whole tiles); a tile's queries see the (th+k-1) x (tw+k-1) halo of keys around it
    (halo2 keys). BH = B*heads and N = BH*nT; "compact" tensors are (BH, nT, T2, k*k)."""

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
        self.padded = (self.hp, self.wp) != (self.h, self.w)
        self.compact_shape = (self.bh, self.nt, self.t2, self.kk)

    def tiles(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(B, heads, H, W, c) -> (N, T2, c): the query tiles, zero padded."""
        c = x.shape[-1]
        x = F.pad(x.to(dtype), (0, 0, 0, self.wp - self.w, 0, self.hp - self.h))
        x = x.reshape(self.bh, self.nth, self.th, self.ntw, self.tw, c).transpose(2, 3)
        return x.reshape(self.n, self.t2, c)

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `tiles`: (N, T2, c) or (BH, nT, T2, c) -> (B, heads, H, W, c)."""
        c = x.shape[-1]
        x = x.reshape(self.b, self.heads, self.nth, self.ntw, self.th, self.tw, c).transpose(3, 4)
        x = x.reshape(self.b, self.heads, self.hp, self.wp, c)
        return x[:, :, :self.h, :self.w].contiguous() if self.padded else x

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

    def window(self, big: torch.Tensor) -> torch.Tensor:
        """(N, T2, halo2) contiguous -> (BH, nT, th, tw, k, k): a strided view of each query's own window in
        its row of the halo matrix (query (ty, tx) sees halo entries (ty + a, tx + b)), row-major."""
        t2h = self.t2 * self.halo2
        return big.as_strided((self.bh, self.nt, self.th, self.tw, self.k, self.k),
                              (self.nt * t2h, t2h, self.tw * self.halo2 + self.hw, self.halo2 + 1, self.hw, 1),
                              big.storage_offset())

    def gather(self, big: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T2, halo2) -> compact (BH, nT, T2, k*k): each query's window entries, plus `add` (broadcast
        from (B or 1, heads or 1, nT, T2, k*k)) in the same pass."""
        out = torch.empty(self.compact_shape, dtype=big.dtype, device=big.device)
        win_shape = (self.b, self.heads, self.nt, self.th, self.tw, self.k, self.k)
        if add is None:
            out.view(win_shape).copy_(self.window(big).view(win_shape))
        else:
            torch.add(self.window(big).view(win_shape), add.reshape(add.shape[:3] + win_shape[3:]),
                      out=out.view(win_shape))
        return out

    def scatter(self, c: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        """Adjoint of `gather`: compact -> big (N, T2, halo2), zero outside each query's window."""
        big.zero_()
        self.window(big).copy_(c.view(self.bh, self.nt, self.th, self.tw, self.k, self.k))
        return big


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _tiled_logits(g: _Tiling, qt, kt, rel_pos, window_mask, border, big, want_raw=False):
    """Compact logits (BH, nT, T2, k*k) of every query against its own window: q.(k + rel) + log(mask), -inf
    outside the image with border="mask". One batched GEMM computes each query tile against its whole halo
    into `big` (N, T2, halo2); only each query's window is read back. With want_raw, also the logits
    without log(mask) (the window_mask gradient needs them)."""
    bias, q_in = _tile_plan(g.h, g.w, g.k, g.th, g.tw, border, qt.dtype, qt.device)
    torch.bmm(qt, kt.transpose(1, 2), out=big)
    extra = bias.unsqueeze(0).unsqueeze(0)  # (1, 1, nT, T2, k*k)
    if rel_pos is not None:  # q . rel[o] for each query and window offset (+ the bias)
        rel = rel_pos.reshape(-1, 1, g.kk, g.d).to(qt.dtype).transpose(-1, -2)  # (1 or heads, 1, d, k*k)
        extra = torch.matmul(qt.view(g.b, g.heads, g.nt, g.t2, g.d), rel)
        if g.padded:
            extra.masked_fill_(~q_in, 0.0)
        extra += bias
    log_mask = None
    if window_mask is not None:  # (1, heads, nT, T2, k*k): log(mask), 0 for padding queries
        log_mask = torch.where(q_in, window_mask.to(qt.dtype).log().view(1, g.heads, 1, 1, g.kk), 0.0)
    raw = None
    if log_mask is not None and not want_raw:
        extra = extra + log_mask
    logits = g.gather(big, extra)
    if log_mask is not None and want_raw:
        raw = logits
        logits = (raw.view(g.b, g.heads, g.nt, g.t2, g.kk) + log_mask).view(g.compact_shape)
    return logits, raw


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_pos, window_mask, kernel_size, border, return_weights, tile):
        g = _Tiling(q.shape, kernel_size, tile)
        cdt = _compute_dtype(q.dtype)
        qt, kt, vt = g.tiles(q, cdt), g.halos(k, cdt), g.halos(v, cdt)
        with _workspace((g.n, g.t2, g.halo2), cdt, q.device) as big:
            p, _ = _tiled_logits(g, qt, kt, rel_pos, window_mask, border, big)
            # softmax over each window, keeping the log-sum-exp; a fully masked row gets weights 0, not NaN
            m = p.amax(-1, keepdim=True).clamp_min_(torch.finfo(cdt).min)
            p.sub_(m).exp_()
            total = p.sum(-1, keepdim=True).clamp_min_(torch.finfo(cdt).tiny)
            p.div_(total)
            lse = total.log_().add_(m)  # (BH, nT, T2, 1)
            out = g.untile(torch.bmm(g.scatter(p, big), vt)).to(q.dtype)
        # saved: the inputs and one log-sum-exp per query; the compact weights, the (N, T2, halo2) GEMM
        # blocks and the halo tensors are recomputed in backward
        ctx.save_for_backward(q, k, v, rel_pos, window_mask, lse)
        ctx.setup = (kernel_size, border, tile)
        ctx.set_materialize_grads(False)
        if return_weights:
            return out, g.untile(p).to(q.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out, grad_weights=None):
        q, k, v, rel_pos, window_mask, lse = ctx.saved_tensors
        kernel_size, border, tile = ctx.setup
        need_q, need_k, need_v, need_rel, need_mask = ctx.needs_input_grad[:5]
        g = _Tiling(q.shape, kernel_size, tile)
        cdt = _compute_dtype(q.dtype)
        qt, kt, vt = g.tiles(q, cdt), g.halos(k, cdt), g.halos(v, cdt)
        grad_q = grad_k = grad_v = grad_rel = grad_mask = None
        with _workspace((g.n, g.t2, g.halo2), cdt, q.device) as big:
            p, raw = _tiled_logits(g, qt, kt, rel_pos, window_mask, border, big, want_raw=need_mask)
            p.sub_(lse).exp_()  # the weights, compact
            # dP_o = dout . v_o (+ the weights' own gradient), compact; the GEMMs run against the whole halo
            if grad_out is not None:
                dot = g.tiles(grad_out, cdt)  # (N, T2, dv)
                if need_v:
                    grad_v = g.fold_halos(torch.bmm(dot.transpose(1, 2), g.scatter(p, big))).to(v.dtype)
                dp = g.gather(torch.bmm(dot, vt.transpose(1, 2), out=big),
                              None if grad_weights is None else g.tiles(grad_weights, cdt).view(g.b, g.heads, g.nt, g.t2, g.kk))
            else:
                dp = g.tiles(grad_weights, cdt).view(g.compact_shape).clone()
                if need_v:
                    grad_v = torch.zeros_like(v)
            ds = dp.sub_((p * dp).sum(-1, keepdim=True))  # dP - D, with D = sum_o w_o dP_o
            if need_mask:  # d/dm_o = sum over queries of (dP_o - D) exp(raw_o - lse)
                dm = (ds * raw.sub_(lse).exp_()).view(g.b, g.heads, -1, g.kk).sum((0, 2))
                grad_mask = dm.view(g.heads, g.k, g.k).to(window_mask.dtype)
            ds.mul_(p)  # d loss / d logits, compact
            del p
            if need_q or need_k:
                g.scatter(ds, big)
                if need_k:
                    grad_k = g.fold_halos(torch.bmm(qt.transpose(1, 2), big))
                    grad_k = grad_k.to(k.dtype)
                dqt = torch.bmm(big, kt) if need_q else None
        if rel_pos is not None and (need_q or need_rel):
            dqr = ds.view(g.b, g.heads, g.nt * g.t2, g.kk)
            rel = rel_pos.reshape(-1, g.kk, g.d).to(cdt)  # (1 or heads, k*k, d)
            if need_q:
                dqt += torch.matmul(dqr, rel).view(g.n, g.t2, g.d)
            if need_rel:
                if rel_pos.dim() == 3:
                    grad_rel = dqr.reshape(-1, g.kk).t() @ qt.view(-1, g.d)
                else:
                    grad_rel = torch.einsum("bhmo,bhmd->hod", dqr, qt.view(g.b, g.heads, -1, g.d))
                grad_rel = grad_rel.reshape(rel_pos.shape).to(rel_pos.dtype)
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
