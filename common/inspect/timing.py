"""Cost of models: parameters, MACs/FLOPs, throughput, latency and peak memory, as one comparable table.

This is the ``time`` task (``python main.py --task time``). `measure_all` measures several models (`ModelSpec`)
on synthetic data in one process and returns a `TimingResult` each (`measure`: one model); `write_results`
saves them as ``time.json`` (machine-readable) and ``time.md`` (a Markdown table, see `format_table`).

What is measured, and how:

* **params** -- every parameter tensor element, trainable or frozen, each
  shared (tied) parameter counted once.
* **MACs** -- multiply-accumulates of one forward pass at batch 1 in eval mode,
  counted by `torch.utils.flop_counter.FlopCounterMode` on meta tensors (shapes
  only, no arithmetic): convolutions and matrix products, and every attention op
  by the formula of its math (`common.inspect.flops`: q.k and q.r logits and
  weighted sums of values; the same count for every backend and device), not
  element-wise work (activations, normalisation, softmax, pooling). **FLOPs**
  are ``2 * MACs``, the convention of the SASA and AACN papers; SAN reports MACs.
* **train img/s** -- images per second of full training steps (zero_grad,
  forward, cross-entropy, backward, SGD step) at ``batch_size``.
* **infer img/s** -- images per second of eval-mode forward passes under
  `torch.inference_mode` at ``batch_size``.
* **latency** -- mean and standard deviation of single batch-1 eval forward
  passes, each synchronised and timed on its own.
* **train / infer vs first** -- time per image of this model's training step
  (inference pass) over the first model's, the median of the ratios taken in
  the same rounds: the baseline's row reads 1.00.
* **peak memory** -- the peak number of bytes a training step allocates on
  top of what is already held when it starts (model weights, optimizer state,
  the input batch): activations saved for backward, gradients, temporaries
  and workspaces. See `_peak_train_memory_mb` for how on CUDA and on CPU.

How the clock is run (`common.inspect.rounds`): every model is built, warmed up
(``warmup`` untimed calls of each workload, the last one clocked to size the
samples) and measured for memory first; then rounds time, in turn, every
model's training step, inference pass and batch-1 calls, so that load from
other processes hits all models alike. Rounds continue while the budget
(``budget_s``, for all models of the call) holds another one, and at least
until every model has ``iters`` timed training steps and inference passes.
Throughputs are medians over rounds. The 1-minute load average of the machine
is read after every round and reported with the table. On CUDA the device is
synchronised before the clock is read, because kernels run asynchronously.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError
from common.files import write_atomic
from common.inspect import flops  # noqa: F401  (SDPA's formulas on every device, before a counter exists)
from common.inspect.rounds import Progress, Rounds, Workload, clock, load_average, median_ratio, run_rounds, sync
from common.inspect.rounds import timed_rounds  # noqa: F401  (the benches' interleaved timer, re-exported)

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
    train_vs_first: float | None = None  # time per training image / the first model's (median of round ratios)
    infer_vs_first: float | None = None  # the same for inference
    rounds: int = 0  # timed rounds (each: every model's training step, inference pass and batch-1 calls)
    load_avg: float | None = None  # mean 1-minute load average of the machine after each round

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


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a batch-1 input of shape ``(1, *input_size)``:
    half the FLOPs of `count_flops_by_op` (FlopCounterMode counts 2 FLOPs per multiply-add)."""
    return sum(count_flops_by_op(model, input_size).values()) // 2


