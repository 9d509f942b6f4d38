"""How bench/gpu_check.py runs its commands and records what they show: targets, checks, each part's clock, and
the three files (gpu_check.json, gpu_check.md, gpu_check.log).

A command runs from the repository root in its own process group, with its output merged and captured, and is
stopped with its workers when its time is up; it also dies with the check (Linux PR_SET_PDEATHSIG), so that no
command outlives a killed check and holds the GPU. Every figure is a `Check`: part, name, value, unit, target and
status (pass, fail, info: recorded without a target, skip, error), with a note and the command that produced it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
GRACE_S = 5  # a command out of time gets Ctrl-C, then this long to wrap up before it is killed


@dataclass(frozen=True)
class Target:
    """A comparison a figure must satisfy. gpu_only: a speed or memory target, judged on a GPU only (on the CPU
    the figure is recorded as info)."""

    op: str  # ">=", "<=", "<" or ">"
    threshold: float
    gpu_only: bool = True

    def text(self, cuda: bool) -> str:
        return f"{self.op} {self.threshold:g}" + ("" if cuda or not self.gpu_only else " (on a GPU)")

    def status(self, value, cuda: bool) -> str:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return "error"
        if self.gpu_only and not cuda:
            return "info"
        ok = {">=": value >= self.threshold, "<=": value <= self.threshold, "<": value < self.threshold,
              ">": value > self.threshold}[self.op]
        return "pass" if ok else "fail"


@dataclass
class Check:
    part: str
    name: str
    value: object  # a number, a short text or None
    unit: str
    target: str
    status: str  # pass | fail | info | skip | error
    note: str = ""
    command: str = ""


@dataclass
class Result:
    """One subprocess: its command, exit code, merged output, seconds, and whether it was stopped at its budget."""

    command: str
    rc: int | None
    out: str
    seconds: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def tail(self, lines: int = 2) -> str:
        text = [line.strip() for line in self.out.splitlines() if line.strip()]
        return " / ".join(text[-lines:])[-400:]

    def failure(self) -> str:
        if self.timed_out:
            return f"stopped at its time budget after {self.seconds:.0f} s"
        return f"exit code {self.rc}: {self.tail()}"


class PartClock:
    """A part's deadline: its own budget plus what earlier parts left, never past the whole run's."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, min_s: float) -> float | None:
        """Seconds an item may run, or None if fewer than min_s are left (then it is skipped)."""
        left = self.left()
        return left if left >= min_s else None


