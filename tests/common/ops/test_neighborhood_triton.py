"""The fused Triton neighbourhood-attention kernels against the reference (unfold) oracle.

On a machine without a GPU the kernels run under the Triton interpreter, which
must be switched on (TRITON_INTERPRET=1) before triton is first imported. The
pytest process may already have imported triton, so the interpreter checks run
in ONE subprocess (this file executed as a script) that checks every case and
prints a JSON report; the tests then assert on that report, one test per case.
With CUDA the same cases, plus larger shapes and half precision, run in-process.

Every case compares the forward output, the returned weights and the gradients
of ALL inputs (q, k, v, rel_pos in both shapes, window_mask) with
`common.ops.neighborhood.reference_attention` evaluated in float64 on the same
inputs. Errors are max |triton - reference| / max(1, max |reference|), per tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton cannot be imported")

REPO = Path(__file__).resolve().parents[3]
SMALL_TILES = dict(TH=4, TW=4, BN=16)  # forces several query tiles and key chunks on tiny maps

# name -> case. Keys: shape (B, heads, H, W, d), dv (value dim, default d), ks, border,
# rel (None | "shared" | "head"), mask (None | "grad" | "fixed" | "dead_corner"),
# weights (return_weights), tiles (tile override or None), noncontig, dtype, mixed (rel_pos and
# window_mask stay fp32 while q, k, v are 16-bit, as under autocast).
CASES: dict[str, dict] = {
    "k3_mask_plain_w": dict(shape=(2, 2, 5, 7, 4), ks=3, border="mask", weights=True, tiles=SMALL_TILES),
    "k3_zeros_plain": dict(shape=(1, 2, 5, 7, 4), ks=3, border="zeros"),
    "k3_mask_relshared_maskgrad_w": dict(shape=(1, 2, 5, 7, 8), ks=3, border="mask", rel="shared",
                                         mask="grad", weights=True),
    "k3_zeros_relhead_maskgrad_w_tiles": dict(shape=(2, 2, 5, 7, 8), ks=3, border="zeros", rel="head",
                                              mask="grad", weights=True, tiles=SMALL_TILES),
    "k5_mask_relhead_maskgrad_tiles": dict(shape=(1, 2, 6, 6, 4), ks=5, border="mask", rel="head",
                                           mask="grad", tiles=SMALL_TILES),
    "k5_zeros_relshared_maskgrad_w": dict(shape=(1, 2, 6, 6, 4), ks=5, border="zeros", rel="shared",
                                          mask="grad", weights=True),
    "k5_mask_relhead_small_image": dict(shape=(1, 2, 3, 4, 8), ks=5, border="mask", rel="head"),
    "k5_zeros_relshared_mask_small_image_w": dict(shape=(1, 2, 3, 4, 4), ks=5, border="zeros",
                                                  rel="shared", mask="grad", weights=True),
    "k7_mask_relhead_maskgrad_w_tiles": dict(shape=(1, 2, 6, 6, 4), ks=7, border="mask", rel="head",
                                             mask="grad", weights=True, tiles=SMALL_TILES),
    "k7_zeros_relshared_maskfixed_small_image": dict(shape=(1, 2, 3, 4, 4), ks=7, border="zeros",
                                                     rel="shared", mask="fixed"),
    "k3_odd_dims_noncontig_w": dict(shape=(1, 2, 5, 7, 5), dv=6, ks=3, border="mask", rel="shared",
                                    mask="grad", weights=True, noncontig=True, tiles=SMALL_TILES),
    "k13_d128_zeros_w": dict(shape=(1, 1, 3, 5, 128), ks=13, border="zeros", rel="head", mask="grad",
                             weights=True),
    "k1_mask": dict(shape=(1, 2, 3, 4, 4), ks=1, border="mask", rel="head", mask="grad", weights=True),
    "k1_zeros": dict(shape=(1, 2, 3, 4, 4), ks=1, border="zeros", rel="shared"),
    "k3_mask_dead_corner_row": dict(shape=(1, 2, 5, 7, 4), ks=3, border="mask", rel="head",
                                    mask="dead_corner", weights=True),
    "k3_default_tiles_multi": dict(shape=(1, 2, 10, 11, 4), ks=3, border="zeros", rel="head", mask="grad"),
    "k3_bf16_mixed_params": dict(shape=(1, 2, 5, 7, 8), ks=3, border="zeros", rel="shared", mask="grad",
                                 weights=True, dtype="bfloat16", mixed=True),
    "k3_fp16": dict(shape=(1, 2, 5, 7, 8), ks=3, border="mask", rel="head", mask="grad", weights=True,
                    dtype="float16"),
}

# extra, larger cases for a real GPU (too slow for the interpreter)
GPU_CASES: dict[str, dict] = {
    "gpu_k7_32x32_d32": dict(shape=(2, 4, 32, 32, 32), ks=7, border="mask", rel="head", mask="grad",
                             weights=True),
    "gpu_k7_zeros_31x17_d64": dict(shape=(2, 2, 31, 17, 64), ks=7, border="zeros", rel="shared",
                                   mask="grad"),
    "gpu_k13_23x19_d16": dict(shape=(1, 2, 23, 19, 16), ks=13, border="mask", rel="head", mask="grad"),
    "gpu_k5_d128": dict(shape=(1, 2, 12, 20, 128), ks=5, border="zeros", rel="head", mask="grad",
                        weights=True),
    "gpu_k9_d24_dv40": dict(shape=(2, 3, 15, 9, 24), dv=40, ks=9, border="mask", rel="shared"),
    "gpu_k7_bf16": dict(shape=(2, 4, 32, 32, 32), ks=7, border="mask", rel="head", mask="grad",
                        dtype="bfloat16"),
    "gpu_k7_fp16_zeros": dict(shape=(2, 4, 16, 24, 64), ks=7, border="zeros", rel="shared", mask="grad",
                              weights=True, dtype="float16"),
}

TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 6e-2}


def _make_inputs(case: dict, device: str, gen: torch.Generator):
    b, heads, h, w, d = case["shape"]
    dv = case.get("dv", d)
    ks = case["ks"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    q, k = rnd(b, heads, h, w, d, scale=0.7), rnd(b, heads, h, w, d, scale=0.7)
    v = rnd(b, heads, h, w, dv)
    rel = {None: None, "shared": lambda: rnd(ks, ks, d, scale=0.5),
           "head": lambda: rnd(heads, ks, ks, d, scale=0.5)}[case.get("rel")]
    rel = rel() if rel is not None else None
    mask = None
    if case.get("mask") is not None:
        mask = torch.rand(heads, ks, ks, generator=gen, dtype=torch.float64).to(device) * 0.9 + 0.1
        if case["mask"] in ("grad", "fixed") and ks > 1:
            mask[0, 0, 0] = 0.0  # an excluded offset: its gradient must stay finite and correct
            mask[-1, -1, ks // 2] = 0.0
        if case["mask"] == "dead_corner":  # query (0, 0) of head 0 sees only masked keys
            mask[0, ks // 2:, ks // 2:] = 0.0
    return q, k, v, rel, mask


def _check_case(name: str, case: dict, device: str) -> dict:
    from common.ops import neighborhood_triton as nt
    from common.ops.neighborhood import reference_attention

    dtype = getattr(torch, case.get("dtype", "float32"))
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v, rel, mask = _make_inputs(case, device, gen)
    ks, border, want_w = case["ks"], case["border"], case.get("weights", False)
    mask_grad = case.get("mask") in ("grad", "dead_corner")

    def leaves(cast, cast_params):
        out = [cast(t).detach().requires_grad_(True) for t in (q, k, v)]
        out.append(cast_params(rel).detach().requires_grad_(True) if rel is not None else None)
        out.append(cast_params(mask).detach().requires_grad_(mask_grad) if mask is not None else None)
        return out

    def as_dtype(t):
        t = t.to(dtype)
        if case.get("noncontig"):  # same values, transposed storage
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        return t

    lt = leaves(as_dtype, (lambda t: t.float()) if case.get("mixed") else as_dtype)
    lr = leaves(lambda t: t.double(), lambda t: t.double())
    nt.TILE_OVERRIDE = case.get("tiles")
    t0 = time.time()
    try:
        res_t = nt.triton_attention(*lt[:3], ks, rel_pos=lt[3], window_mask=lt[4], border=border,
                                    return_weights=want_w)
    finally:
        nt.TILE_OVERRIDE = None
    res_r = reference_attention(*lr[:3], ks, rel_pos=lr[3], window_mask=lr[4], border=border,
                                return_weights=want_w)
    outs_t = res_t if want_w else (res_t,)
    outs_r = res_r if want_w else (res_r,)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device) for o in outs_r]
    loss_t = sum((o.double() * g).sum() for o, g in zip(outs_t, upstream))
    loss_r = sum((o * g).sum() for o, g in zip(outs_r, upstream))
    names = ["q", "k", "v", "rel_pos", "window_mask"]
    # (a dead_corner row passes no gradient to anything, the mask included: the op's convention for 0/0)
    idx = [i for i, t in enumerate(lt) if t is not None and t.requires_grad]
    grads_t = torch.autograd.grad(loss_t, [lt[i] for i in idx])
    grads_r = torch.autograd.grad(loss_r, [lr[i] for i in idx])
    seconds = time.time() - t0

    errors, bad = {}, []

    def compare(key, a, r, want_dtype=dtype):
        if a.shape != r.shape or a.dtype != want_dtype:
            bad.append(f"{key}: shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(r.shape)} {want_dtype}")
            return
        a = a.double()
        if not torch.isfinite(a).all():
            bad.append(f"{key}: non-finite values")
        err = ((a - r).abs().max() / r.abs().max().clamp_min(1.0)).item() if r.numel() else 0.0
        errors[key] = err

    compare("out", outs_t[0], outs_r[0])
    if want_w:
        compare("weights", outs_t[1], outs_r[1])
    for i, gt, gr in zip(idx, grads_t, grads_r):
        compare("d" + names[i], gt, gr, lt[i].dtype)
    tol = TOL[str(dtype).split(".")[-1]]
    ok = not bad and all(e <= tol for e in errors.values())
    return dict(name=name, ok=ok, tol=tol, errors=errors, problems=bad, seconds=round(seconds, 3))


def run_all(cases: dict[str, dict], device: str) -> list[dict]:
    return [_check_case(name, case, device) for name, case in cases.items()]


FLOPS_CASE = dict(shape=(1, 2, 5, 7, 4), dv=6, ks=3, rel="head", mask="grad")


def count_flops(device: str) -> dict:
    """`neighborhood_attention(backend="triton")` forward and backward under a FlopCounterMode: what the
    counter saw, next to `neighborhood_macs` (the kernels launch no aten op the counter could count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from common.ops import neighborhood as nb
    from common.ops import neighborhood_triton as nt

    if "triton" not in nb.BACKENDS:  # under the interpreter: "auto" registers it only for CUDA tensors
        nb.register_backend("triton", nt.triton_attention)
    gen = torch.Generator().manual_seed(0)
    leaves = [t.float().requires_grad_(True) for t in _make_inputs(FLOPS_CASE, device, gen)]
    q, k, v, rel, mask = leaves
    with FlopCounterMode(display=False) as counter:
        out = nb.neighborhood_attention(q, k, v, FLOPS_CASE["ks"], rel_pos=rel, window_mask=mask, backend="triton")
        torch.autograd.grad(out.square().sum(), leaves)
    return dict(counts={str(op): n for op, n in counter.get_flop_counts()["Global"].items()},
                macs=nb.neighborhood_macs(q, k, v, FLOPS_CASE["ks"], rel_pos=rel))


# ---------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    report = json.loads(line)
    report["wall_seconds"] = time.time() - t0
    return report


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_reference(interpreter_report, name):
    result = {r["name"]: r for r in interpreter_report["results"]}[name]
    assert result["ok"], json.dumps(result, indent=1)


def test_interpreter_covers_every_gradient(interpreter_report):
    seen = set()
    for r in interpreter_report["results"]:
        seen |= set(r["errors"])
    assert {"out", "weights", "dq", "dk", "dv", "drel_pos", "dwindow_mask"} <= seen


def _assert_counts_the_formula(report: dict) -> None:
    b, heads, h, w, d = FLOPS_CASE["shape"]
    macs = b * heads * h * w * FLOPS_CASE["ks"] ** 2 * (2 * d + FLOPS_CASE["dv"])  # q.k, q.r, sum of v
    assert report["macs"] == macs
    assert report["counts"] == {"attention_flops.neighborhood_attention": 2 * macs,
                                "attention_flops.neighborhood_attention_backward": 4 * macs}


def test_interpreter_counts_the_formula(interpreter_report):
    _assert_counts_the_formula(interpreter_report["flops"])


def test_available_and_errors():
    from common.ops import neighborhood_triton as nt

    assert isinstance(nt.available(), bool)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        assert not nt.available()
        with pytest.raises(RuntimeError):
            nt.triton_attention(*(torch.zeros(1, 1, 3, 3, 4),) * 3, 3)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(CASES) + list(GPU_CASES))
def test_gpu_matches_reference(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode in this process")
    case = {**CASES, **GPU_CASES}[name]
    result = _check_case(name, case, "cuda")
    assert result["ok"], json.dumps(result, indent=1)


@needs_cuda
def test_gpu_counts_the_formula():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode in this process")
    _assert_counts_the_formula(count_flops("cuda"))


if __name__ == "__main__":  # the interpreter subprocess (or a manual GPU run: `python this_file --cuda`)
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's numpy log(0) = -inf
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    device = "cuda" if "--cuda" in sys.argv else "cpu"
    if device == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 for the CPU run"
    cases = CASES if device == "cpu" else {**CASES, **GPU_CASES}
    t0 = time.time()
    results = run_all(cases, device)
    print(json.dumps(dict(device=device, seconds=round(time.time() - t0, 2), results=results,
                          flops=count_flops(device))))