def count_flops_by_op(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of one eval-mode forward pass at batch 1, per op: {"aten.convolution": ..., "attention_flops.
    neighborhood_attention": ...} (the attention ops of `common.inspect.flops` by their names).

    Counted on meta tensors: `torch.func.functional_call` runs the model with every parameter and buffer
    replaced by a meta tensor of its shape, so nothing is computed and a 224x224 ResNet-50 costs a fraction of
    a second. A model that cannot run on meta tensors (one that reads a value with ``.item()``, say) is counted
    by a real forward pass on its own device instead; the two agree, since every formula reads shapes only.
    The model is put in eval mode for the pass (so the count does not depend on dropout or batch-norm mode, and
    BN statistics are not updated) and every module's training flag is restored afterwards; nothing else is
    touched.
    """
    with _eval_mode(model), torch.no_grad():
        try:
            counts = _flops_on_meta(model, input_size)
        except Exception:  # noqa: BLE001 - any failure on meta tensors: count on real ones (errors surface there)
            counts = _flops_on_device(model, input_size)
    return {str(op): count for op, count in counts.items()}


def _flops_on_meta(model: nn.Module, input_size: tuple[int, ...]) -> dict:
    reference = _first_tensor(model)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty(1, *input_size, dtype=dtype, device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.func.functional_call(model, tensors, (x,), tie_weights=True, strict=False)
    return counter.get_flop_counts().get("Global", {})


def _flops_on_device(model: nn.Module, input_size: tuple[int, ...]) -> dict:
    reference = _first_tensor(model)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    generator = torch.Generator(device=device).manual_seed(_SEED)
    x = torch.randn(1, *input_size, device=device, dtype=dtype, generator=generator)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_flop_counts().get("Global", {})


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


@dataclass
class ModelSpec:
    """One model to measure and how: its label, input and batch sizes, device, autocast dtype (bfloat16 or
    float16 on CUDA, with a GradScaler for float16; bfloat16 on CPU), channels_last memory format, and the
    number of classes of its random labels (default: the size of the last dimension of its output)."""

    name: str
    model: nn.Module
    input_size: tuple[int, ...] = (3, 32, 32)
    batch_size: int = 64
    device: str | torch.device = "cpu"
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    num_classes: int | None = None


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
    budget_s: float | None = None,
) -> TimingResult:
    """Measure the cost of one ``model`` and label it ``name``: `measure_all` of one `ModelSpec`."""
    spec = ModelSpec(name, model, input_size, batch_size, device, amp_dtype, channels_last, num_classes)
    return measure_all([spec], warmup=warmup, iters=iters, latency_iters=latency_iters, budget_s=budget_s)[0]


def measure_all(specs: Sequence[ModelSpec], warmup: int = 1, iters: int = 3, latency_iters: int = 10,
                budget_s: float | None = None, progress: Progress | None = None) -> list[TimingResult]:
    """Measure every model of ``specs`` in interleaved rounds (see the module docstring); one result each.

    Everything runs on deep copies moved to each spec's device, so the callers' models (weights, batch-norm
    statistics, gradients, training flags, devices) are left as they were. Inputs are random normal images;
    labels random integers. ``warmup`` untimed calls of each workload come first; then rounds run until
    ``budget_s`` seconds have passed since the call began (its warm-up and memory steps included), and at
    least until each model has ``iters`` timed training steps and inference passes and ``latency_iters``
    batch-1 calls; without a budget, exactly that minimum. The global RNG state is restored afterwards.
    ``progress`` (default: silent) reports which model is being prepared or timed and how far the rounds are.
    """
    if not specs:
        raise UserError("nothing to measure: give at least one model")
    _check_counts(iters=iters, latency_iters=latency_iters, **{f"batch_size of {s.name}": s.batch_size
                                                             for s in specs})
    if warmup < 0:
        raise UserError(f"warmup must be >= 0, got {warmup}")
    if budget_s is not None and budget_s <= 0:
        raise UserError(f"the time budget must be > 0 seconds, got {budget_s}")
    progress = progress or Progress(quiet=True)
    start = time.perf_counter()
    devices = [_resolve_device(spec.device) for spec in specs]
    budget = f", budget {clock(budget_s)}" if budget_s is not None else ""
    load = load_average()
    progress.line(f"time: {len(specs)} model{'s' * (len(specs) > 1)} on "
                  f"{', '.join(sorted({_device_label(d) for d in devices}))}{budget}"
                  + (f"; load average {load:.1f}" if load is not None else ""), always=True)
    with _forked_rng(devices):
        prepared = []
        for i, (spec, dev) in enumerate(zip(specs, devices), 1):
            progress.status(f"[{i}/{len(specs)}] {spec.name}: building, warming up, measuring memory")
            prepared.append(_Prepared(spec, dev, warmup))
            progress.line(f"[{i}/{len(specs)}] {prepared[-1].summary()}")
        min_rounds = max(p.rounds_needed(iters) for p in prepared)
        for p in prepared:
            p.latency.calls = max(p.latency.calls, math.ceil(latency_iters / min_rounds))
        workloads = [w for p in prepared for w in p.workloads()]
        deadline = None if budget_s is None else start + budget_s
        rounds = run_rounds(workloads, min_rounds, deadline, progress)
    progress.line(f"time: {rounds.count} round{'s' * (rounds.count > 1)} in {clock(rounds.seconds)}, "
                  f"{clock(time.perf_counter() - start)} in all", always=True)
    first = prepared[0]
    return [p.result(first, rounds) for p in prepared]


class _Prepared:
    """One model ready to be timed: its copy on the device, static counts, peak memory and three workloads."""

    def __init__(self, spec: ModelSpec, dev: torch.device, warmup: int):
        self.spec, self.dev = spec, dev
        autocast = _autocast_factory(dev, spec.amp_dtype)
        memory_format = torch.channels_last if spec.channels_last else torch.preserve_format
        work = copy.deepcopy(spec.model).to(dev)
        if spec.channels_last:
            work = work.to(memory_format=torch.channels_last)
        self.params = count_params(work)
        self.macs = count_macs(work, spec.input_size)

        torch.manual_seed(_SEED)
        one = _images(1, spec.input_size, dev, memory_format)
        num_classes = spec.num_classes if spec.num_classes is not None else _output_classes(work, one, autocast)
        x = _images(spec.batch_size, spec.input_size, dev, memory_format)
        y = torch.randint(num_classes, (spec.batch_size,), device=dev)
        optimizer = torch.optim.SGD(work.parameters(), lr=_SGD_LR, momentum=_SGD_MOMENTUM)
        scaler = torch.amp.GradScaler("cuda") if spec.amp_dtype == torch.float16 else None

        # Workloads switch the mode they need: they run interleaved with other workloads of this model.
        train_step = _train_step(work, optimizer, x, y, autocast, scaler)
        self.train = Workload(f"{spec.name} train", _in_mode(work, True, train_step), dev)
        self.infer = Workload(f"{spec.name} inference", _in_mode(work, False, _inference(work, x, autocast)), dev)
        self.latency = Workload(f"{spec.name} batch-1", _in_mode(work, False, _inference(work, one, autocast)),
                                dev, each=True)
        for workload in (self.train, self.infer, self.latency):
            workload.warm_up(warmup)
        work.train()
        if warmup == 0:  # the memory figure is taken on top of the optimizer state: let it exist
            train_step()
        self.peak_mem_mb = _peak_train_memory_mb(train_step, optimizer, dev)

    def workloads(self) -> list[Workload]:
        return [self.train, self.infer, self.latency]

    def rounds_needed(self, iters: int) -> int:
        return max(math.ceil(iters / self.train.calls), math.ceil(iters / self.infer.calls))

    def summary(self) -> str:
        text = f"{self.spec.name}: {self.params / 1e6:.2f}M params, {self.macs / 1e9:.3f} GMACs"
        if self.train.warm_seconds is None:
            return text
        return (f"{text}; warm-up: training step {self.train.warm_seconds:.2f} s, inference "
                f"{self.infer.warm_seconds:.2f} s, batch 1 {self.latency.warm_seconds * 1e3:.1f} ms "
                f"(batch {self.spec.batch_size})")

    def result(self, first: "_Prepared", rounds: Rounds) -> TimingResult:
        per_image = self.spec.batch_size / first.spec.batch_size  # ratios compare time per image
        latency = [t * 1e3 for round_ in self.latency.samples for t in round_]
        return TimingResult(
            model=self.spec.name,
            params=self.params,
            macs=self.macs,
            flops=2 * self.macs,
            train_img_s=self.spec.batch_size / self.train.median(),
            infer_img_s=self.spec.batch_size / self.infer.median(),
            latency_ms=statistics.fmean(latency),
            latency_ms_std=statistics.stdev(latency) if len(latency) > 1 else 0.0,
            peak_mem_mb=self.peak_mem_mb,
            device=_device_label(self.dev),
            batch_size=self.spec.batch_size,
            train_vs_first=median_ratio(self.train, first.train) / per_image,
            infer_vs_first=median_ratio(self.infer, first.infer) / per_image,
            rounds=rounds.count,
            load_avg=rounds.load,
        )


def _in_mode(model: nn.Module, training: bool, fn: Callable[[], None]) -> Callable[[], None]:
    """fn with the model in training or eval mode, switched only when the last workload left the other one."""

    def call() -> None:
        if model.training != training:
            model.train(training)
        fn()

    return call


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


def threads_label(threads: int) -> str:
    """``1 thread`` or ``N threads``."""
    return f"{threads} thread{'' if threads == 1 else 's'}"


def _device_label(dev: torch.device) -> str:
    """``cpu (N threads)`` or ``cuda (<GPU name>)``: what the figures depend on."""
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({threads_label(torch.get_num_threads())})"


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
def _forked_rng(devices: Sequence[torch.device]) -> Iterator[None]:
    """Leave the caller's global RNG state (CPU and the GPUs in use) as it was."""
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})
    if cuda:
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
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
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        sync(dev)
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
    "Train time (x first)",
    "Infer (img/s)",
    "Infer time (x first)",
    "Latency b=1 (ms)",
    "Peak train mem (MB)",
    "Batch",
    "Device",
)