class Session:
    """What a run records: the checks, the parts' times, the log of every command; writes the three files."""

    def __init__(self, out: Path, work: Path, mode: str, total_s: float, command: str):
        self.out, self.work, self.mode, self.command = out, work, mode, command
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.deadline = self.started + total_s
        self.total_s = total_s
        self.checks: list[Check] = []
        self.parts: list[dict] = []
        self.families: list[str] = []  # the train part's families (empty: the mode's default list)
        self.env: dict = {}
        self.cuda = False
        self.child: subprocess.Popen | None = None
        self.interrupted = False
        self.grace_s = GRACE_S
        out.mkdir(parents=True, exist_ok=True)
        self.log = open(out / "gpu_check.log", "w", encoding="utf-8")

    # -------------------------------------------------------------- recording

    def add(self, part: str, name: str, value, unit: str, target: Target | str | None, note: str = "",
            command: str = "", status: str | None = None) -> Check:
        if isinstance(target, Target):
            text, judged = target.text(self.cuda), target.status(value, self.cuda)
        else:
            text, judged = target or "none (recorded)", "info"
        check = Check(part, name, value, unit, text, status or judged, note, command)
        self.checks.append(check)
        return check

    def skip(self, part: str, name: str, why: str, command: str = "") -> None:
        self.add(part, name, None, "", "", note=why, command=command, status="skip")

    def error(self, part: str, name: str, why: str, command: str = "") -> None:
        self.add(part, name, None, "", "", note=why, command=command, status="error")

    def failed(self, part: str, name: str, result: "Result", why: str = "") -> None:
        """A command that gave no figures: skipped if its time ran out (the budget, not the code), else an error."""
        note = why or result.failure()
        if result.timed_out:
            self.skip(part, name, note, result.command)
        else:
            self.error(part, name, note, result.command)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    # -------------------------------------------------------------- running

    def run(self, args: list[str], timeout: float, env: dict | None = None) -> Result:
        """Run a command from the repository root, merged output captured, stopped (its whole process group:
        Ctrl-C, then SIGKILL `grace_s` later) within `timeout` seconds."""
        command = shlex.join(["python" if a == PYTHON else a for a in args])
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if not self.cuda:  # toy sizes on a small, shared CPU: one thread per process avoids spin-waiting
            full_env.setdefault("OMP_NUM_THREADS", "1")
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", preexec_fn=_child_setup)
        self.child = proc
        try:
            out, _ = proc.communicate(timeout=max(timeout - self.grace_s, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            # Ctrl-C first: pytest then prints its summary so far, and a training saves and reports its epochs.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                out, _ = proc.communicate(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self.stop_child()
                out, _ = proc.communicate()
            timed_out = True
        except BaseException:  # SIGTERM (exits through SystemExit) or Ctrl-C: stop the command, then go
            self.stop_child()
            raise
        finally:
            self.child = None
        seconds = time.monotonic() - start
        result = Result(command, proc.returncode, out or "", seconds, timed_out)
        self.log.write(f"\n===== $ {command}\n===== exit {proc.returncode}{' (stopped at its budget)' if timed_out else ''}"
                       f", {seconds:.1f} s\n{result.out}")
        self.log.flush()
        return result

    def stop_child(self) -> None:
        """Kill the running command's process group (the command and its workers), if one is running."""
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -------------------------------------------------------------- writing

    def summary(self) -> dict:
        counts = {key: 0 for key in ("pass", "fail", "info", "skip", "error")}
        for check in self.checks:
            counts[check.status] = counts.get(check.status, 0) + 1
        return counts

    def heading(self) -> str:
        e = self.env
        if self.cuda:
            device = (f"{e.get('device')} (compute capability {e.get('capability')}, {e.get('memory_gib')} GiB, "
                      f"CUDA {e.get('cuda_runtime')})")
        else:
            device = f"no CUDA: CPU smoke run ({e.get('cpus')} cores)"
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        return (f"{self.started_at:%Y-%m-%d %H:%M} UTC; {device}; torch {e.get('torch')}, triton {e.get('triton')}, "
                f"Python {e.get('python')}; {self.mode} run, budget {self.total_s:.0f} s, took "
                f"{time.monotonic() - self.started:.0f} s; load average {load}; `{self.command}`")

    def write(self) -> None:
        record = {"date": self.started_at.isoformat(timespec="seconds"), "command": self.command, "mode": self.mode,
                  "cuda": self.cuda, "environment": self.env, "budget_s": self.total_s,
                  "wall_s": round(time.monotonic() - self.started, 1), "load_average": list(os.getloadavg()),
                  "parts": self.parts, "interrupted": self.interrupted, "summary": self.summary(),
                  "checks": [_finite(dataclasses.asdict(check)) for check in self.checks]}
        _write_atomic(self.out / "gpu_check.json", json.dumps(record, indent=2, default=str) + "\n")
        _write_atomic(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        lines = ["# GPU check", "", self.heading(), ""]
        if not self.cuda:
            lines += ["No CUDA device: every part ran in its CPU smoke form; speed and memory targets are for a GPU "
                      "and are recorded, not judged.", ""]
        lines += ["| part | check | result | target | pass/fail |", "| --- | --- | --- | --- | --- |"]
        for c in self.checks:
            result = _format_value(c.value, c.unit)
            if c.note:
                result = f"{result} ({c.note})" if result else c.note
            status = c.status.upper() if c.status in ("pass", "fail", "error") else c.status
            lines.append("| " + " | ".join(_cell(x) for x in (c.part, c.name, result, c.target, status)) + " |")
        parts = "; ".join(f"{p['name']} {p['used_s']:.0f} of {p['budget_s']:.0f} s" + (f" ({p['note']})" if p.get("note")
                                                                                       else "")
                          for p in self.parts)
        counts = self.summary()
        if self.interrupted:
            lines += ["", "Interrupted: the run was stopped before it finished; the rows above are what it had."]
        lines += ["", f"Parts: {parts}.", "",
                  "Summary: " + ", ".join(f"{n} {key}" for key, n in counts.items()) + ".", ""]
        return "\n".join(lines)


def _child_setup() -> None:
    """In each command: its own process group (so that a timeout stops its workers too), and death with this
    script (Linux PR_SET_PDEATHSIG), so that no command outlives a killed check and holds the GPU. Ctrl-C back
    at its default: a check started in the background (`nohup ... &` without job control) inherits SIGINT
    ignored, and its commands would then never print their summary on the timeout's Ctrl-C."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _finite(record: dict) -> dict:
    """NaN and infinity as text, so that the JSON stays standard."""
    value = record["value"]
    if isinstance(value, float) and not math.isfinite(value):
        record["value"] = str(value)
    return record


def _format_value(value, unit: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
