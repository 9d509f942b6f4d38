"""The "fused_cpu" backend of neighbourhood attention: one C++ kernel per direction (csrc/neighborhood_cpu.cpp).

Built on first use by `jit_build` (one compiler call, about a minute, then cached per machine) and loaded as
torch ops: torch.ops.neighborhood_cpu.forward and .backward, and .attention, the two with autograd (a C++
torch::autograd::Function; the source says why not a Python one). `ensure_built()` says whether it is usable;
when it cannot be built (no compiler, a failed compile) or does not match the reference on a small problem,
the caller falls back to the tiled backend after one warning.

How it computes (the math is the module docstring of common/ops/neighborhood.py):

- layout: q, k, v and grad_out are copied once into channel-major planes (B, heads, C, H + 2r, W' + 2r), the
  image zero-padded by r = k // 2 on every side and each row rounded up to whole SIMD vectors (W'), or to
  half of one where the last pixels fit in it (a 56-pixel row is 3 x 16 + 8 lanes, not 4 x 16); a
  convolution output split into heads is already channel-major, so that copy is a plain memcpy of rows. One
  SIMD vector holds consecutive query pixels of one channel, so each window dot product is a vertical
  multiply-add (q[c] * (k[c] shifted by the offset + rel[o][c])) with no horizontal reduction, and the
  padding removes every bounds check.
- forward, per block of query pixels: the logits of its window offsets (those in the image for
  border="mask", those whose window_mask is non-zero), the softmax times the mask, renormalised, and the
  weighted sum of values, all in registers and a few KiB of stack; saved for backward are the inputs and
  each query's softmax maximum and inverse normaliser (8 bytes per pixel and head), nothing per window
  offset.
- rows together: unless a window_mask has zero columns to skip, three query rows (or two) are computed at
  once, one vector of each. Key row y + t is window row t - i of query row y + i, so each key and value
  vector read serves every row that sees it: on Zen 4, with a key load and the embedding's add per
  multiply-add, one row takes 2.2 times the multiply-adds' own time, three rows sharing each load 1.2 times
  (bench/window_loads.cpp). fwd+bwd, 2 threads: 0.91-0.92x on the bench's 32x32 and 56x56 shapes at k=7,
  0.85-0.90x at k=11, 0.95-0.96x at d=32 and at k=3; rows at the image's top and bottom too: 0.90-0.95x on
  4x4 to 16x16 maps.
- backward, per (batch, head) plane: the logits and weights recomputed from those statistics,
  dP = grad_out . v (+ the weights' own gradient), dS = P (dP - sum P dP), dq = sum dS (k + rel); P and dS
  go to two per-thread planes, from which dk = sum dS q and dv = sum P grad_out are gathered per key (the
  queries that see a key are a fixed set of shifted positions), so gradients accumulate in registers, never
  by scattered adds; d rel and d window_mask are sums over the plane, added over planes in plane order.
- threads: torch's count (torch.set_num_threads), on a pool of the kernel's own whose threads sleep while
  idle, so OpenMP's wait policy does not touch it; items (bands of rows forward, planes backward) are handed
  out one by one. Each plane is computed in the same order whatever the thread count, so the backward pass is
  deterministic (bitwise).
- dtypes: fp32 and fp64 are computed in their own precision; fp16 and bf16 are converted to fp32 by the
  layout copy and the results cast back.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch

from common.ops import jit_build
from common.ops.fresh_thread import in_fresh_thread

NAME = "neighborhood_cpu"
SOURCE = Path(__file__).resolve().parent / "csrc" / "neighborhood_cpu.cpp"
FLAGS = ["-shared", "-fPIC", "-O3", "-march=native", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG",
         "-w"]

_LOCK = threading.Lock()
_STATE: dict = {"tried": False, "ok": False, "problem": None}


STATS_ALIGN = 16  # the row length of the saved softmax statistics is rounded up to this (see the C++ source)


def _build_and_load() -> None:
    compile_flags, link_flags = jit_build.torch_flags()
    path = jit_build.build(NAME, SOURCE, FLAGS + compile_flags + link_flags)
    torch.ops.load_library(str(path))
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations of the two ops, so that tracing (torch.compile, FakeTensor) can pass through."""

    def compute(t):
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("neighborhood_cpu::forward")
    def _forward(q, k, v, rel_pos, window_mask, kernel_size, border_mask, return_weights):
        b, heads, h, w, _ = q.shape
        dtype = compute(q)
        weights_shape = (b, heads, kernel_size * kernel_size, h, w) if return_weights else (0,)
        return [q.new_empty((b, heads, v.shape[-1], h, w), dtype=dtype), q.new_empty(weights_shape, dtype=dtype),
                q.new_empty((2, b, heads, h, -(-w // STATS_ALIGN) * STATS_ALIGN), dtype=dtype)]

    @torch.library.register_fake("neighborhood_cpu::backward")
    def _backward(grad_out, grad_weights, q, k, v, stats, rel_pos, window_mask, kernel_size, border_mask, need_bits):
        b, heads, h, w, d = q.shape
        dtype, kk = stats.dtype, kernel_size * kernel_size
        shapes = [(b, heads, d, h, w) if need_bits & 1 else (0,), (b, heads, d, h, w) if need_bits & 2 else (0,),
                  (b, heads, v.shape[-1], h, w) if need_bits & 4 and grad_out is not None else (0,),
                  (rel_pos.numel() // (kk * d), kk, d) if need_bits & 8 and rel_pos is not None else (0,),
                  (heads, kk) if need_bits & 16 and window_mask is not None else (0,)]
        return [q.new_empty(shape, dtype=dtype) for shape in shapes]


def ensure_built(warn: bool = True) -> bool:
    """Build (first use on this machine), load (first use in this process) and check the kernel once.
    Returns whether it is usable; when not, warns once (unless warn=False) with the reason."""
    if _STATE["tried"]:  # the common case, without the lock (which torch.compile cannot trace)
        return _STATE["ok"]
    with _LOCK:
        if not _STATE["tried"]:
            try:
                _build_and_load()
                problem = in_fresh_thread(_self_check, name="neighborhood_cpu self-check")
            except jit_build.BuildError as exc:
                problem = str(exc)
            except (OSError, RuntimeError) as exc:  # loading or running a broken library
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            _STATE["ok"], _STATE["problem"], _STATE["tried"] = problem is None, problem, True
            if problem is not None and warn:
                warnings.warn(f"neighborhood_attention: the fused CPU kernel is unavailable ({problem}); using the "
                              "'tiled' backend instead, which is several times slower", RuntimeWarning, stacklevel=3)
    return _STATE["ok"]


def problem() -> str | None:
    """Why the kernel is unusable (None if it is usable or has not been tried)."""
    return _STATE["problem"]


def _self_check() -> str | None:
    """Forward and every gradient against the reference on one small problem (a miscompiled kernel must not
    silently train a model); None if they agree."""
    from common.ops.neighborhood import reference_attention

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 2, 6, 19, 4, generator=gen, requires_grad=True) for _ in range(3)]
    rel_pos = torch.randn(2, 5, 5, 4, generator=gen, requires_grad=True)
    mask = torch.rand(2, 5, 5, generator=gen).requires_grad_()
    results = []
    for fn in (fused_attention, reference_attention):
        out, weights = fn(*inputs, 5, rel_pos=rel_pos, window_mask=mask, border="mask", return_weights=True)
        loss = (out * out).sum() + (weights * weights[..., :1]).sum()
        results.append([out, weights, *torch.autograd.grad(loss, [*inputs, rel_pos, mask])])
    if all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(*results)):
        return None
    return "it disagrees with the reference on a self-check"


def fused_attention(q, k, v, kernel_size, rel_pos=None, window_mask=None, border="mask", return_weights=False):
    """The fused kernel itself (call `ensure_built()` first); same results as `reference_attention`."""
    outputs = torch.ops.neighborhood_cpu.attention(q, k, v, rel_pos, window_mask, kernel_size, border == "mask",
                                                   return_weights)
    return (outputs[0], outputs[1]) if return_weights else outputs[0]