def format_table(results: list[TimingResult]) -> str:
    """A Markdown table, one row per model, in human units, and a line on the rounds and the load.

    Params in millions, MACs/FLOPs in 10**9, throughput in images/s, time per image relative to the first
    row's (a ratio of medians of per-round ratios: 2.50 means 2.5 times the baseline's time), latency as
    mean ± std in ms, memory in MB of 2**20 bytes.
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
                    _ratio(r.train_vs_first),
                    f"{r.infer_img_s:.1f}",
                    _ratio(r.infer_vs_first),
                    f"{r.latency_ms:.2f} ± {r.latency_ms_std:.2f}",
                    f"{r.peak_mem_mb:.1f}",
                    str(r.batch_size),
                    r.device,
                ]
            )
        )
    table = "\n".join(lines) + "\n"
    rounds = max((r.rounds for r in results), default=0)
    if rounds:
        loads = [r.load_avg for r in results if r.load_avg is not None]
        load = f"; 1-minute load average {statistics.fmean(loads):.1f} during them" if loads else ""
        table += (f"\n{rounds} interleaved round{'s' * (rounds > 1)} (times are medians over rounds){load}, "
                  f"on a machine with {os.cpu_count()} CPU cores.\n")
    return table


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _row(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


_MD_NOTES = """\
MACs: multiply-accumulates of one forward pass at batch 1 (torch.utils.flop_counter: convolutions, matrix \
products, and every attention op by the formula of its math, the same for every backend; not element-wise \
work such as the softmax); FLOPs = 2 x MACs. \
Train: forward + backward + SGD step. Infer: eval mode, inference_mode. \
Time (x first): time per image over the first model's, the median of the ratios within each round. \
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
