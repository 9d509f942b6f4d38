"""Cost of one model: parameters, MACs/FLOPs, throughput, latency and peak memory.

This is the ``time`` task (``python main.py --task time``). `measure` runs one
model on synthetic data and returns a `TimingResult`; `write_results` saves a
list of them as ``time.json`` (machine-readable) and ``time.md`` (a Markdown
comparison table, see `format_table`).

What is measured, and how:

* **params** -- every parameter tensor element, trainable or frozen, each
  shared (tied) parameter counted once.
* **MACs** -- multiply-accumulates of one forward pass at batch 1 in eval mode,
  counted by `torch.utils.flop_counter.FlopCounterMode`. It counts the
  matrix-multiply family (linear, matmul, bmm, convolution, scaled dot-product
  attention, ...), not element-wise work (activations, normalisation, softmax,
  pooling). **FLOPs** are ``2 * MACs``, the convention of the SASA and AACN
  papers; SAN reports MACs.
* **train img/s** -- images per second of full training steps (zero_grad,
  forward, cross-entropy, backward, SGD step) at ``batch_size``.
* **infer img/s** -- images per second of eval-mode forward passes under
  `torch.inference_mode` at ``batch_size``.
* **latency** -- mean and standard deviation of single batch-1 eval forward
  passes, each synchronised and timed on its own.
* **peak memory** -- the peak number of bytes a training step allocates on
  top of what is already held when it starts (model weights, optimizer state,
  the input batch): activations saved for backward, gradients, temporaries
  and workspaces. See `_peak_train_memory_mb` for how on CUDA and on CPU.

Every timed region is preceded by untimed warm-up iterations and read with
`time.perf_counter`; on CUDA the device is synchronised before the clock is
read, because kernels run asynchronously.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError
from common.files import write_atomic

MB = 2**20  # memory is reported in MiB, which the tables call MB
_SEED = 0  # synthetic inputs are reproducible from run to run
_SGD_LR = 1e-3  # small, so that random labels do not blow the weights up to inf/nan
_SGD_MOMENTUM = 0.9  # as in the papers' recipes; gives the optimizer real state


@dataclass
class TimingResult:
    """Cost figures of one model; see the module docstring for definitions."""

    model: str  # a label (e.g. the model name / config name)
    params: int
    macs: int  # multiply-accumulates of one forward pass at batch 1
    flops: int  # = 2 * macs
    train_img_s: float  # forward + backward + optimizer step
    infer_img_s: float  # eval mode, inference_mode
    latency_ms: float  # batch-1 inference latency, mean after warm-up
    latency_ms_std: float
    peak_mem_mb: float  # peak memory of one training step above what it starts with
    device: str  # e.g. "cpu (2 threads)" or "cuda (NVIDIA H200)"
    batch_size: int

    def as_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable), in declaration order."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# Static counts


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, trainable and frozen alike.

    `nn.Module.parameters` yields each Parameter object once, so a parameter
    shared between modules (e.g. tied embedding / classifier weights) is
    counted once.
    """
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a batch-1 input.

    The input has shape ``(1, *input_size)`` and lives on the model's device.
    FlopCounterMode counts 2 FLOPs per multiply-add, hence ``// 2``. The model
    is put in eval mode for the pass (so the count does not depend on dropout
    or batch-norm mode, and BN statistics are not updated) and every module's
    training flag is restored afterwards; nothing else is touched.
    """
    reference = _first_tensor(model)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    generator = torch.Generator(device=device).manual_seed(_SEED)
    x = torch.randn(1, *input_size, device=device, dtype=dtype, generator=generator)

    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    """The first parameter (else buffer) of the model, to learn its device and dtype."""
    for tensor in model.parameters():
        return tensor
    for tensor in model.buffers():
        return tensor
    return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; each module's own training flag restored after.

    Restoring per module (rather than calling ``model.train(old_flag)``) keeps
    models whose submodules were deliberately left in another mode intact.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


# --------------------------------------------------------------------------
# Measurement


def measure(
    model: nn.Module,
    name: str,
    input_size: tuple[int, int, int] = (3, 32, 32),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    iters: int = 10,
    latency_iters: int = 30,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    num_classes: int | None = None,
) -> TimingResult:
    """Measure the cost of ``model`` (see the module docstring) and label it ``name``.

    Everything runs on a deep copy moved to ``device``, so the caller's model
    (weights, batch-norm statistics, gradients, training flag, device) is left
    as it was. Inputs are random normal images of shape ``input_size``; labels
    are random integers below ``num_classes`` (by default the size of the last
    dimension of the model's output). ``amp_dtype`` turns on autocast
    (bfloat16 or float16 on CUDA, with a GradScaler for float16; bfloat16 on
    CPU); ``channels_last`` converts the model and the inputs to that memory
    format. ``warmup`` untimed iterations precede each of the three timed
    loops: ``iters`` training steps, ``iters`` inference passes at
    ``batch_size`` and ``latency_iters`` passes at batch 1. The global RNG
    state is restored afterwards.
    """
    _check_counts(batch_size=batch_size, iters=iters, latency_iters=latency_iters)
    if warmup < 0:
        raise UserError(f"warmup must be >= 0, got {warmup}")
    dev = _resolve_device(device)
    autocast = _autocast_factory(dev, amp_dtype)
    memory_format = torch.channels_last if channels_last else torch.preserve_format

    work = copy.deepcopy(model).to(dev)
    if channels_last:
        work = work.to(memory_format=torch.channels_last)
    params = count_params(work)
    macs = count_macs(work, input_size)

    with _forked_rng(dev):
        torch.manual_seed(_SEED)
        one = _images(1, input_size, dev, memory_format)
        if num_classes is None:
            num_classes = _output_classes(work, one, autocast)
        x = _images(batch_size, input_size, dev, memory_format)
        y = torch.randint(num_classes, (batch_size,), device=dev)

        work.train()
        optimizer = torch.optim.SGD(work.parameters(), lr=_SGD_LR, momentum=_SGD_MOMENTUM)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        train_step = _train_step(work, optimizer, x, y, autocast, scaler)
        train_img_s = _throughput(train_step, batch_size, dev, warmup, iters)
        # After the timed steps, so the optimizer state already exists.
        peak_mem_mb = _peak_train_memory_mb(train_step, optimizer, dev)

        work.eval()
        infer_img_s = _throughput(_inference(work, x, autocast), batch_size, dev, warmup, iters)
        latency_ms, latency_ms_std = _latency_ms(_inference(work, one, autocast), dev, warmup, latency_iters)

    return TimingResult(
        model=name,
        params=params,
        macs=macs,
        flops=2 * macs,
        train_img_s=train_img_s,
        infer_img_s=infer_img_s,
        latency_ms=latency_ms,
        latency_ms_std=latency_ms_std,
        peak_mem_mb=peak_mem_mb,
        device=_device_label(dev),
        batch_size=batch_size,
    )


def _check_counts(**counts: int) -> None:
    for key, value in counts.items():
        if value < 1:
            raise UserError(f"{key} must be >= 1, got {value}")


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}: {err}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"timing supports the devices cpu and cuda, not {dev.type!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(dev)!r} asked for, but CUDA is not available here")
    return dev


def _device_label(dev: torch.device) -> str:
    """``cpu (N threads)`` or ``cuda (<GPU name>)``: what the figures depend on."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({torch.get_num_threads()} threads)"


def _autocast_factory(
    dev: torch.device, amp_dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of fresh autocast contexts (or no-op contexts without AMP)."""
    if amp_dtype is None:
        return contextlib.nullcontext
    allowed = (torch.bfloat16, torch.float16) if dev.type == "cuda" else (torch.bfloat16,)
    if amp_dtype not in allowed:
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise UserError(f"amp dtype on {dev.type} must be {names}, got {amp_dtype}")
    return lambda: torch.autocast(dev.type, dtype=amp_dtype)


@contextlib.contextmanager
def _forked_rng(dev: torch.device) -> Iterator[None]:
    """Leave the caller's global RNG state (CPU and, on CUDA, this GPU) as it was."""
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


def _images(
    batch: int, input_size: tuple[int, ...], dev: torch.device, memory_format: torch.memory_format
) -> torch.Tensor:
    x = torch.randn(batch, *input_size, device=dev)
    if x.dim() != 4:  # channels_last only exists for 4-d (NCHW) tensors
        return x
    return x.contiguous(memory_format=memory_format)


def _output_classes(model: nn.Module, x: torch.Tensor, autocast: Callable) -> int:
    """Number of classes = size of the last dimension of an eval forward's output."""
    with _eval_mode(model), torch.inference_mode(), autocast():
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise UserError("model output must be a (batch, classes) logits tensor; pass num_classes otherwise")
    return out.shape[-1]


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable,
    scaler: torch.amp.GradScaler | None,
) -> Callable[[], None]:
    """One full training step on a fixed batch, as a closure."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # float16 needs loss scaling to train; its cost belongs in the figure
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def _inference(model: nn.Module, x: torch.Tensor, autocast: Callable) -> Callable[[], None]:
    """One forward pass without autograd bookkeeping, as a closure."""

    def forward() -> None:
        with torch.inference_mode(), autocast():
            model(x)

    return forward


def _sync(dev: torch.device) -> None:
    """Wait for queued GPU work, so that the clock reads the time it took."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _throughput(fn: Callable[[], None], batch_size: int, dev: torch.device, warmup: int, iters: int) -> float:
    """Images per second of ``iters`` back-to-back calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return batch_size * iters / (time.perf_counter() - start)


def _latency_ms(fn: Callable[[], None], dev: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Mean and sample standard deviation (ms) of ``iters`` calls timed one by one."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(dev)
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - start) * 1e3)
    std = statistics.stdev(times) if len(times) > 1 else 0.0
    return statistics.fmean(times), std


# --------------------------------------------------------------------------
# Peak memory


def _peak_train_memory_mb(step: Callable[[], None], optimizer: torch.optim.Optimizer, dev: torch.device) -> float:
    """Peak MB (2**20 bytes) one training step allocates above what it starts with.

    The gradients are dropped before the measured step, so the baseline is
    the model weights, the optimizer state and the input batch, and the
    figure covers what training adds: saved activations, gradients,
    temporaries and workspaces.

    * CUDA: ``torch.cuda.max_memory_allocated`` after
      ``reset_peak_memory_stats``, minus ``memory_allocated`` before the step.
      Counts allocated tensor memory (in the caching allocator's rounded
      block sizes), not memory reserved by the cache.
    * CPU: there is no allocator counter, so `_cpu_peak_bytes` replays the
      allocator events that the profiler records during the step.
    """
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = _cpu_peak_bytes(step)
    return peak / MB


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's native log lines (kineto writes them straight to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes simultaneously live among the CPU allocations made during ``fn()``.

    Runs ``fn`` under `torch.profiler.profile` with ``profile_memory=True``:
    PyTorch's CPU allocator then reports every allocation and free (address
    and size) as a ``[memory]`` event, which the exported trace keeps. The
    events are replayed in time order, keeping a table of the blocks
    allocated inside the region: the running sum of their sizes is the memory
    the region holds, and its maximum is the answer. Freeing a block that was
    allocated before the region is ignored (the table does not know it), so
    the figure is "peak bytes held by allocations made in the region", never
    below zero and independent of what the process held before.

    What it does not see: memory allocated outside PyTorch's allocator (e.g.
    by a third-party library with its own malloc), and allocations made by
    intra-op worker threads, since the profiler's memory reporting is
    per-thread (PyTorch operators allocate their outputs and workspaces on
    the calling thread; autograd runs CPU backward on the calling thread).
    """
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = _memory_events(prof)

    live: dict[int, int] = {}  # address -> bytes, blocks allocated in the region
    current = peak = 0
    for addr, nbytes in events:
        if nbytes > 0:
            live[addr] = nbytes
            current += nbytes
            peak = max(peak, current)
        elif addr in live:
            current -= live.pop(addr)
    return peak


def _memory_events(prof: profile) -> list[tuple[int, int]]:
    """(address, signed bytes) of the CPU allocator events of a profile, in time order.

    Read from the exported Chrome trace: the only public interface that keeps
    each event's address (needed to tell frees of our blocks from frees of
    older ones). Ties in time are ordered by the profiler's event index.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    raw = trace["traceEvents"] if isinstance(trace, dict) else trace
    cpu = 0  # c10::DeviceType::CPU
    memory = [
        e for e in raw if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == cpu
    ]
    memory.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    return [(e["args"]["Addr"], e["args"]["Bytes"]) for e in memory]


# --------------------------------------------------------------------------
# Output


_COLUMNS = (
    "Model",
    "Params (M)",
    "MACs (G)",
    "FLOPs (G)",
    "Train (img/s)",
    "Infer (img/s)",
    "Latency b=1 (ms)",
    "Peak train mem (MB)",
    "Batch",
    "Device",
)


def format_table(results: list[TimingResult]) -> str:
    """A Markdown table, one row per model, in human units.

    Params in millions, MACs/FLOPs in 10**9, throughput in images/s, latency
    as mean ± std in ms, memory in MB of 2**20 bytes.
    """
    lines = [_row(_COLUMNS), _row(["---"] + ["---:"] * (len(_COLUMNS) - 2) + ["---"])]
    for r in results:
        lines.append(
            _row(
                [
                    r.model.replace("|", r"\|"),  # a pipe would split the cell
                    f"{r.params / 1e6:.2f}",
                    f"{r.macs / 1e9:.3f}",
                    f"{r.flops / 1e9:.3f}",
                    f"{r.train_img_s:.1f}",
                    f"{r.infer_img_s:.1f}",
                    f"{r.latency_ms:.2f} ± {r.latency_ms_std:.2f}",
                    f"{r.peak_mem_mb:.1f}",
                    str(r.batch_size),
                    r.device,
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _row(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


_MD_NOTES = """\
MACs: multiply-accumulates of one forward pass at batch 1 (FlopCounterMode: \
matmul/conv/attention, no element-wise ops); FLOPs = 2 x MACs. \
Train: forward + backward + SGD step. Infer: eval mode, inference_mode. \
Peak train mem: peak memory one training step allocates above the weights, \
optimizer state and input batch it starts with (MB = 2^20 bytes).
"""


def write_results(results: list[TimingResult], out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/time.json`` and ``out_dir/time.md``; return their paths.

    ``time.json`` is a list with one record per model whose keys are exactly
    the `TimingResult` fields; ``time.md`` is `format_table` with a note on
    the definitions.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "time.json"
    md_path = out_dir / "time.md"
    write_atomic(json_path, json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    write_atomic(md_path, "# Model cost\n\n" + format_table(results) + "\n" + _MD_NOTES)
    return json_path, md_path


def timed_rounds(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                 warmup: int = 2) -> dict[str, float]:
    """Median seconds of each step(), the steps run in interleaved rounds.

    Interleaving makes a burst of load from other processes hit every step
    alike, so the ratios between steps (what benchmarks report) stay meaningful
    on a shared machine.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
