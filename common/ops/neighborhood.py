"""Neighbourhood (local-window) attention: every query pixel attends to its k x k neighbourhood.

    out[b, h, i, j] = sum_o softmax_o( q[b, h, i, j] . (k[b, h, i+dy_o, j+dx_o] + rel_pos[o]) ) v[b, h, i+dy_o, j+dx_o]

over the window offsets o = (dy, dx) in [-k//2, k//2]^2, per head, with no
implicit scaling (a layer scales q itself if it wants). The window is centred
on the query; at the image border it is clipped, not shifted.

- rel_pos: (k, k, d) shared by all heads, or (heads, k, k, d): a relative
  embedding per window offset, added to the keys.
- window_mask: (heads, k, k), multiplies the softmax weights, which are then
  renormalised (adaptive span). Equivalent to adding log(mask) to the logits.
  A window whose every in-image weight the mask zeroes has no weight at all:
  its output is 0 and nothing gets a gradient through it, the mask included
  (the renormalisation is 0/0 there, so any gradient is a convention; every
  backend keeps this one).
- border="mask": out-of-image neighbours are excluded from the softmax;
  border="zeros": they are zero keys and values (the public SASA code), so they
  still get the weight exp(q . rel_pos[o]).

Cost, counted by torch.utils.flop_counter the same for every backend (`neighborhood_macs`, convention in
common/inspect/flops.py): B * heads * H * W * k^2 * (d + d_v), plus B * heads * H * W * k^2 * d with rel_pos
(q . rel_pos[o] is a dot product of its own), multiply-accumulates; the whole window counts for every query, at
the border too. The softmax and window_mask are element-wise and not counted. The count belongs to the
dispatcher `neighborhood_attention`, so a backend added with `register_backend` gets it without a line of code.

Backends share this signature; `reference` is the plain unfold formulation and
the test oracle for the others. `backend="auto"` picks "tiled" on the CPU and, on
CUDA, "triton" (common/neighborhood_triton.py, imported lazily on the first CUDA
call and registered if it imports and reports itself available, and trusted once it
has matched `reference` on a small problem on that device) or else "tiled".

The "tiled" backend (pure PyTorch, a torch.autograd.Function with its own backward)
----------------------------------------------------------------------------------
The image is cut into T x T query tiles (T = 8, shrunk to fit small or odd maps; the
map is zero-padded to whole tiles). The queries of a tile only see keys in its
(T+k-1)^2 halo, so one batched GEMM per step computes every query of every tile
against its whole halo, into an (N, T*T, halo) matrix ("big"; N = B*heads*tiles).
That wastes 1 - k^2/(T+k-1)^2 of the GEMM work (3/4 at k=7) but runs at GEMM speed;
T = 8 measured fastest on the CPU among 4, 6, 8, 16 and 4x8/8x4/8x16 tiles. The key
and value halos are built by one copy (k and v stacked as rows plus a zero row)
and one index_select.

- forward: logits = Q_tile @ K_halo^T (bmm); each query's own k x k window is read
  out of its row with one strided copy (a fixed as_strided view: query (ty, tx)
  sees halo entries (ty+a, tx+b)), adding q.rel[o] (one (B*heads*H*W, d) x (d, k*k)
  GEMM), -inf for out-of-image neighbours (border="mask") and log(window_mask) in
  the same pass. The softmax runs on these compact (..., k*k) logits; the weights
  are scattered back into a matrix that is zero outside the windows and
  out = P_big @ V_halo (bmm).
- backward: dV_halo = dout^T @ P_big, dP = dout @ V_halo^T (compact window read),
  dS = P (dP - sum_o P dP) (fused softmax backward, compact), then
  dK_halo = Q^T @ dS_big, dQ = dS_big @ K_halo + dS @ rel, d rel = dS^T @ Q and, if
  window_mask needs a gradient, d mask_o = sum (dP_o - D) exp(raw_o - lse) from
  logits recomputed for that purpose only (exact at mask_o = 0; nothing from an
  emptied window). The halo gradients are summed back into the image with one
  index_add_ (CPU; strided adds elsewhere).
- saved for backward: q (as its (N, T*T, d) tiles, in the compute dtype), k, v,
  rel_pos, window_mask and the compact softmax weights (B*heads*tiles, T*T, k*k),
  i.e. one value per query and window offset. Nothing of size B*heads*H*W*k*k*d,
  no halo and no big matrix is kept: they are rebuilt from k and v in backward
  (about 1/11 of what `reference` keeps at B=8, 64 channels, 32x32, k=7).
- fp16/bf16 inputs are computed in fp32 (softmax statistics included) and the
  results cast back; non-contiguous inputs are read through their strides.
- On the CPU the batch is processed in chunks whose big matrices fit in
  CHUNK_BYTES (8 MiB), so each GEMM's output is still in cache when the next step
  reads it, and the two big matrices of a chunk live in a per-thread workspace
  reused across calls (`_workspace`, `release_workspace`; at most 2 x 8 MiB, or
  one image's worth if larger): a fresh allocation of that size would be
  page-faulted in on every call, which costs about as much as the GEMM filling it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import math
import threading
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from common.inspect.capture import windows_to_dense
from common.inspect.flops import counted_op
from common.ops import neighborhood_cpu
from common.ops.fresh_thread import in_fresh_thread

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
        total = weights.sum(-1, keepdim=True)
        # a window the mask empties is the constant 0: zero weights and no gradient to anything, the mask
        # included (see the module docstring); the division by 1 in its untaken branch keeps that branch's
        # gradient finite (not inf * 0 = nan)
        kept = total > 0
        weights = torch.where(kept, weights / torch.where(kept, total, torch.ones_like(total)), 0.0)
    out = (weights.unsqueeze(-1) * _windows(v, kernel_size)).sum(-2)
    return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------------------------------------------
# The "tiled" backend: query tiles against their key halos as batched GEMMs, with a hand-written backward.
# ---------------------------------------------------------------------------------------------------------------

TILE = 8  # target tile side; the tile actually used is ceil(n / ceil(n / TILE)), so padding stays small
CHUNK_BYTES = 8 << 20  # CPU: the batch is processed in chunks whose (n, T2, halo2) matrices fit in this


def _tile_side(n: int, target: int) -> int:
    tiles = -(-n // max(1, target))
    return -(-n // tiles)


class _Tiling:
    """Geometry of one call. The image is cut into nT = nth x ntw tiles of th x tw queries (T2 = th*tw; the
    image is zero-padded to whole tiles); the queries of a tile see the (th+k-1) x (tw+k-1) halo of keys
    around it (halo2 keys). BH = B*heads, N = BH*nT. "Compact" tensors hold one value per query and window
    offset: (BH, nT, T2, k*k). "Big" matrices hold one value per query and halo key: (N, T2, halo2)."""

    def __init__(self, shape, kernel_size: int, tile: int | tuple[int, int] | None = None):
        self.b, self.heads, self.h, self.w, self.d = shape
        self.k, self.r, self.kk = kernel_size, kernel_size // 2, kernel_size * kernel_size
        tile_h, tile_w = (tile, tile) if isinstance(tile, int) else (tile or (TILE, TILE))
        self.th, self.tw = _tile_side(self.h, tile_h), _tile_side(self.w, tile_w)
        self.nth, self.ntw = -(-self.h // self.th), -(-self.w // self.tw)
        self.hp, self.wp = self.nth * self.th, self.ntw * self.tw
        self.hh, self.hw = self.th + 2 * self.r, self.tw + 2 * self.r
        self.t2, self.halo2, self.nt = self.th * self.tw, self.hh * self.hw, self.nth * self.ntw
        self.padded = (self.hp, self.wp) != (self.h, self.w)
        self._set_batch(self.b)

    def _set_batch(self, b: int) -> None:
        self.b, self.bh, self.n = b, b * self.heads, b * self.heads * self.nt
        self.compact_shape = (self.bh, self.nt, self.t2, self.kk)
        self.compact5 = (self.b, self.heads, self.nt, self.t2, self.kk)

    def chunks(self, dtype, device):
        """On the CPU, split the batch so that each chunk's (n, T2, halo2) matrices stay within CHUNK_BYTES
        (they are then still in cache when the next step reads them); one chunk elsewhere. Yields (the
        chunk's geometry, its tile rows n0:n1, its compact rows c0:c1)."""
        per_image = self.heads * self.nt * self.t2 * self.halo2 * torch.finfo(dtype).bits // 8
        step = max(1, min(self.b, CHUNK_BYTES // per_image)) if device.type == "cpu" else self.b
        for b0 in range(0, self.b, step):
            b1 = min(self.b, b0 + step)
            part = copy.copy(self)
            part._set_batch(b1 - b0)
            yield part, (b0 * self.heads * self.nt, b1 * self.heads * self.nt), (b0 * self.heads, b1 * self.heads)

    def tiles(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """(B, heads, H, W, c) -> (N, T2, c): the query tiles, zero padded (one copy)."""
        c = x.shape[-1]
        if self.padded:
            x = F.pad(x, (0, 0, 0, self.wp - self.w, 0, self.hp - self.h))
        x = x.reshape(self.bh, self.nth, self.th, self.ntw, self.tw, c).transpose(2, 3)
        out = torch.empty(self.n, self.t2, c, dtype=dtype, device=x.device)
        out.view(self.bh, self.nth, self.ntw, self.th, self.tw, c).copy_(x)
        return out

    def untile(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `tiles`: (N, T2, c) or (BH, nT, T2, c), any strides -> (B, heads, H, W, c)."""
        c = x.shape[-1]
        x = x.reshape(self.b, self.heads, self.nth, self.ntw, self.th, self.tw, c).transpose(3, 4)
        x = x.reshape(self.b, self.heads, self.hp, self.wp, c)
        return x[:, :, :self.h, :self.w].contiguous() if self.padded else x

    def halos(self, xs: list[torch.Tensor], dtype) -> torch.Tensor:
        """S tensors (B, heads, H, W, c) -> (S, N, halo2, c): each tile's key halo, zero outside the image.
        One copy stacks the inputs as rows (plus a zero row), one index_select gathers the halos."""
        c, rows = xs[0].shape[-1], self.bh * self.h * self.w
        flat = torch.empty(len(xs) * rows + 1, c, dtype=dtype, device=xs[0].device)
        flat[-1].zero_()
        if len(xs) == 1:
            flat[:-1].view(xs[0].shape).copy_(xs[0])
        else:
            torch.stack(xs, out=flat[:-1].view((len(xs),) + xs[0].shape))
        index = _halo_rows(self.h, self.w, self.k, self.th, self.tw, len(xs) * self.bh, flat.device)
        return flat.index_select(0, index).view(len(xs), self.n, self.halo2, c)

    def fold_halos(self, x: torch.Tensor) -> torch.Tensor:
        """Adjoint of `halos`: (S, N, halo2, c) (any strides) -> (S, B, heads, H, W, c), the overlapping halos
        summed: one serial index_add_ on the CPU, deterministic strided adds elsewhere."""
        return self._fold_index_add(x) if x.device.type == "cpu" else self._fold_pieces(x)

    def _fold_index_add(self, x: torch.Tensor) -> torch.Tensor:
        s, c = x.shape[0], x.shape[-1]
        rows = s * self.bh * self.h * self.w
        img = torch.zeros(rows + 1, c, dtype=x.dtype, device=x.device)
        img.index_add_(0, _halo_rows(self.h, self.w, self.k, self.th, self.tw, s * self.bh, x.device),
                       x.reshape(-1, c))
        return img[:-1].view(s, self.b, self.heads, self.h, self.w, c)

    def _fold_pieces(self, x: torch.Tensor) -> torch.Tensor:
        """The halo is cut into tile-sized pieces; piece (py, px) of tile (i, j) lands on tile (i + py, j + px)
        of the image, so each piece is one strided add over all tiles at once."""
        s, c, th, tw, r = x.shape[0], x.shape[-1], self.th, self.tw, self.r
        sbh = s * self.bh
        x = x.reshape(sbh, self.nth, self.ntw, self.hh, self.hw, c)
        py_n, px_n = -(-self.hh // th), -(-self.hw // tw)
        img = torch.zeros(sbh, self.nth + py_n - 1, th, self.ntw + px_n - 1, tw, c, dtype=x.dtype,
                          device=x.device)
        for py in range(py_n):
            rows = min(th, self.hh - py * th)
            for px in range(px_n):
                cols = min(tw, self.hw - px * tw)
                piece = x[:, :, :, py * th:py * th + rows, px * tw:px * tw + cols].transpose(2, 3)
                img[:, py:py + self.nth, :rows, px:px + self.ntw, :cols] += piece
        img = img.view(sbh, img.shape[1] * th, img.shape[3] * tw, c)[:, r:r + self.h, r:r + self.w]
        return img.reshape(s, self.b, self.heads, self.h, self.w, c)

    def window(self, big: torch.Tensor) -> torch.Tensor:
        """(N, T2, halo2) contiguous -> (B, heads, nT, th, tw, k, k): a strided view of each query's own window
        in its row of the big matrix (query (ty, tx) sees halo entries (ty + a, tx + b)), row-major."""
        t2h = self.t2 * self.halo2
        return big.as_strided((self.b, self.heads, self.nt, self.th, self.tw, self.k, self.k),
                              (self.heads * self.nt * t2h, self.nt * t2h, t2h, self.tw * self.halo2 + self.hw,
                               self.halo2 + 1, self.hw, 1), big.storage_offset())

    def gather(self, big: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T2, halo2) -> compact: each query's window entries, plus `add` (anything that broadcasts to
        (B, heads, nT, T2, k*k)) in the same pass."""
        out = torch.empty(self.compact_shape, dtype=big.dtype, device=big.device)
        win = self.window(big)
        if add is None:
            out.view(win.shape).copy_(win)
        else:
            torch.add(win, add.view(add.shape[:-2] + win.shape[-4:]), out=out.view(win.shape))
        return out

    def scatter(self, c: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
        """Adjoint of `gather`: compact -> big; writes only the window entries (`big` is the workspace's
        sparse matrix, which is zero elsewhere)."""
        win = self.window(big)
        win.copy_(c.view(win.shape))
        return big


@functools.lru_cache(maxsize=64)
def _tile_plan(g_key: tuple, border: str, dtype, device):
    """Static tensors of one geometry: the (nT, T2, k*k) additive bias (-inf where the neighbour lies outside
    the image with border="mask", else 0; padding queries keep their whole window so that no softmax row is
    empty) and the (nT, T2, 1) bool "the query lies in the image"."""
    height, width, kernel_size, th, tw = g_key
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


@functools.lru_cache(maxsize=32)
def _halo_rows(height: int, width: int, kernel_size: int, th: int, tw: int, images: int, device) -> torch.Tensor:
    """(images * nT * halo2,) int64: for every halo entry of every tile of `images` stacked (H, W) images,
    its row in the stacked images (rows = images * H * W), or the zero row (index rows) outside the image."""
    r = kernel_size // 2
    nth, ntw, hh, hw = -(-height // th), -(-width // tw), th + 2 * r, tw + 2 * r
    ys = (torch.arange(nth, device=device) * th)[:, None] + torch.arange(hh, device=device) - r  # (nth, hh)
    xs = (torch.arange(ntw, device=device) * tw)[:, None] + torch.arange(hw, device=device) - r  # (ntw, hw)
    y, x = ys[:, None, :, None], xs[None, :, None, :]  # (nth, ntw, hh, hw) after broadcasting
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    pixel = torch.where(inside, y * width + x, -1).reshape(-1)  # (nT * halo2,)
    rows = images * height * width
    offsets = torch.arange(images, device=device)[:, None] * (height * width)
    return torch.where(pixel >= 0, offsets + pixel, rows).reshape(-1)


_WORKSPACE = threading.local()


@contextlib.contextmanager
def _workspace(g: _Tiling, dtype: torch.dtype, device: torch.device):
    """Two (N, T2, halo2) scratch matrices: `dense` receives the GEMM outputs; `sparse` holds scattered
    compact tensors and is zero outside every query's window. On the CPU both are kept per thread and reused
    across calls: a fresh allocation of this size is mmapped and page-faulted in on every call, which costs
    about as much as the GEMM that fills it (CUDA's caching allocator already reuses memory). Only window
    entries are ever written into `sparse`, so it is re-zeroed only when the geometry changes.
    `release_workspace()` frees both."""
    shape = (g.n, g.t2, g.halo2)
    if device.type != "cpu":
        yield torch.empty(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        return
    # the window pattern repeats every tile, so `sparse` stays valid for any n with the same (th, tw, k)
    numel, pattern = math.prod(shape), (g.th, g.tw, g.k)
    pool = _WORKSPACE.__dict__.setdefault("buffers", {})
    dense, sparse, zeroed = pool.pop(dtype, (None, None, (None, 0)))  # popped while in use: a nested call
    # gets its own. Normal tensors even when first needed under torch.inference_mode: an inference tensor
    # could not be written in a later training step.
    with torch.inference_mode(False):
        if dense is None or dense.numel() < numel:
            dense = torch.empty(numel, dtype=dtype)
        if sparse is None or sparse.numel() < numel:
            sparse, zeroed = torch.empty(numel, dtype=dtype), (None, 0)
        if zeroed[0] != pattern or zeroed[1] < numel:
            sparse[:numel].zero_()
            zeroed = (pattern, numel)
    try:
        yield dense[:numel].view(shape), sparse[:numel].view(shape)
    finally:
        pool[dtype] = (dense, sparse, zeroed)


def release_workspace() -> None:
    """Free this thread's CPU scratch matrices of the tiled backend."""
    _WORKSPACE.__dict__.pop("buffers", None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Inputs:
    """The tiled operands of one call, in the compute dtype: query tiles (N, T2, d) and the key and value
    halos (N, halo2, d) (built by one copy when d == dv)."""

    def __init__(self, g: _Tiling, q, k, v, cdt, need_q=True, need_kv=True):
        self.qt = g.tiles(q, cdt) if need_q else None
        self.kt = self.vt = None
        if need_kv and k.shape == v.shape and k.dtype == v.dtype:
            self.kt, self.vt = g.halos([k, v], cdt)
        elif need_kv:
            self.kt, self.vt = g.halos([k], cdt)[0], g.halos([v], cdt)[0]

    def slice(self, n0: int, n1: int) -> "_Inputs":
        part = _Inputs.__new__(_Inputs)
        part.qt, part.kt, part.vt = (None if t is None else t[n0:n1] for t in (self.qt, self.kt, self.vt))
        return part


def _tiled_logits(g: _Tiling, x: _Inputs, rel_pos, window_mask, border, dense, split_mask=False):
    """Compact logits of every query against its own window: q.(k + rel) + log(mask), -inf outside the
    image with border="mask". One batched GEMM computes each query tile against its whole halo into `dense`;
    only each query's window is read back. With split_mask, returns (logits without log(mask), the
    (1, heads, nT, T2, k*k) log(mask) term) instead of adding it."""
    cdt = dense.dtype
    bias, q_in = _tile_plan((g.h, g.w, g.k, g.th, g.tw), border, cdt, dense.device)
    torch.bmm(x.qt, x.kt.transpose(1, 2), out=dense)
    extra = bias if border == "mask" else None  # (nT, T2, k*k)
    if rel_pos is not None:  # q . rel[o] for each query and window offset (zero for the padding queries)
        rel = rel_pos.reshape(-1, g.kk, g.d).to(cdt).transpose(-1, -2)  # (1 or heads, d, k*k)
        if rel_pos.dim() == 3:
            qr = torch.mm(x.qt.view(-1, g.d), rel[0]).view(g.compact5)
        else:
            qr = torch.matmul(x.qt.view(g.b, g.heads, -1, g.d), rel).view(g.compact5)
        extra = qr if extra is None else qr.add_(bias)
    log_mask = None
    if window_mask is not None:  # log(mask), 0 for padding queries (their rows must stay finite)
        log_mask = torch.where(q_in, window_mask.to(cdt).log().reshape(1, g.heads, 1, 1, g.kk), 0.0)
        if not split_mask:
            extra = log_mask if extra is None else extra + log_mask
    logits = g.gather(dense, extra)
    return (logits, log_mask) if split_mask else logits


def _alive(g: _Tiling, window_mask, border, cdt, device):
    """(1, heads, nT, T2, 1) bool: does the query keep any weight after the mask? None when all do."""
    bias, _ = _tile_plan((g.h, g.w, g.k, g.th, g.tw), border, cdt, device)
    alive = ((window_mask.reshape(1, g.heads, 1, 1, g.kk) > 0) & (bias == 0)).any(-1, keepdim=True)
    return None if bool(alive.all()) else alive


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_pos, window_mask, kernel_size, border, return_weights, tile):
        g = _Tiling(q.shape, kernel_size, tile)
        cdt, dev = _compute_dtype(q.dtype), q.device
        x = _Inputs(g, q, k, v, cdt)
        p = torch.empty(g.compact_shape, dtype=cdt, device=dev)
        out_t = torch.empty(g.n, v.shape[-1], g.t2, dtype=cdt, device=dev)  # transposed tiles of the output
        alive = None if window_mask is None else _alive(g, window_mask, border, cdt, dev)
        for gc, (n0, n1), (c0, c1) in g.chunks(cdt, dev):
            xc = x.slice(n0, n1)
            with _workspace(gc, cdt, dev) as (dense, sparse):
                pc = torch.softmax(_tiled_logits(gc, xc, rel_pos, window_mask, border, dense), -1, out=p[c0:c1])
                if alive is not None:  # a fully masked window gets weights 0, not NaN
                    pc.view(gc.compact5).masked_fill_(~alive, 0.0)
                torch.bmm(xc.vt.transpose(1, 2), gc.scatter(pc, sparse).transpose(1, 2), out=out_t[n0:n1])
        out = g.untile(out_t.transpose(1, 2)).to(q.dtype)
        # saved: q (as its tiles (N, T2, d) in the compute dtype), k, v, rel_pos, window_mask and the compact
        # weights (BH, nT, T2, k*k); no halo and no (N, T2, halo2) matrix
        ctx.save_for_backward(x.qt, k, v, rel_pos, window_mask, p)
        ctx.setup = (kernel_size, border, tile, q.shape, q.dtype)
        ctx.set_materialize_grads(False)
        if return_weights:
            return out, g.untile(p).to(q.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_weights=None):
        qt, k, v, rel_pos, window_mask, p = ctx.saved_tensors
        kernel_size, border, tile, q_shape, q_dtype = ctx.setup
        need_q, need_k, need_v, need_rel, need_mask = ctx.needs_input_grad[:5]
        need_v = need_v and grad_out is not None  # the weights alone do not depend on v
        g = _Tiling(q_shape, kernel_size, tile)
        cdt, dev, dv = qt.dtype, qt.device, v.shape[-1]
        x = _Inputs(g, None, k, v, cdt, need_q=False, need_kv=need_q or need_mask or grad_out is not None)
        x.qt = qt
        dot = None if grad_out is None else g.tiles(grad_out, cdt)  # (N, T2, dv)
        gw = None if grad_weights is None else g.tiles(grad_weights, cdt).view(g.compact_shape)
        # the halo gradients (N, c, halo2) of k and v, stacked when they can be folded back together
        stacked = need_k and need_v and dv == g.d
        dkv = torch.empty(2, g.n, g.d, g.halo2, dtype=cdt, device=dev) if stacked else None
        dkt = dkv[0] if stacked else torch.empty(g.n, g.d, g.halo2, dtype=cdt, device=dev) if need_k else None
        dvt = dkv[1] if stacked else torch.empty(g.n, dv, g.halo2, dtype=cdt, device=dev) if need_v else None
        dqt = torch.empty(g.n, g.d, g.t2, dtype=cdt, device=dev) if need_q else None  # transposed tiles
        ds = torch.empty(g.compact_shape, dtype=cdt, device=dev)
        grad_mask = torch.zeros(g.heads, g.kk, dtype=cdt, device=dev) if need_mask else None
        alive = _alive(g, window_mask, border, cdt, dev) if need_mask else None
        for gc, (n0, n1), (c0, c1) in g.chunks(cdt, dev):
            xc, pc = x.slice(n0, n1), p[c0:c1]
            gwc = None if gw is None else gw[c0:c1].view(gc.compact5)
            with _workspace(gc, cdt, dev) as (dense, sparse):
                # dP_o = dout . v_o (+ the weights' own gradient), compact; the GEMMs run against the halos
                if dot is not None:
                    if need_v:
                        torch.bmm(dot[n0:n1].transpose(1, 2), gc.scatter(pc, sparse), out=dvt[n0:n1])
                    dp = gc.gather(torch.bmm(dot[n0:n1], xc.vt.transpose(1, 2), out=dense), gwc)
                else:
                    dp = gwc.reshape(gc.compact_shape).clone()
                if need_mask:  # d/dm_o = sum over queries of (dP_o - D) exp(raw_o - lse), D = sum_o w_o dP_o
                    dsum = (pc * dp).sum(-1, keepdim=True)
                    raw, log_mask = _tiled_logits(gc, xc, rel_pos, window_mask, border, dense, split_mask=True)
                    lse = torch.logsumexp(raw.view(gc.compact5) + log_mask, -1, keepdim=True)
                    e = (raw.view(gc.compact5) - lse).exp_()
                    if alive is not None:
                        e = torch.where(alive, e, 0.0)
                    grad_mask += ((dp - dsum).view(gc.compact5) * e).sum((0, 2, 3))
                # d loss / d logits = P (dP - D), compact
                dsc = torch.ops.aten._softmax_backward_data.out(dp, pc, -1, cdt, grad_input=ds[c0:c1])
                if need_q or need_k:
                    gc.scatter(dsc, sparse)
                    if need_k:
                        torch.bmm(xc.qt.transpose(1, 2), sparse, out=dkt[n0:n1])
                    if need_q:
                        torch.bmm(xc.kt.transpose(1, 2), sparse.transpose(1, 2), out=dqt[n0:n1])
        grad_q = grad_k = grad_v = grad_rel = None
        if stacked:
            grad_k, grad_v = g.fold_halos(dkv.transpose(2, 3))
            grad_k, grad_v = grad_k.to(k.dtype), grad_v.to(v.dtype)
        else:
            grad_k = None if dkt is None else g.fold_halos(dkt.transpose(1, 2).unsqueeze(0))[0].to(k.dtype)
            grad_v = None if dvt is None else g.fold_halos(dvt.transpose(1, 2).unsqueeze(0))[0].to(v.dtype)
        if need_q:
            dqt = dqt.transpose(1, 2)
        if rel_pos is not None and (need_q or need_rel):
            dqr = ds.view(g.b, g.heads, g.nt * g.t2, g.kk)
            rel = rel_pos.reshape(-1, g.kk, g.d).to(cdt)  # (1 or heads, k*k, d)
            if need_q and rel_pos.dim() == 3:
                dqt = torch.mm(dqr.view(-1, g.kk), rel[0]).view(g.n, g.t2, g.d).add_(dqt)
            elif need_q:
                dqt = torch.matmul(dqr, rel).view(g.n, g.t2, g.d).add_(dqt)
            if need_rel:
                if rel_pos.dim() == 3:
                    grad_rel = (x.qt.view(-1, g.d).t() @ dqr.reshape(-1, g.kk)).t()
                else:
                    grad_rel = torch.matmul(x.qt.view(g.b, g.heads, -1, g.d).transpose(2, 3), dqr).sum(0)
                    grad_rel = grad_rel.transpose(1, 2)
                grad_rel = grad_rel.reshape(rel_pos.shape).to(rel_pos.dtype)
        if need_q:
            grad_q = g.untile(dqt).to(q_dtype)
        if need_mask:
            grad_mask = grad_mask.view(g.heads, g.k, g.k).to(window_mask.dtype)
        return grad_q, grad_k, grad_v, grad_rel, grad_mask, None, None, None, None


def tiled_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask", return_weights=False,
                    tile: int | tuple[int, int] | None = None):
    """The fast pure-PyTorch backend (see the module docstring); same results as `reference_attention`.
    `tile` overrides the target tile side (default TILE)."""
    return _TiledAttention.apply(q, k, v, rel_pos, window_mask, kernel_size, border, return_weights, tile)


def even_head_dim(out_channels: int, heads: int) -> int:
    """The per-head width of a layer whose relative embedding splits each head into row and column halves."""
    if out_channels % heads:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by heads ({heads})")
    head_dim = out_channels // heads
    if head_dim % 2:
        raise ValueError(f"the head dimension out_channels/heads = {head_dim} must be even "
                         "(half for row offsets, half for column offsets)")
    return head_dim


def attend_and_record(layer, q, k, v, kernel_size: int, **options) -> torch.Tensor:
    """`neighborhood_attention` for an `AttentionLayer`: when it is recording, the windows are also
    handed to the capture contract as dense maps; otherwise nothing beyond the output is computed."""
    if not layer.recording:
        return neighborhood_attention(q, k, v, kernel_size, **options)
    out, weights = neighborhood_attention(q, k, v, kernel_size, return_weights=True, **options)
    grid = tuple(q.shape[2:4])
    layer.record(lambda index: windows_to_dense(weights, kernel_size, grid, index), grid, grid)
    return out


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, heads*d, H, W) conv features -> (B, heads, H, W, d), the op's layout, as a view.

    Head h owns channels [h*d, (h+1)*d).
    """
    b, c, h, w = t.shape
    return t.reshape(b, heads, c // heads, h, w).permute(0, 1, 3, 4, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, H, W, d) -> (B, heads*d, H, W), the inverse of `split_heads`."""
    b, heads, h, w, d = t.shape
    return t.permute(0, 1, 4, 2, 3).reshape(b, heads * d, h, w)


def fused_cpu_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask", return_weights=False):
    """The fused C++ kernel for the CPU (common/ops/neighborhood_cpu.py), compiled on first use. Where it cannot be
    built (after one warning) and for tensors on other devices, this is the tiled backend."""
    if q.device.type != "cpu" or not neighborhood_cpu.ensure_built():
        return tiled_attention(q, k, v, kernel_size, rel_pos, window_mask, border, return_weights)
    return neighborhood_cpu.fused_attention(q, k, v, kernel_size, rel_pos, window_mask, border, return_weights)


Backend = Callable[..., torch.Tensor]
BACKENDS: dict[str, Backend] = {"reference": reference_attention, "tiled": tiled_attention,
                                "fused_cpu": fused_cpu_attention}


def register_backend(name: str, fn: Backend) -> None:
    """Make `fn` (the signature of `reference_attention`) selectable as `neighborhood_attention(backend=name)`.

    The FLOP count is `neighborhood_attention`'s, not the backend's: the counted op is the dispatcher, so every
    registered backend counts `neighborhood_macs` under torch.utils.flop_counter, forward and backward, without
    doing anything (what it computes internally is kept out of the count). Layers must therefore call
    `neighborhood_attention` (or `attend_and_record`), never a backend function directly.
    """
    BACKENDS[name] = fn


def _check(q, k, v, kernel_size, rel_pos, window_mask, border):
    if q.dim() != 5 or k.shape != q.shape or v.dim() != 5 or v.shape[:4] != q.shape[:4] or 0 in q.shape:
        raise ValueError(f"q, k, v must be non-empty (B, heads, H, W, d) with matching shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not all(t.is_floating_point() for t in (q, k, v)):
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
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


_TRITON = {"tried": False, "supports": None}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels take (not fp64)


def _ensure_triton() -> bool:
    """Register the fused Triton backend (common/neighborhood_triton.py) on first use: it is imported lazily,
    only for CUDA tensors, and registered if it imports and its `available()` says so. Returns whether
    "triton" is registered."""
    if "triton" in BACKENDS:
        return True
    if _TRITON["tried"]:
        return False
    _TRITON["tried"] = True
    try:
        module = importlib.import_module("common.ops.neighborhood_triton")
    except ImportError:
        return False
    if not module.available():
        return False
    _TRITON["supports"] = getattr(module, "supports", None)
    register_backend("triton", module.triton_attention)
    return True


_TRITON_VERIFIED: dict[torch.device, bool] = {}


def _triton_verified(device: torch.device) -> bool:
    """Once per device: do the Triton kernels compile and agree with `reference` (forward and gradients)?

    "auto" only trusts a fused kernel that has passed this on the device at hand; a kernel that fails
    to compile or disagrees there (a new GPU generation, a Triton upgrade) costs a warning and the
    tiled backend, not a crash or silently wrong attention. backend="triton" skips the check. It runs on a
    fresh thread (common/ops/fresh_thread.py), so that a first call under no_grad, inference_mode or autocast
    gets the same verdict as one in plain training.
    """
    if device not in _TRITON_VERIFIED:
        try:
            problem = in_fresh_thread(lambda: _triton_self_check(device), name="triton self-check")
        except Exception as exc:  # noqa: BLE001 - any failure of an untrusted kernel means "do not use it"
            problem = f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        if problem is not None:
            warnings.warn(f"neighborhood_attention: the Triton backend {problem} on {device}; "
                          f"backend='auto' uses 'tiled' instead", RuntimeWarning, stacklevel=3)
        _TRITON_VERIFIED[device] = problem is None
    return _TRITON_VERIFIED[device]


def _triton_self_check(device: torch.device) -> str | None:
    """The Triton backend against the reference on one small problem; None if forward and gradients agree."""
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(2, 2, 6, 7, 8, device=device, generator=gen, requires_grad=True) for _ in range(3)]
    rel_pos = torch.randn(5, 5, 8, device=device, generator=gen, requires_grad=True)
    mask = torch.rand(2, 5, 5, device=device, generator=gen).requires_grad_()
    results = []
    for fn in (BACKENDS["triton"], reference_attention):
        out = fn(*inputs, 5, rel_pos=rel_pos, window_mask=mask, border="mask")
        results.append([out, *torch.autograd.grad((out * out).sum(), [*inputs, rel_pos, mask])])
    if all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(*results)):
        return None
    return "disagrees with the reference"


def select_backend(q: torch.Tensor, needs_grad: bool, k=None, v=None, kernel_size=None, rel_pos=None,
                   window_mask=None, border: str = "mask", return_weights: bool = False) -> str:
    """The fastest correct backend for this request: on CUDA "triton" for fp32/fp16/bf16 when it is
    registered (lazily, see `_ensure_triton`) and, if the Triton module defines `supports(q, k, v,
    kernel_size, rel_pos=..., window_mask=..., border=..., return_weights=...) -> bool`, that accepts the
    request; on the CPU "fused_cpu" once it is built and has passed its self-check (`neighborhood_cpu.ensure_built`);
    otherwise "tiled" (CPU and CUDA, with or without grad)."""
    if q.device.type == "cuda" and q.dtype in _TRITON_DTYPES and _ensure_triton() and _triton_verified(q.device):
        supports = _TRITON["supports"]
        if supports is None or kernel_size is None or supports(
                q, k if k is not None else q, v if v is not None else q, kernel_size, rel_pos=rel_pos,
                window_mask=window_mask, border=border, return_weights=return_weights):
            return "triton"
    if q.device.type == "cpu" and "fused_cpu" in BACKENDS and neighborhood_cpu.ensure_built():
        return "fused_cpu"
    return "tiled" if "tiled" in BACKENDS else "reference"


def neighborhood_macs(q, k, v, kernel_size: int, rel_pos=None, window_mask=None, border: str = "mask",
                      backend: str = "auto", return_weights: bool = False) -> int:
    """Multiply-accumulates of `neighborhood_attention` (see the module docstring): its FLOP count is twice this."""
    b, heads, h, w, d = q.shape
    logit_width = 2 * d if rel_pos is not None else d
    return b * heads * h * w * kernel_size * kernel_size * (logit_width + v.shape[-1])


@counted_op("neighborhood_attention", macs=neighborhood_macs)
def neighborhood_attention(q, k, v, kernel_size: int, rel_pos=None, window_mask=None, border: str = "mask",
                           backend: str = "auto", return_weights: bool = False):
    """Local-window attention; see the module docstring. Returns out (B, heads, H, W, d) [, weights]."""
    _check(q, k, v, kernel_size, rel_pos, window_mask, border)
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, rel_pos, window_mask))
        backend = select_backend(q, needs_grad, k, v, kernel_size, rel_pos=rel_pos, window_mask=window_mask,
                                 border=border, return_weights=return_weights)
    elif backend == "triton" and q.device.type == "cuda":
        _ensure_triton()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))} or 'auto'")
    return BACKENDS[backend](q, k, v, kernel_size, rel_pos=rel_pos, window_mask=window_mask, border=border,
                             return_weights=return_weights)
