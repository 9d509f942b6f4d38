"""Interleaved timing rounds: several workloads timed under the same load, within a time budget.

On a shared machine the load changes from second to second, so models timed one after another get ratios that
depend on when each ran. Here every round times every workload once, in a fixed order, and the figures are
medians over rounds; a ratio between two workloads is the median of their per-round ratios, so a burst of load
hits both sides of a ratio alike.

- A `Workload` is a callable. A sample times `calls` back-to-back calls (or, with `each`, every call on its own:
  latency) and records seconds per call. `calls` adapts to the cost of the workload's last warm-up call, so
  that a sample of a cheap workload lasts at least MIN_SAMPLE_S and the clock's and Python's overheads stay
  small beside it.
- `run_rounds` runs rounds until the budget cannot hold another one (rounds so far tell how long one takes),
  and at least `min_rounds`. Without a budget it runs exactly `min_rounds`.
- The 1-minute load average is read after every round, so a table can say what load its ratios were taken
  under.

On CUDA the device is synchronised before the clock is read, because kernels run asynchronously.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch

MIN_SAMPLE_S = 0.05  # a sample of a cheap workload repeats it until it lasts at least this long
MAX_CALLS = 1000


def load_average() -> float | None:
    """The 1-minute load average of the machine, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that the clock reads the time it took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Workload:
    """One thing to time; `samples[r]` holds round r's seconds per call (one value, or one per call with `each`)."""

    name: str
    fn: Callable[[], object]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    each: bool = False  # time every call on its own (latency), not the calls of a sample together
    calls: int = 1
    samples: list[list[float]] = field(default_factory=list)
    warm_seconds: float | None = None  # the last warm-up call's

    def warm_up(self, times: int, min_calls: int = 1) -> None:
        """`times` untimed calls; the last one is clocked to size the samples (`calls`, at least `min_calls`)."""
        enough = 1
        if times > 0:
            for _ in range(times - 1):
                self.fn()
            sync(self.device)
            start = time.perf_counter()
            self.fn()
            sync(self.device)
            self.warm_seconds = time.perf_counter() - start
            enough = math.ceil(MIN_SAMPLE_S / max(self.warm_seconds, 1e-9))
        self.calls = max(min_calls, min(MAX_CALLS, enough))

    def sample(self) -> None:
        if self.each:
            times = []
            for _ in range(self.calls):
                sync(self.device)
                start = time.perf_counter()
                self.fn()
                sync(self.device)
                times.append(time.perf_counter() - start)
            self.samples.append(times)
            return
        sync(self.device)
        start = time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        sync(self.device)
        self.samples.append([(time.perf_counter() - start) / self.calls])

    def median(self) -> float:
        """Median seconds per call: over rounds (over all calls with `each`)."""
        return statistics.median(t for round_ in self.samples for t in round_)

    def per_round(self) -> list[float]:
        """Mean seconds per call of each round."""
        return [statistics.fmean(round_) for round_ in self.samples]


def median_ratio(workload: Workload, reference: Workload) -> float:
    """Median over rounds of workload's seconds per call divided by reference's in the same round."""
    return statistics.median(a / b for a, b in zip(workload.per_round(), reference.per_round()))


class Progress:
    """What the rounds are doing, on a stream (stderr): a line per round, and on a terminal a status line that
    says which workload is being timed. `quiet` keeps only the first and last lines."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._status = False

    def line(self, text: str, always: bool = False) -> None:
        if self.quiet and not always:
            return
        self._clear()
        print(text, file=self.stream, flush=True)

    def status(self, text: str) -> None:
        """A line that the next one overwrites (terminals only)."""
        if self.live:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._status = True

    def _clear(self) -> None:
        if self._status:
            self.stream.write("\r\033[K")
            self._status = False


def clock(seconds: float) -> str:
    """123.4 -> '2:03'."""
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class Rounds:
    """What `run_rounds` did: the number of rounds and the load average after each."""

    count: int
    seconds: float
    loads: list[float]

    @property
    def load(self) -> float | None:
        return statistics.fmean(self.loads) if self.loads else None


def run_rounds(workloads: Sequence[Workload], min_rounds: int, deadline: float | None = None,
               progress: Progress | None = None, max_rounds: int = 10_000) -> Rounds:
    """Time every workload once per round, in order, until `deadline` (a `time.perf_counter()` value) leaves no
    room for another round, and at least `min_rounds` rounds; exactly `min_rounds` without a deadline."""
    progress = progress or Progress(quiet=True)
    start = time.perf_counter()
    durations: list[float] = []
    loads: list[float] = []
    while len(durations) < max_rounds:
        if len(durations) >= min_rounds:
            if deadline is None or time.perf_counter() + statistics.median(durations) > deadline:
                break
        index = len(durations) + 1
        round_start = time.perf_counter()
        for i, workload in enumerate(workloads, 1):
            progress.status(f"round {index}: {workload.name} ({i}/{len(workloads)})")
            workload.sample()
        durations.append(time.perf_counter() - round_start)
        load = load_average()
        if load is not None:
            loads.append(load)
        fit = ""
        if deadline is not None:
            left = max(0.0, deadline - time.perf_counter())
            fit = f", about {index + int(left // statistics.median(durations))} fit the budget"
        load_text = f"; load average {load:.1f}" if load is not None else ""
        progress.line(f"round {index} (at least {min_rounds}{fit}): {durations[-1]:.1f} s, "
                      f"{clock(time.perf_counter() - start)} elapsed{load_text}")
    return Rounds(len(durations), time.perf_counter() - start, loads)


def timed_workloads(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                    warmup: int = 2) -> dict[str, Workload]:
    """Each step() as a Workload timed once per round, in `repeats` interleaved rounds after `warmup` untimed ones.

    Interleaving makes a burst of load from other processes hit every step alike, so the ratios between steps
    (what benchmarks report) stay meaningful on a shared machine.
    """
    workloads = {name: Workload(name, step, device) for name, step in steps.items()}
    for _ in range(warmup):
        for workload in workloads.values():
            workload.fn()
    run_rounds(list(workloads.values()), min_rounds=repeats)
    return workloads


def timed_rounds(steps: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                 warmup: int = 2) -> dict[str, float]:
    """Median seconds of each step() over timed_workloads' rounds."""
    return {name: w.median() for name, w in timed_workloads(steps, repeats, device, warmup).items()}
