"""Fused Triton forward and backward kernels for neighbourhood attention.

Semantics are those of `common.ops.neighborhood.reference_attention` (the oracle):
for query pixel i of a (B, heads, H, W, d) map, window offsets o = (dy, dx) in
[-r, r]^2 (r = k // 2, row-major order), neighbour n(i, o) = i + o,

    s_io = q_i . (k_n(i,o) + rel_pos[o])         (no implicit scaling)
    l_io = s_io + log m_o                        (window_mask m, log 0 = -inf)
    P_io = softmax_o(l_io),  out_i = sum_o P_io v_n(i,o)

border="mask": o is dropped when n(i, o) is outside the image (clipped window);
border="zeros": it is kept with a zero key and value (logit q_i . rel_pos[o]).
Multiplying the softmax weights by m and renormalising is the same as adding
log m to the logits, which is how the kernels apply the window mask.

Algorithm (GEMM-based, flash-attention style)
---------------------------------------------
Forward (`_fwd_kernel`), one program per (query tile, batch, head). A tile is
TH x TW query pixels (BQ = TH*TW queries, a power of two >= 16). The union of
their windows is the (TH+2r) x (TW+2r) "key tile" anchored at the tile origin
minus r (it includes out-of-image positions, which load as zero keys/values).
The key tile is flattened and walked in chunks of BN keys; per chunk:
    S = Q K^T                        tl.dot, [BQ, BN], fp32 accumulation
    S += gather(Q R^T, offset)       relative term: Q R^T ([BQ, k*k], one tl.dot
                                     per program) gathered by each (query, key)
                                     pair's window offset (tl.gather)
    S += log m[offset]               window mask (pointer gather of k*k floats)
    S = -inf outside the window      (|dy| > r or |dx| > r, or outside the image
                                     in "mask" mode, or query outside the image)
    online softmax; acc += P V       tl.dot
Work is dense over the key tile, so the useful fraction is k^2 / (TH+2r)(TW+2r)
(k=7 with an 8x8 tile: 49/196), traded for tensor-core GEMMs instead of k^2
scalar dot products per query. Output is written in the input dtype and the
per-query logsumexp lse_i = log sum_o exp(l_io) in fp32 (+inf for a query whose
whole window is masked: then out_i = 0 and every weight is 0, as in the oracle).

Saved for backward: q, k, v, rel_pos, window_mask, out, lse (fp32, B*heads*H*W)
and, only when return_weights=True, the returned weights (needed for the
gradient that flows into them). No k*k-sized tensor is saved otherwise.

Backward, with delta_i = dO_i . out_i (+ sum_o P_io dW_io when the returned
weights receive a gradient dW), recomputing P = exp(l - lse):
    dP_io = dO_i . v_n(i,o) (+ dW_io),   dS_io = P_io (dP_io - delta_i)
    dq_i  = sum_o dS_io (k_n(i,o) + rel_pos[o])
    dk_j  = sum_{(i,o): n(i,o)=j} dS_io q_i,   dv_j = sum_{(i,o): n(i,o)=j} P_io dO_i
    drel_o = sum_{b,i} dS_io q_i                 (and over heads for a shared table)
    dm_o  = sum_{b,i} exp(s_io - lse_i) (dP_io - delta_i)
The last line is the derivative of the un-logged form P_io = e_io m_o / sum_a e_ia m_a
(e = exp s): dP_ia/dm_o = (e_io / Z_i)(delta_ao - P_ia), Z_i = sum_a e_ia m_a
= exp(lse_i), so it is finite and correct at m_o = 0 (where 1/m would not be).
- `_bwd_dq_kernel`: query tiles, same key-tile walk as the forward; dq by
  tl.dot(dS, K) plus tl.dot(dS_off, R) where dS_off [BQ, k*k] is dS gathered
  back from key-tile order to window-offset order. It also writes per-program
  partial sums of drel (tl.dot(dS_off^T, Q)) and dm; the wrapper reduces them
  with torch.sum (deterministic, no atomics).
- `_bwd_dkv_kernel`: key tiles; for each key pixel it walks the (TH+2r) x
  (TW+2r) tile of queries whose windows can contain it, recomputes S^T-side
  quantities (Q K^T, Q R^T gathered, lse) and accumulates dk = dS^T Q and
  dv = P^T dO with tl.dot. Every key is owned by exactly one program, so the
  result is deterministic (no atomics).
delta is one fused torch reduction in the wrapper.

fp32 inputs use IEEE fp32 dots by default (see "Tiling and launch" for tensor-core
options); bf16/fp16 inputs feed the tensor cores directly, P and dS are cast to
the input dtype for the P V / dS K GEMMs (as in flash attention), all
accumulation and softmax arithmetic is fp32, outputs are in the input dtype;
gradients of rel_pos and window_mask are returned in their own dtypes.

return_weights: the forward kernel makes a second pass over the key tile
and scatters exp(l - lse) into a zero-initialised (B, heads, H, W, k*k) tensor.

Tiling and launch
-----------------
`_config` picks TH x TW (TW <= 8, BQ <= 64, and BQ <= 8192 / k*k padded so the
[BQ, k*k] offset-order tiles of the backward stay in registers: BQ = 32 for
k >= 11) and BN <= 64; head dims are padded to a power of two >= 16 (masked
loads), k*k to a power of two >= 16. One 1-D grid of n_tiles * B * heads
programs, tiles fastest, so neighbouring tiles (which share halo keys) run
together and hit L2. fp32 inputs use IEEE dots by default (exact, but CUDA
cores); set torch.backends.cuda.matmul.allow_tf32 or FP32_PRECISION =
"tf32x3" / "tf32" to use tensor cores. TILE_OVERRIDE (tests) forces a tile.
Not autotuned yet: num_warps / num_stages / tile shapes are first guesses.

Limitations
-----------
- Odd kernel_size 1..13 tested (larger works but the k*k-wide offset tiles
  grow), head dims up to 128 (q/k and v dims may differ), any H, W >= 1
  (smaller than the kernel is fine). float32, float16, bfloat16 only.
- Dense work over the key tile: the useful fraction is k^2 / ((TH+2r)(TW+2r)),
  e.g. 49/196 for k=7, 9/100 for k=3 with 8x8 tiles; softmax exps are spent on
  the wasted entries too.
- window_mask must be >= 0 (log of a negative value is NaN). A query whose
  whole window is masked gets out = 0 and zero gradients (the oracle's
  clamp_min makes its mask gradient ~1/tiny there; the true gradient is 0/0).
- The drel partials buffer is (B*heads*n_tiles, k*k, d) fp32 (about k*k/BQ times
  the size of q) and is only allocated when rel_pos needs a gradient; the
  dmask partials are (B*heads*n_tiles, k*k).
- Under the interpreter (TRITON_INTERPRET=1, set before triton is imported)
  bf16 dots are computed with fp32 operands, because the interpreter's bf16
  tl.dot is wrong; on a GPU they run on the tensor cores.
- Index arithmetic inside one (batch, head) slice is int32 (H*W*max(d, k*k)
  < 2^31); the per-slice base offsets are int64.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.autograd.function import once_differentiable

try:  # triton is optional: `available()` reports whether this backend can run
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False


# triton.jit picks interpreter vs compiler when the kernels below are decorated, i.e. at import:
# setting TRITON_INTERPRET later does not switch an already imported module.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpret() -> bool:
    return _HAS_TRITON and _INTERPRET


def available() -> bool:
    """True when triton imports and there is a device to run it on (CUDA, or the interpreter)."""
    return _HAS_TRITON and (torch.cuda.is_available() or _interpret())


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Tests set this (e.g. dict(TH=4, TW=4, BN=16)) to force many small tiles and chunks on tiny inputs.
TILE_OVERRIDE: dict | None = None


def _config(h: int, w: int, kernel_size: int, d: int) -> dict:
    """Query/key tile sizes. TH x TW queries per program (>= 16 for tl.dot), BN keys per chunk."""
    if TILE_OVERRIDE is not None:
        cfg = dict(TH=4, TW=4, BN=16, num_warps=4, num_stages=2)
        cfg.update(TILE_OVERRIDE)
        return cfg
    kkp = max(16, _next_pow2(kernel_size * kernel_size))
    bq = max(16, min(64, 8192 // kkp))  # [BQ, k*k] fp32 offset-order tiles must fit in registers
    tw = min(8, _next_pow2(w), bq)
    th = min(_next_pow2(h), bq // tw)
    th = max(th, 16 // tw)
    r = kernel_size // 2
    nkt = (th + 2 * r) * (tw + 2 * r)
    bn = max(16, min(64, _next_pow2(nkt)))
    return dict(TH=th, TW=tw, BN=bn, num_warps=4 if max(d, 16) <= 64 else 8, num_stages=2)


if _HAS_TRITON:

    @triton.jit
    def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b with fp32 accumulation. UPCAST: fp32 operands (the interpreter's bf16 dot is wrong)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _query_tile(pid_t, n_tw, H, W, TH: tl.constexpr, TW: tl.constexpr):
        """Query pixel coordinates of tile pid_t: (qi local index, qy, qx, in-image)."""
        y0 = (pid_t // n_tw) * TH
        x0 = (pid_t % n_tw) * TW
        qi = tl.arange(0, TH * TW)
        qy = y0 + qi // TW
        qx = x0 + qi % TW
        return qi, qy, qx, (qy < H) & (qx < W), y0, x0

    @triton.jit
    def _window(ry, rx, cy, cx, row_ok, col_ok, R: tl.constexpr, KS: tl.constexpr):
        """Rows are queries at (ry, rx) [M], columns are keys at (cy, cx) [N]. Returns
        in-window [M, N] (|key - query| <= R on both axes, row and column valid) and the
        row-major window offset index (dy + R) * KS + (dx + R) [M, N] (0 outside)."""
        dy = cy[None, :] - ry[:, None]
        dx = cx[None, :] - rx[:, None]
        win = (dy <= R) & (dy >= -R) & (dx <= R) & (dx >= -R) & row_ok[:, None] & col_ok[None, :]
        off = tl.where(win, (dy + R) * KS + (dx + R), 0)
        return win, off

    @triton.jit
    def _chunk_scores(q, qr, k_ptr, k_base, c, y0, x0, qy, qx, q_ok, cd, H, W,
                      D: tl.constexpr, R: tl.constexpr, KS: tl.constexpr, KTW: tl.constexpr, NKT: tl.constexpr,
                      BN: tl.constexpr, HAS_REL: tl.constexpr, MASK_BORDER: tl.constexpr,
                      PREC: tl.constexpr, UPCAST: tl.constexpr):
        """One chunk of BN keys of the tile's halo: the keys, their pixel index and in-image flag, each
        query's window test and window offset for them, and the scores q . k (+ q . rel_pos[offset])
        before any masking. `qr` (q . rel_pos for every offset) is only read when HAS_REL."""
        kj = c + tl.arange(0, BN)
        ky = y0 - R + kj // KTW
        kx = x0 - R + kj % KTW
        kt_ok = kj < NKT
        k_img = kt_ok & (ky >= 0) & (ky < H) & (kx >= 0) & (kx < W)
        kp = ky * W + kx
        kt = tl.load(k_ptr + k_base + kp[:, None] * D + cd[None, :], mask=k_img[:, None] & (cd[None, :] < D),
                     other=0.0)
        if MASK_BORDER:
            win, off = _window(qy, qx, ky, kx, q_ok, k_img, R, KS)
        else:
            win, off = _window(qy, qx, ky, kx, q_ok, kt_ok, R, KS)
        s = _mm(q, tl.trans(kt), PREC, UPCAST)
        if HAS_REL:
            s += tl.gather(qr, off, 1)
        return kt, kp, k_img, win, off, s

    @triton.jit
    def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, rel_ptr, m_ptr, out_ptr, lse_ptr, w_ptr,
        H, W, HEADS, n_tw, n_tiles, rel_head_stride,
        D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
        KS: tl.constexpr, KKP: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, BN: tl.constexpr,
        HAS_REL: tl.constexpr, HAS_WM: tl.constexpr, MASK_BORDER: tl.constexpr,
        RETURN_W: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        R: tl.constexpr = KS // 2
        KK: tl.constexpr = KS * KS
        KTW: tl.constexpr = TW + 2 * R
        NKT: tl.constexpr = (TH + 2 * R) * KTW
        pid = tl.program_id(0)  # 1-D grid, tiles fastest: neighbouring tiles share halo keys in L2
        pid_t = pid % n_tiles
        bh = (pid // n_tiles).to(tl.int64)
        head = bh % HEADS
        HW = H * W
        qi, qy, qx, q_ok, y0, x0 = _query_tile(pid_t, n_tw, H, W, TH, TW)
        qp = qy * W + qx
        cd = tl.arange(0, DP)
        cv = tl.arange(0, DVP)
        q = tl.load(q_ptr + bh * HW * D + qp[:, None] * D + cd[None, :],
                    mask=q_ok[:, None] & (cd[None, :] < D), other=0.0)
        if HAS_REL:
            oo = tl.arange(0, KKP)
            relT = tl.load(rel_ptr + head * rel_head_stride + oo[None, :] * D + cd[:, None],
                           mask=(oo[None, :] < KK) & (cd[:, None] < D), other=0.0)
            qr = _mm(q, relT, PREC, UPCAST)  # [BQ, KKP] fp32
        else:
            qr = q  # unused: _chunk_scores reads qr only with HAS_REL
        m_i = tl.full([TH * TW], float("-inf"), tl.float32)
        l_i = tl.zeros([TH * TW], tl.float32)
        acc = tl.zeros([TH * TW, DVP], tl.float32)
        for c in range(0, NKT, BN):
            kt, kp, k_img, win, off, s = _chunk_scores(q, qr, k_ptr, bh * HW * D, c, y0, x0, qy, qx, q_ok, cd, H,
                                                       W, D, R, KS, KTW, NKT, BN, HAS_REL, MASK_BORDER, PREC,
                                                       UPCAST)
            vt = tl.load(v_ptr + bh * HW * DV + kp[:, None] * DV + cv[None, :],
                         mask=k_img[:, None] & (cv[None, :] < DV), other=0.0)
            if HAS_WM:
                s += tl.log(tl.load(m_ptr + head * KK + off, mask=win, other=1.0))
            s = tl.where(win, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(vt.dtype), vt, PREC, UPCAST)
            m_i = m_new
        nonempty = l_i > 0.0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("inf"))
        tl.store(out_ptr + bh * HW * DV + qp[:, None] * DV + cv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & (cv[None, :] < DV))
        tl.store(lse_ptr + bh * HW + qp, lse, mask=q_ok)
        if RETURN_W:  # second pass: scatter the normalised weights into (.., k*k) rows
            for c in range(0, NKT, BN):
                kt, kp, k_img, win, off, s = _chunk_scores(q, qr, k_ptr, bh * HW * D, c, y0, x0, qy, qx, q_ok, cd,
                                                           H, W, D, R, KS, KTW, NKT, BN, HAS_REL, MASK_BORDER,
                                                           PREC, UPCAST)
                if HAS_WM:
                    s += tl.log(tl.load(m_ptr + head * KK + off, mask=win, other=1.0))
                p = tl.exp(tl.where(win, s, float("-inf")) - lse[:, None])
                tl.store(w_ptr + (bh * HW + qp[:, None]) * KK + off, p.to(w_ptr.dtype.element_ty), mask=win)

    @triton.jit
    def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, rel_ptr, m_ptr, lse_ptr, do_ptr, delta_ptr, dw_ptr,
        dq_ptr, drel_part_ptr, dm_part_ptr,
        H, W, HEADS, n_tw, n_tiles, rel_head_stride,
        D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
        KS: tl.constexpr, KKP: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, BN: tl.constexpr,
        HAS_REL: tl.constexpr, HAS_WM: tl.constexpr, MASK_BORDER: tl.constexpr,
        HAS_DW: tl.constexpr, REL_GRAD: tl.constexpr, WM_GRAD: tl.constexpr,
        PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        R: tl.constexpr = KS // 2
        KK: tl.constexpr = KS * KS
        KTW: tl.constexpr = TW + 2 * R
        NKT: tl.constexpr = (TH + 2 * R) * KTW
        BQ: tl.constexpr = TH * TW
        pid = tl.program_id(0)  # 1-D grid, tiles fastest: neighbouring tiles share halo keys in L2
        pid_t = pid % n_tiles
        bh = (pid // n_tiles).to(tl.int64)
        head = bh % HEADS
        HW = H * W
        qi, qy, qx, q_ok, y0, x0 = _query_tile(pid_t, n_tw, H, W, TH, TW)
        qp = qy * W + qx
        cd = tl.arange(0, DP)
        cv = tl.arange(0, DVP)
        q = tl.load(q_ptr + bh * HW * D + qp[:, None] * D + cd[None, :],
                    mask=q_ok[:, None] & (cd[None, :] < D), other=0.0)
        do = tl.load(do_ptr + bh * HW * DV + qp[:, None] * DV + cv[None, :],
                     mask=q_ok[:, None] & (cv[None, :] < DV), other=0.0)
        lse = tl.load(lse_ptr + bh * HW + qp, mask=q_ok, other=float("inf"))
        delta = tl.load(delta_ptr + bh * HW + qp, mask=q_ok, other=0.0)
        oo = tl.arange(0, KKP)
        if HAS_REL:
            rel = tl.load(rel_ptr + head * rel_head_stride + oo[:, None] * D + cd[None, :],
                          mask=(oo[:, None] < KK) & (cd[None, :] < D), other=0.0)  # [KKP, DP]
            qr = _mm(q, tl.trans(rel), PREC, UPCAST)
        else:
            qr = q  # unused: _chunk_scores reads qr only with HAS_REL
        # key-tile index of (query qi, window offset o), to gather dS back into offset order
        kidx = ((qi // TW)[:, None] + oo[None, :] // KS) * KTW + (qi % TW)[:, None] + oo[None, :] % KS
        o_ok = (oo < KK)[None, :] & q_ok[:, None]
        dq = tl.zeros([BQ, DP], tl.float32)
        ds_off = tl.zeros([BQ, KKP], tl.float32)
        g_off = tl.zeros([BQ, KKP], tl.float32)
        for c in range(0, NKT, BN):
            kt, kp, k_img, win, off, s = _chunk_scores(q, qr, k_ptr, bh * HW * D, c, y0, x0, qy, qx, q_ok, cd, H,
                                                       W, D, R, KS, KTW, NKT, BN, HAS_REL, MASK_BORDER, PREC,
                                                       UPCAST)
            vt = tl.load(v_ptr + bh * HW * DV + kp[:, None] * DV + cv[None, :],
                         mask=k_img[:, None] & (cv[None, :] < DV), other=0.0)
            s = tl.where(win, s, float("-inf"))
            if HAS_WM:
                mval = tl.load(m_ptr + head * KK + off, mask=win, other=0.0)
                p = tl.exp(s + tl.log(mval) - lse[:, None])
            else:
                p = tl.exp(s - lse[:, None])
            dp = _mm(do, tl.trans(vt), PREC, UPCAST)
            if HAS_DW:
                dp += tl.load(dw_ptr + (bh * HW + qp[:, None]) * KK + off, mask=win, other=0.0).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(kt.dtype), kt, PREC, UPCAST)
            if HAS_REL or WM_GRAD:
                loc = kidx - c
                sel = o_ok & (loc >= 0) & (loc < BN)
                loc = tl.where(sel, loc, 0)
                if HAS_REL:
                    ds_off += tl.where(sel, tl.gather(ds, loc, 1), 0.0)
                if WM_GRAD:
                    g = tl.exp(s - lse[:, None]) * (dp - delta[:, None])
                    g_off += tl.where(sel, tl.gather(g, loc, 1), 0.0)
        if HAS_REL:
            dq += _mm(ds_off.to(rel.dtype), rel, PREC, UPCAST)
        tl.store(dq_ptr + bh * HW * D + qp[:, None] * D + cd[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & (cd[None, :] < D))
        part = bh * n_tiles + pid_t
        if REL_GRAD:
            drel = _mm(tl.trans(ds_off.to(q.dtype)), q, PREC, UPCAST)  # [KKP, DP]
            tl.store(drel_part_ptr + part * KK * D + oo[:, None] * D + cd[None, :], drel,
                     mask=(oo[:, None] < KK) & (cd[None, :] < D))
        if WM_GRAD:
            tl.store(dm_part_ptr + part * KK + oo, tl.sum(g_off, 0), mask=oo < KK)

    @triton.jit
    def _bwd_dkv_kernel(
        q_ptr, k_ptr, v_ptr, rel_ptr, m_ptr, lse_ptr, do_ptr, delta_ptr, dw_ptr,
        dk_ptr, dv_ptr,
        H, W, HEADS, n_tw, n_tiles, rel_head_stride,
        D: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr,
        KS: tl.constexpr, KKP: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, BN: tl.constexpr,
        HAS_REL: tl.constexpr, HAS_WM: tl.constexpr,
        HAS_DW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        R: tl.constexpr = KS // 2
        KK: tl.constexpr = KS * KS
        QTW: tl.constexpr = TW + 2 * R
        NQT: tl.constexpr = (TH + 2 * R) * QTW
        BK: tl.constexpr = TH * TW
        pid = tl.program_id(0)  # 1-D grid, tiles fastest: neighbouring tiles share halo keys in L2
        pid_t = pid % n_tiles
        bh = (pid // n_tiles).to(tl.int64)
        head = bh % HEADS
        HW = H * W
        # the tile of KEY pixels this program owns (same geometry as a query tile)
        ki, ky, kx, k_ok, y0, x0 = _query_tile(pid_t, n_tw, H, W, TH, TW)
        kp = ky * W + kx
        cd = tl.arange(0, DP)
        cv = tl.arange(0, DVP)
        kt = tl.load(k_ptr + bh * HW * D + kp[:, None] * D + cd[None, :],
                     mask=k_ok[:, None] & (cd[None, :] < D), other=0.0)
        vt = tl.load(v_ptr + bh * HW * DV + kp[:, None] * DV + cv[None, :],
                     mask=k_ok[:, None] & (cv[None, :] < DV), other=0.0)
        if HAS_REL:
            oo = tl.arange(0, KKP)
            relT = tl.load(rel_ptr + head * rel_head_stride + oo[None, :] * D + cd[:, None],
                           mask=(oo[None, :] < KK) & (cd[:, None] < D), other=0.0)  # [DP, KKP]
        dk = tl.zeros([BK, DP], tl.float32)
        dv = tl.zeros([BK, DVP], tl.float32)
        for c in range(0, NQT, BN):
            qj = c + tl.arange(0, BN)
            qy = y0 - R + qj // QTW
            qx = x0 - R + qj % QTW
            q_ok = (qj < NQT) & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            qp = qy * W + qx
            qc = tl.load(q_ptr + bh * HW * D + qp[:, None] * D + cd[None, :],
                         mask=q_ok[:, None] & (cd[None, :] < D), other=0.0)
            doc = tl.load(do_ptr + bh * HW * DV + qp[:, None] * DV + cv[None, :],
                          mask=q_ok[:, None] & (cv[None, :] < DV), other=0.0)
            lse = tl.load(lse_ptr + bh * HW + qp, mask=q_ok, other=float("inf"))
            delta = tl.load(delta_ptr + bh * HW + qp, mask=q_ok, other=0.0)
            # rows = queries [BN], columns = this program's keys [BK]; keys are in the image
            win, off = _window(qy, qx, ky, kx, q_ok, k_ok, R, KS)
            s = _mm(qc, tl.trans(kt), PREC, UPCAST)
            if HAS_REL:
                qr = _mm(qc, relT, PREC, UPCAST)  # [BN, KKP]
                s += tl.gather(qr, off, 1)
            s = tl.where(win, s, float("-inf"))
            if HAS_WM:
                mval = tl.load(m_ptr + head * KK + off, mask=win, other=0.0)
                s += tl.log(mval)
            p = tl.exp(s - lse[:, None])  # [BN, BK]
            dv += _mm(tl.trans(p.to(doc.dtype)), doc, PREC, UPCAST)
            dp = _mm(doc, tl.trans(vt), PREC, UPCAST)
            if HAS_DW:
                dp += tl.load(dw_ptr + (bh * HW + qp[:, None]) * KK + off, mask=win, other=0.0).to(tl.float32)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds.to(qc.dtype)), qc, PREC, UPCAST)
        tl.store(dk_ptr + bh * HW * D + kp[:, None] * D + cd[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & (cd[None, :] < D))
        tl.store(dv_ptr + bh * HW * DV + kp[:, None] * DV + cv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & (cv[None, :] < DV))


# tl.dot input precision for fp32 inputs; None: "ieee" (exact, CUDA cores) unless
# torch.backends.cuda.matmul.allow_tf32 is set ("tf32"). "tf32x3" is a near-fp32 tensor-core option.
FP32_PRECISION: str | None = None


def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # not used for 16-bit operands (tensor cores, fp32 accumulation)
    if FP32_PRECISION is not None:
        return FP32_PRECISION
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


class _Geometry:
    """Shapes, launch grid and compile-time flags shared by the three kernels."""

    def __init__(self, q, v, kernel_size):
        b, heads, h, w, d = q.shape
        self.b, self.heads, self.h, self.w, self.d, self.dv = b, heads, h, w, d, v.shape[-1]
        self.ks = kernel_size
        self.kk = kernel_size * kernel_size
        cfg = _config(h, w, kernel_size, max(d, self.dv))
        self.th, self.tw, self.bn = cfg["TH"], cfg["TW"], cfg["BN"]
        self.num_warps, self.num_stages = cfg["num_warps"], cfg["num_stages"]
        self.n_tw = triton.cdiv(w, self.tw)
        self.n_tiles = triton.cdiv(h, self.th) * self.n_tw
        self.grid = (self.n_tiles * b * heads,)
        self.consts = dict(D=d, DV=self.dv, DP=max(16, _next_pow2(d)), DVP=max(16, _next_pow2(self.dv)),
                           KS=kernel_size, KKP=max(16, _next_pow2(self.kk)),
                           TH=self.th, TW=self.tw, BN=self.bn, PREC=_precision(q.dtype),
                           UPCAST=_interpret() and q.dtype == torch.bfloat16)

    def launch(self):
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (triton uses the current CUDA device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _TritonNeighborhoodAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, rel_pos, window_mask, kernel_size, border, return_weights):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = _Geometry(q, v, kernel_size)
        rel = rel_pos.to(q.dtype).contiguous() if rel_pos is not None else None
        mask = window_mask.to(torch.float32).contiguous() if window_mask is not None else None
        rel_head_stride = (g.kk * g.d if rel.dim() == 4 else 0) if rel is not None else 0
        out = torch.empty(q.shape[:4] + (g.dv,), device=q.device, dtype=q.dtype)
        lse = torch.empty(q.shape[:4], device=q.device, dtype=torch.float32)
        weights = (torch.zeros(q.shape[:4] + (g.kk,), device=q.device, dtype=q.dtype) if return_weights
                   else lse)  # placeholder pointer when unused
        dummy = lse
        with _on_device(q):
            _fwd_kernel[g.grid](
                q, k, v, rel if rel is not None else dummy, mask if mask is not None else dummy, out, lse, weights,
                g.h, g.w, g.heads, g.n_tw, g.n_tiles, rel_head_stride,
                HAS_REL=rel is not None, HAS_WM=mask is not None, MASK_BORDER=border == "mask",
                RETURN_W=return_weights, **g.consts, **g.launch())
        ctx.geometry = g
        ctx.border = border
        ctx.return_weights = return_weights
        ctx.rel_info = (rel_pos.dtype, rel_head_stride) if rel_pos is not None else None
        ctx.mask_dtype = window_mask.dtype if window_mask is not None else None
        ctx.save_for_backward(q, k, v, rel, mask, out, lse, weights if return_weights else None)
        ctx.set_materialize_grads(False)
        if return_weights:
            return out, weights
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_weights):
        q, k, v, rel, mask, out, lse, weights = ctx.saved_tensors
        g = ctx.geometry
        need_q, need_k, need_v, need_rel, need_mask = ctx.needs_input_grad[:5]
        if d_out is None and d_weights is None:
            return (None,) * 8
        d_out = (torch.zeros_like(out) if d_out is None else d_out.to(out.dtype).contiguous())
        delta = (d_out.float() * out.float()).sum(-1)
        has_dw = ctx.return_weights and d_weights is not None
        if has_dw:
            d_weights = d_weights.contiguous()
            delta = delta + (d_weights.float() * weights.float()).sum(-1)
        delta = delta.contiguous()
        dummy = lse
        rel_arg = rel if rel is not None else dummy
        mask_arg = mask if mask is not None else dummy
        dw_arg = d_weights if has_dw else dummy
        rel_head_stride = ctx.rel_info[1] if rel is not None else 0
        dq = dk = dv = drel = dmask = None
        rel_grad = rel is not None and need_rel
        wm_grad = mask is not None and need_mask
        if need_q or rel_grad or wm_grad:
            dq = torch.empty_like(q)
            drel_part = (torch.empty((g.b * g.heads * g.n_tiles, g.kk, g.d), device=q.device, dtype=torch.float32)
                         if rel_grad else dummy)
            dm_part = (torch.empty((g.b * g.heads * g.n_tiles, g.kk), device=q.device, dtype=torch.float32)
                       if wm_grad else dummy)
            with _on_device(q):
                _bwd_dq_kernel[g.grid](
                    q, k, v, rel_arg, mask_arg, lse, d_out, delta, dw_arg, dq, drel_part, dm_part,
                    g.h, g.w, g.heads, g.n_tw, g.n_tiles, rel_head_stride,
                    HAS_REL=rel is not None, HAS_WM=mask is not None, MASK_BORDER=ctx.border == "mask",
                    HAS_DW=has_dw, REL_GRAD=rel_grad, WM_GRAD=wm_grad, **g.consts, **g.launch())
            if rel_grad:
                drel_part = drel_part.view(g.b, g.heads, g.n_tiles, g.kk, g.d)
                dims = (0, 2) if rel.dim() == 4 else (0, 1, 2)
                drel = drel_part.sum(dims).reshape(rel.shape).to(ctx.rel_info[0])
            if wm_grad:
                dmask = (dm_part.view(g.b, g.heads, g.n_tiles, g.kk).sum((0, 2))
                         .reshape(g.heads, g.ks, g.ks).to(ctx.mask_dtype))
            if not need_q:
                dq = None
        if need_k or need_v:
            dk = torch.empty_like(k)
            dv = torch.empty_like(v)
            with _on_device(q):
                _bwd_dkv_kernel[g.grid](
                    q, k, v, rel_arg, mask_arg, lse, d_out, delta, dw_arg, dk, dv,
                    g.h, g.w, g.heads, g.n_tw, g.n_tiles, rel_head_stride,
                    HAS_REL=rel is not None, HAS_WM=mask is not None, HAS_DW=has_dw, **g.consts, **g.launch())
            dk = dk if need_k else None
            dv = dv if need_v else None
        return dq, dk, dv, drel, dmask, None, None, None


def triton_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask", return_weights=False):
    """Fused neighbourhood attention (see the module docstring); same semantics and return as the reference."""
    if not _HAS_TRITON:
        raise RuntimeError("the triton backend needs the triton package")
    if q.device.type != "cuda" and not _interpret():
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")
    if q.dim() != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q, k, v must be (B, heads, H, W, d) with matching shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if border not in ("mask", "zeros"):
        raise ValueError(f"border must be 'mask' or 'zeros', got {border!r}")
    heads, d = q.shape[1], q.shape[-1]
    if rel_pos is not None and tuple(rel_pos.shape) not in ((kernel_size, kernel_size, d),
                                                           (heads, kernel_size, kernel_size, d)):
        raise ValueError(f"rel_pos must be (k, k, d) or (heads, k, k, d), got {tuple(rel_pos.shape)}")
    if window_mask is not None and tuple(window_mask.shape) != (heads, kernel_size, kernel_size):
        raise ValueError(f"window_mask must be (heads, k, k), got {tuple(window_mask.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16, got {q.dtype}")
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    out, weights = _TritonNeighborhoodAttention.apply(q, k, v, rel_pos, window_mask, kernel_size, border,
                                                      return_weights)
    return (out, weights) if return_weights else out
