"""GPU readiness in one command: everything in this repository that needs a GPU, checked and recorded.

    python bench/gpu_check.py [--out DIR] [--quick] [--parts tests,benches,train,time] [--budget-s S]
                              [--families sasa,vit,...]

On a CUDA machine it runs, each part in its own time budget (at most 8 minutes in all, 3 with --quick):

1. tests: the GPU test subset, `pytest -m gpu` (the Triton neighbourhood kernels against the reference, forward
   and every gradient in fp32 and bf16; the tiled op, the SASA and adaptive-span layers, augmentation, mixing
   and whole loader epochs on CUDA against the CPU; whole AdamW trainings through the engine);
2. benches: bench/neighborhood.py (B=8 and 64, forward+backward against the reference and a 3x3 conv),
   bench/neighborhood_flex.py (against FlexAttention with a window block mask, the anchor), bench/sasa_step.py
   (SASA-R26 against conv-R26, bf16), bench/vit.py (SDPA against the attention written out, and which fused
   kernels apply), bench/data_loader.py and bench/san.py (SAN's lean block against unfold), each with
   --device cuda;
3. train: a short bf16 training of each model family on the built-in synthetic dataset through main.py
   (bench/train_probe.py), without and then with torch.compile: images/s, peak memory, whether the loss goes
   down, recompilations and graph breaks;
4. time: `main.py --task time` over the configs of configs/compare/cifar.yaml in bf16.

--quick runs the benches with 3 repeats (the neighbourhood op at batch 64 only), trains the first three families
without torch.compile, and times with fewer iterations. --families trains only the families named, to rerun what
a budget cut short (with --parts train).

Every benchmark and main.py run is a subprocess called with its documented flags, so a crash or a hung kernel
costs one item, not the run. An item that would start after its part's budget is spent is skipped with a note,
and a running one is stopped at the budget; time a part leaves unused goes to the next one. So the run always
finishes and always writes, into --out (default runs/gpu_check/<timestamp>/), after every part:

- gpu_check.json: the environment, each part's budget and time, and every figure with its name, value, unit,
  target and status (pass, fail, info: recorded without a target, skip, error);
- gpu_check.md: the same as a table (check, result, target, pass/fail), which is also printed at the end;
- gpu_check.log: every command with its full output.

Run folders and bench outputs go to a temporary folder (--work to keep them), so --out holds three files and
can be the device tool's $OUT. Exit code: 0 when nothing failed or errored, 1 otherwise. How commands run and
how the figures are recorded and written: bench/gpu_check_record.py.

Without CUDA it says so in one line, runs every part in a small CPU form (the GPU tests are collected, not run;
benches and training at toy sizes, one thread per process), records the figures with speed and memory targets
marked as GPU targets, and exits 0: this is how CI checks that the script itself works. BENCHMARKS.md ("GPU
check") has the device command and where the figures go.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

# gpu_check_record lives beside this file; appended, not prepended, so that bench/vit.py never shadows the vit
# package in a process that imports this module (the tests do).
sys.path.append(str(Path(__file__).resolve().parent))

from gpu_check_record import PYTHON, REPO, PartClock, Result, Session, Target  # noqa: E402

PARTS = ("tests", "benches", "train", "time")
# The parts' shares of the run's budget (TOTAL_S, or --budget-s): the parts that run split it in these
# proportions, less SETUP_S for the environment probe and writing the files. Tuned from the first GPU runs (H200,
# 2026-11-30, BENCHMARKS.md "GPU check"): the GPU tests took over 81 s on 8 workers (69 of 74 done), the benches
# 115 s, one eager training 20-95 s (process start and Triton compiles, not the epochs), and --task time over
# the 17 configs more than the 60-80 s it had. Eight minutes hold neither every family compiled nor the whole
# time table as well: the compiled trainings come last, as far as time allows, and `--parts time` is a run
# of its own (BENCHMARKS.md has the commands).
SHARES = {"full": {"tests": 120, "benches": 120, "train": 190, "time": 60},
          "quick": {"tests": 40, "benches": 40, "train": 60, "time": 25}}
TOTAL_S = {"full": 480, "quick": 180}
SETUP_S = 12  # the environment probe (CUDA initialisation included) and slack
RESERVE_S = 4  # kept back at the end for writing the files
COMPILED_CAP_S = 120  # one compiled training may not take the whole part: later families get their turn
# Inductor compiles in a pool of subprocesses that, on the first GPU run, kept a finished bench waiting at exit
# (atexit shutdown_compile_workers, up to 300 s) until the budget stopped it; compiling in-process avoids the pool
# (pytorch/pytorch#189290 describes such teardown hangs and this workaround).
INDUCTOR_IN_PROCESS = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
TIME_BUDGET_S = {"full": 5.0, "quick": 2.0, "cpu": 0.5}  # --task time's measuring seconds per model, at most

# One config per model family (and the conv baseline), in the order they are trained; CIFAR-size models.
FAMILIES = (("sasa", "configs/sasa/sasa_resnet26_cifar10.yaml"),
            ("conv", "configs/compare/resnet26_cifar10.yaml"),
            ("vit", "configs/vit/vit_cifar_spt_lsa_cifar10.yaml"),
            ("adaptive_span", "configs/adaptive_span/medium_adaptive_cifar100.yaml"),
            ("aacn", "configs/aacn/aa_cnn3_cifar100.yaml"),
            ("san", "configs/san/san10_pairwise_cifar10.yaml"),
            ("sa_conv", "configs/sa_conv/quadratic_cifar10.yaml"))
QUICK_FAMILIES = 3  # --quick trains the first three, without torch.compile
CPU_FAMILIES = (("quickstart", "configs/quickstart.yaml"),)
COMPARE_LIST = "configs/compare/cifar.yaml"
CPU_TIME_CONFIGS = ("configs/aacn/cnn3_cifar100.yaml", "configs/vit/vit_cifar_cifar10.yaml")

ENV_PROBE = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "cpus": os.cpu_count()}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        a = torch.randn(256, 256, device="cuda")
        info["kernel_ok"] = bool(torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), atol=1e-2, rtol=1e-3))
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception:
    info["triton"] = None
print("ENV " + json.dumps(info))
"""


def _number(text: str) -> float:
    return float(text.replace(",", ""))


# ----------------------------------------------------------------------------------------------- 1. tests

def part_tests(s: Session, clock: PartClock) -> None:
    part = "tests"
    if s.cuda:
        # -v: a line per test with its name, so that a run the budget stops still says which tests failed
        # (on the first GPU runs pytest-xdist, stopped, printed no summary: only dots and one anonymous F).
        # (pytest-benchmark, on the GPU machine's image, warns once per xdist worker that it is disabled.)
        args = [PYTHON, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:benchmark", "-rfEs"]
        if importlib.util.find_spec("xdist") is not None:  # the Triton tests are compile-bound: spread them
            args += ["-n", str(max(2, min(8, (os.cpu_count() or 4) // 2)))]
    else:  # no GPU to run them on: check that the marker selects them and that they import (in the files that
        # use it, rather than collecting the whole suite)
        files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                       if "pytest.mark.gpu" in path.read_text(encoding="utf-8", errors="replace"))
        args = [PYTHON, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--collect-only", *files]
    name = "pytest -m gpu" if s.cuda else "pytest -m gpu --collect-only"
    timeout = clock.timeout(min_s=10)
    if timeout is None:
        return s.skip(part, name, "the part's budget was spent")
    r = s.run(args, timeout)
    per_test, failed_tests = pytest_verdicts(r.out)
    counts = pytest_counts(r.out) or (per_test if r.timed_out else {})
    if not s.cuda:
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", r.out)
        n = int(collected.group(1)) if collected else 0
        if r.timed_out or counts.get("error") or n == 0:
            return s.error(part, name, f"no GPU test collected ({r.failure() if not r.ok else r.tail()})", r.command)
        return s.add(part, name, n, "tests selected", "> 0 collected; they run on a GPU", status="pass",
                     note="collected only: no CUDA here (GPU_TESTS_ON_CPU=1 dry-runs them on the CPU)",
                     command=r.command)
    if not counts:
        return s.failed(part, name, r, "" if not r.ok else f"no pytest summary: {r.tail()}")
    failed = counts.get("failed", 0) + counts.get("error", 0)
    skipped = counts.get("skipped", 0)
    bad = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.out, flags=re.M) or failed_tests
    skips = re.findall(r"^SKIPPED \[\d+\] (.*)$", r.out, flags=re.M)
    note = f"{failed} failed, {skipped} skipped"
    if bad:
        note += ": " + ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
    if skips:
        note += "; skipped: " + "; ".join(sorted(set(skips))[:2])
    status = "pass" if failed == 0 and skipped == 0 and counts.get("passed", 0) > 0 else "fail"
    if r.timed_out:  # interrupted at the budget: what ran is reported, the rest did not run
        note = f"stopped at the part's budget after {r.seconds:.0f} s, the rest not run; " + note
        status = "fail" if failed else "skip"
    s.add(part, name, counts.get("passed", 0), "passed", "all pass, none skipped", note=note, command=r.command,
          status=status)


def pytest_verdicts(out: str) -> tuple[dict[str, int], list[str]]:
    """From pytest -v's per-test lines (`tests/x.py::test_a PASSED`, or `[gw0] [ 5%] PASSED tests/x.py::test_a`
    under xdist), for a run stopped before its summary: ({"passed": n, ...}, the names that failed or errored)."""
    counts: dict[str, int] = {}
    bad = []
    for word, test in re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b\s+(\S+::\S+)", out) + [
            (word, test) for test, word in re.findall(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b",
                                                      out, flags=re.M)]:
        key = {"ERROR": "error", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(word, word.lower())
        counts[key] = counts.get(key, 0) + 1
        if word in ("FAILED", "ERROR"):
            bad.append(test)
    return counts, bad


def pytest_counts(out: str) -> dict[str, int]:
    """{"passed": n, "failed": n, "skipped": n, "error": n, ...} from pytest's last summary line ({} if none)."""
    lines = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", line)]
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)",
                       lines[-1] if lines else "")
    return {word.rstrip("s") if word in ("errors", "warnings") else word: int(n) for n, word in found}


# ----------------------------------------------------------------------------------------------- 2. benches

def bench_items(s: Session) -> list[tuple[str, list[str], float, object]]:
    """(name, arguments after `python`, minimum seconds, parser) of each bench, in the order they run
    (FlexAttention's runs with INDUCTOR_IN_PROCESS)."""
    flex_json = str(s.work / "neighborhood_flex.json")
    if not s.cuda:
        cpu = ["--device", "cpu"]
        return [("neighborhood", ["bench/neighborhood.py", *cpu, "--shapes", "headline", "--no-policy-ratio",
                                  "--repeats", "1"], 5, parse_neighborhood),
                ("neighborhood_flex", ["bench/neighborhood_flex.py", *cpu, "--repeats", "1", "--json", flex_json], 5,
                 parse_flex),
                ("sasa_step", ["bench/sasa_step.py", *cpu, "--batch", "2", "--repeats", "1"], 5, parse_sasa_step),
                ("vit", ["bench/vit.py", *cpu, "--batch", "2", "--repeats", "1"], 5, parse_vit),
                ("data_loader", ["bench/data_loader.py", *cpu, "--n", "512", "--batch", "64", "--workers", "0"], 5,
                 parse_data_loader),
                ("san", ["bench/san.py", *cpu, "--channels", "64", "--size", "8", "--batch", "2", "--reps", "1"], 5,
                 parse_san)]
    cuda = ["--device", "cuda"]
    repeats = ["--repeats", "3"] if s.mode == "quick" else []
    # FlexAttention compiles its kernels (tens of seconds), so it comes after the cheaper benches.
    items = [("neighborhood", ["bench/neighborhood.py", *cuda, *(["--batch", "64"] if s.mode == "quick" else []),
                               *repeats], 15, parse_neighborhood),
             ("sasa_step", ["bench/sasa_step.py", *cuda, *repeats], 10, parse_sasa_step),
             ("vit", ["bench/vit.py", *cuda, "--dtype", "bf16", *repeats], 8, parse_vit),
             ("data_loader", ["bench/data_loader.py", *cuda, *(["--n", "5000"] if s.mode == "quick" else [])], 8,
              parse_data_loader),
             # SAN's lean aggregation (a loop over the window's offsets) against unfold (a few large kernels) at
             # a training batch: which backend a GPU should use (SAN10 trained at 292 img/s on the first run).
             ("san", ["bench/san.py", *cuda, "--batch", "32", "--reps", "3" if s.mode == "quick" else "5"], 8,
              parse_san),
             ("neighborhood_flex", ["bench/neighborhood_flex.py", *cuda, *repeats, "--json", flex_json], 20,
              parse_flex)]
    if s.mode == "full":
        items.append(("data_loader", ["bench/data_loader.py", *cuda, "--augment", "strong"], 8, parse_data_loader))
    return items


EXITS_1_ON_A_MISSED_TARGET = {"san"}  # benches whose exit code is their verdict: their figures are read anyway


def part_benches(s: Session, clock: PartClock) -> None:
    for name, args, min_s, parse in bench_items(s):
        timeout = clock.timeout(min_s)
        if timeout is None:
            s.skip("benches", name, "the part's budget was spent", shlex.join(["python", *args]))
            continue
        r = s.run([PYTHON, *args], timeout, env=INDUCTOR_IN_PROCESS if name == "neighborhood_flex" else None)
        s.say(f"benches: {name} {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s")
        judged = name in EXITS_1_ON_A_MISSED_TARGET and r.rc == 1 and not r.timed_out and "Traceback" not in r.out
        if not r.ok and not judged:
            s.failed("benches", name, r)
            continue
        before = len(s.checks)
        try:
            parse(s, r, args)
        except Exception as exc:  # noqa: BLE001 - a bench whose output changed is a finding, not a crash
            s.error("benches", name, f"could not read its output ({type(exc).__name__}: {exc})", r.command)
        if len(s.checks) == before:
            s.error("benches", name, f"no figure found in its output: {r.tail()}", r.command)


def parse_neighborhood(s: Session, r: Result, args: list[str]) -> None:
    """Blocks '<shape>: B=<batch>, ..., auto -> <backend>' followed by rows '<backend> <fwd+bwd ms> ...' and the
    bench's PASS/FAIL lines; only the first number of a row (its time) is read, so added columns do not matter."""
    blocks: dict[str, dict[str, float]] = {}
    autos: dict[str, str] = {}
    label = None
    for line in r.out.splitlines():
        header = re.match(r"^(?:([\w-]+): )?B=(\d+),", line)
        if header:
            label = f"{header.group(1) or 'headline'} B={header.group(2)}"
            blocks[label] = {}
            chosen = re.search(r"auto -> (\w+)", line)
            if chosen:
                autos[label] = chosen.group(1)
            continue
        row = re.match(r"^([A-Za-z][\w+-]*)\s+(\d+(?:\.\d+)?)\s", line)
        if label is not None and row and row.group(1) not in ("backend", "step", "PASS", "FAIL"):
            blocks[label][row.group(1)] = float(row.group(2))
        verdict = re.match(r"^(PASS|FAIL) ([^:]+): (.*)$", line)
        if label is not None and verdict:
            s.add("benches", f"neighbourhood {label} (the bench's own target)", verdict.group(3),
                  "", "as stated", command=r.command, status=verdict.group(1).lower())
    for label, times in blocks.items():
        ref, conv = times.get("reference"), times.get("conv3x3")
        if not ref or not conv:
            raise ValueError(f"{label}: no reference or conv3x3 row in {sorted(times)}")
        op = autos.get(label) or ("triton" if "triton" in times else "tiled")  # what backend="auto" uses here
        batch = int(label.rsplit("=", 1)[1])
        for backend, ms in times.items():
            if backend in ("reference", "conv3x3", "gemm"):
                continue
            target = Target(">=", 10.0) if backend == op and s.cuda and batch >= 64 else None
            s.add("benches", f"neighbourhood {label}: {backend} fwd+bwd vs reference", ref / ms, "x faster", target,
                  note=f"{ms:.2f} ms vs {ref:.2f} ms", command=r.command)
        s.add("benches", f"neighbourhood {label}: {op} fwd+bwd vs 3x3 conv", times[op] / conv, "x the conv's time",
              None, note=f"{times[op]:.2f} ms vs {conv:.2f} ms", command=r.command)


def parse_flex(s: Session, r: Result, args: list[str]) -> None:
    figures = json.loads(Path(args[args.index("--json") + 1]).read_text())
    ms, auto = figures["ms"], figures["auto_backend"]
    shape = (f"B={figures['batch']}, {figures['heads']}x{figures['head_dim']}, {figures['size']}x{figures['size']}, "
             f"k={figures['kernel']}, {figures['dtype']}")
    s.add("benches", f"FlexAttention window mask agrees with {auto} ({shape})", figures["flex_error"], "max rel diff",
          Target("<=", figures["tolerance"], gpu_only=False), command=r.command)
    what = "fwd+bwd" if s.cuda else "forward"
    s.add("benches", f"neighbourhood {auto} {what} vs FlexAttention ({shape})", ms["flex"] / ms[auto], "x faster",
          Target(">=", 1.0), note=f"{ms[auto]:.2f} ms vs {ms['flex']:.2f} ms", command=r.command)
    for name in ms:
        if name not in (auto, "flex"):
            s.add("benches", f"{name} {what} vs FlexAttention ({shape})", ms["flex"] / ms[name], "x faster", None,
                  note=f"{ms[name]:.2f} ms", command=r.command)
    peaks = figures.get("peak_mib") or {}
    if peaks.get(auto) is not None and peaks.get("flex"):
        s.add("benches", f"neighbourhood {auto} peak memory vs FlexAttention ({shape})", peaks[auto] / peaks["flex"],
              "x", None, note=f"{peaks[auto]:.1f} vs {peaks['flex']:.1f} MiB for one step", command=r.command)


def parse_san(s: Session, r: Result, args: list[str]) -> None:
    """The table rows `| pairwise | lean | <ms> | <x>x | <MB> | <ratio> | ...` of bench/san.py."""
    setting = re.search(r"^SAN bottleneck (.*), median", r.out, flags=re.M)
    rows = re.findall(r"^\| (pairwise|patchwise) \| (lean|unfold) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \| ([\d.]+) \|",
                      r.out, flags=re.M)
    unfold_ms = {mode: float(ms) for mode, impl, ms, *_ in rows if impl == "unfold"}
    lean = [(mode, float(ms), float(mb), float(memory)) for mode, impl, ms, _, mb, memory in rows if impl == "lean"]
    if not lean or set(unfold_ms) != {mode for mode, *_ in lean}:
        raise ValueError("no lean and unfold rows")
    where = setting.group(1) if setting else "?"
    for mode, ms, mb, memory in lean:
        s.add("benches", f"SAN {mode} block: lean fwd+bwd vs unfold ({where})", unfold_ms[mode] / ms, "x faster",
              None, note=f"{ms:.1f} ms vs {unfold_ms[mode]:.1f} ms", command=r.command)
        s.add("benches", f"SAN {mode} block: lean saved for backward / unfold's", memory, "",
              Target("<=", 0.5, gpu_only=False), note=f"{mb:.1f} MB", command=r.command)


def parse_sasa_step(s: Session, r: Result, args: list[str]) -> None:
    ratio = re.search(r"SASA step / conv step = ([\d.]+)x", r.out)
    setting = re.search(r"^training step, (.*), median", r.out, flags=re.M)
    steps = re.findall(r"^(conv resnet26|sasa_resnet26)\s.*?([\d.]+)\s+[\d.]+x\s*$", r.out, flags=re.M)
    if not ratio:
        raise ValueError("no 'SASA step / conv step' line")
    note = ", ".join(f"{name} {ms} ms" for name, ms in steps)
    s.add("benches", f"SASA-R26 / conv-R26 training step ({setting.group(1) if setting else '?'})",
          float(ratio.group(1)), "x", Target("<=", 2.0), note=note, command=r.command)


def parse_vit(s: Session, r: Result, args: list[str]) -> None:
    dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "fp32"
    for size, kind, written, sdpa, speedup, saved_w, saved_s in re.findall(
            r"^(vit_\w+)\s+(plain|LSA)\s+([\d.]+)ms\s+([\d.]+)ms\s+([\d.]+)x\s+([\d.]+)MiB\s+([\d.]+)MiB", r.out, re.M):
        s.add("benches", f"ViT attention {size} {kind}, {dtype}: SDPA vs written out", float(speedup), "x faster",
              Target(">=", 1.0), note=f"{sdpa} vs {written} ms; saved for backward {saved_s} vs {saved_w} MiB",
              command=r.command)
    for size, dtype_used, kernels in re.findall(r"^SDPA kernels usable by the plain (\w+) layer \((\w+)\): (.*)$",
                                                r.out, re.M):
        flash = "flash" in [k.strip() for k in kernels.split(",")]
        # Flash attention needs a head dim divisible by 8: vit_cifar (16) must get it, vit_re (44) cannot.
        expect = size == "vit_cifar"
        s.add("benches", f"ViT {size} plain layer ({dtype_used}) can use flash attention", "yes" if flash else "no",
              "", "yes" if expect else "none (recorded)", note=f"usable: {kernels}", command=r.command,
              status=("pass" if flash else "fail") if expect else "info")


def parse_data_loader(s: Session, r: Result, args: list[str]) -> None:
    strong = "strong" in args
    fast = re.search(r"^DeviceLoader \(.*\): ([\d,]+) img/s", r.out, re.M)
    slow = re.search(r"^DataLoader \(.*\): ([\d,]+) img/s", r.out, re.M)
    ratio = re.search(r"^ratio: ([\d.]+)x", r.out, re.M)
    if not (fast and slow and ratio):
        raise ValueError("no DeviceLoader / DataLoader / ratio lines")
    kind = "strong augmentation" if strong else "crop+flip+normalise"
    s.add("benches", f"DeviceLoader ({kind}) throughput", _number(fast.group(1)), "img/s",
          Target(">=", 50_000 if strong else 100_000), command=r.command)
    s.add("benches", f"DeviceLoader / DataLoader ({kind})", float(ratio.group(1)), "x", Target(">=", 5.0),
          note=f"DataLoader {slow.group(1)} img/s", command=r.command)


# ----------------------------------------------------------------------------------------------- 3. train

def train_overrides(s: Session) -> list[str]:
    if s.cuda:
        size, test, epochs, batch = (3600, 500, 3, 128) if s.mode == "full" else (3600, 500, 2, 128)
        extra = ["train.amp=bf16", "device=cuda"]
    else:
        size, test, epochs, batch = 640, 100, 3, 32
        extra = ["device=cpu"]
    sets = ["data.dataset=synthetic", f"data.synthetic.train_size={size}", f"data.synthetic.test_size={test}",
            f"train.epochs={epochs}", f"train.batch_size={batch}", "train.eval_batch_size=500",
            "train.schedule.warmup_epochs=1", "log.tensorboard=false", *extra]
    return [arg for item in sets for arg in ("--set", item)]


def part_train(s: Session, clock: PartClock) -> None:
    """Every family without torch.compile first (each in its own process), then compiled while the budget lasts:
    compiling is the expensive part, so the eager figures of every family come first. --quick trains three
    families, eager only; the CPU form trains the quickstart model."""
    families = CPU_FAMILIES if not s.cuda else FAMILIES if s.mode == "full" else FAMILIES[:QUICK_FAMILIES]
    if s.families and s.cuda:
        families = [(family, config) for family, config in FAMILIES if family in s.families]
    compiled = families if s.cuda and s.mode == "full" else ()
    plan = [(family, config, "eager", 8) for family, config in families]
    plan += [(family, config, "compiled", 30) for family, config in compiled]
    for index, (family, config, variant, min_s) in enumerate(plan):
        name = f"{family} {variant}"
        args = [PYTHON, "bench/train_probe.py", "--output-root", str(s.work / "train" / family), "--variants", variant,
                "--", "--config", config, "--quiet", *train_overrides(s)]
        timeout = clock.timeout(min_s)
        if timeout is None:
            s.skip("train", name, "the part's budget was spent", shlex.join(["python", *args[1:]]))
            continue
        if variant == "eager":  # leave every later eager run its share; compiled runs take what is left
            later = [item[3] for item in plan[index + 1:] if item[2] == "eager"]
            timeout = max(min_s, min(timeout - sum(later), 2 * timeout / (len(later) + 1)))
        else:
            timeout = min(timeout, COMPILED_CAP_S)
        r = s.run(args, timeout, env=INDUCTOR_IN_PROCESS if variant == "compiled" else None)
        s.say(f"train: {name} {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s")
        probes = [json.loads(line[len("PROBE "):]) for line in r.out.splitlines() if line.startswith("PROBE ")]
        if not probes:
            s.failed("train", name, r, "" if not r.ok else f"no PROBE line: {r.tail()}")
            continue
        record_training(s, name, probes[0], r)


def record_training(s: Session, name: str, probe: dict, r: Result) -> None:
    part, command = "train", r.command
    epochs = probe["epochs"]
    stopped = r.timed_out and probe["rc"] in (130, 143)  # Ctrl-C at the budget: it saved and reported its epochs
    if probe["rc"] != 0 and not stopped:
        if r.timed_out:  # our Ctrl-C also reaches the run's children: a Triton compile's ptxas died of it
            return s.skip(part, name, f"stopped by the part's budget after {len(epochs)} epoch(s); the stop "
                                      f"then failed the run ({probe.get('error') or ''})", command)
        return s.error(part, name, f"training failed ({probe.get('error') or ''}; {r.tail()})", command)
    if len(epochs) < 2:
        why = f"{len(epochs)} epoch(s) done" + (" when the part's budget stopped it" if stopped else "")
        return (s.skip if stopped else s.error)(part, name, why, command)
    first, last = epochs[0]["train/loss"], epochs[-1]["train/loss"]
    steps = epochs[-1].get("step")
    s.add(part, f"{name}: train loss, last epoch / first", last / first if first else float("nan"), "",
          Target("<", 1.0, gpu_only=False), note=f"{first:.3f} -> {last:.3f} over {len(epochs)} epochs, {steps} steps"
          + (" (stopped there by the part's budget)" if stopped else ""), command=command)
    images_s = epochs[-1]["time/images_per_s"]
    compile_s = epochs[0]["time/epoch_s"] - epochs[-1]["time/epoch_s"]
    note = "last epoch" + (f"; the first took {compile_s:.0f} s longer (compiling)" if "compiled" in name else "")
    s.add(part, f"{name}: training throughput", images_s, "img/s", None, note=note, command=command)
    s.add(part, f"{name}: peak memory", probe["peak_mem_mb"], "MiB", None,
          note="CUDA allocator peak over the run" if probe["peak_mem_kind"].startswith("cuda") else "process peak RSS",
          command=command)
    if "compiled" in name:
        eager = next((c for c in s.checks if c.name == name.replace("compiled", "eager") + ": training throughput"),
                     None)
        if eager is not None and isinstance(eager.value, float) and eager.value > 0:
            s.add(part, f"{name}: throughput vs eager", images_s / eager.value, "x", Target(">=", 1.0),
                  note=f"{images_s:,.0f} vs {eager.value:,.0f} img/s", command=command)
        reasons = "; ".join(probe.get("recompile_reasons", [])[:2])
        s.add(part, f"{name}: recompilations", probe["recompiles"], "", Target("<=", 2, gpu_only=False),
              note=(f"recompile-limit hits {probe['recompile_limit_hits']}" + (f"; {reasons}" if reasons else "")),
              command=command, status=None if probe["recompile_limit_hits"] == 0 else "fail")
        breaks = "; ".join(probe.get("graph_break_reasons", [])[:2])
        s.add(part, f"{name}: graph breaks", probe["graph_breaks"], "", None,
              note=f"{probe['unique_graphs']} graphs" + (f"; {breaks[:300]}" if breaks else ""), command=command)


# ----------------------------------------------------------------------------------------------- 4. time

def time_configs(s: Session) -> list[str]:
    if not s.cuda:
        return list(CPU_TIME_CONFIGS)
    import yaml

    listed = yaml.safe_load((REPO / COMPARE_LIST).read_text())["configs"]
    return [os.path.relpath((REPO / COMPARE_LIST).parent / path, REPO) for path in listed]


def part_time(s: Session, clock: PartClock) -> None:
    """`--task time` over the compare list's configs, in chunks of several --config each, so that a chunk that
    runs out of time loses only its own rows."""
    configs = time_configs(s)
    if s.cuda:
        settings = (["time.batch_size=128", "time.warmup=3", "time.iters=10", "time.latency_iters=20"]
                    if s.mode == "full" else ["time.batch_size=128", "time.warmup=2", "time.iters=3",
                                              "time.latency_iters=5"]) + ["train.amp=bf16", "device=cuda"]
    else:
        settings = ["time.batch_size=2", "time.warmup=0", "time.iters=1", "time.latency_iters=1", "train.amp=none",
                    "device=cpu"]
    chunks = [configs[i:i + 6] for i in range(0, len(configs), 6)]
    measured: dict[str, dict] = {}
    for index, chunk in enumerate(chunks):
        out_dir = s.work / "time" / f"chunk{index}"
        args = [PYTHON, "main.py", "--task", "time", *[a for c in chunk for a in ("--config", c)],
                *[a for item in settings for a in ("--set", item)], "--output", str(out_dir)]
        timeout = clock.timeout(min_s=8)
        names = ", ".join(Path(c).stem for c in chunk)
        if timeout is None:
            s.skip("time", f"--task time: {names}", "the part's budget was spent", shlex.join(["python", *args[1:]]))
            continue
        timeout = timeout if index == len(chunks) - 1 else max(8.0, timeout / (len(chunks) - index) * 1.5)
        # The time task measures each model for time.budget_s (35 s by default: minutes per chunk), so the run
        # sets it: at most half the chunk's timeout for the rounds (the rest starts and warms up its models), and
        # at most TIME_BUDGET_S per model, which holds tens of rounds on a GPU (one round took about 1 s there).
        per_model = min(TIME_BUDGET_S[s.mode if s.cuda else "cpu"], int(5 * timeout / len(chunk)) / 10)  # tenths
        budget = ["--set", f"time.budget_s={max(0.5, per_model):g}"]
        args[args.index("--output"):args.index("--output")] = budget
        r = s.run(args, timeout)
        s.say(f"time: chunk {index + 1}/{len(chunks)} {'ok' if r.ok else 'FAILED'} in {r.seconds:.0f} s")
        path = out_dir / "time.json"
        if not r.ok or not path.exists():
            s.failed("time", f"--task time: {names}", r, "" if not r.ok else f"no time.json: {r.tail()}")
            continue
        for row in json.loads(path.read_text()):
            measured[row.get("model", "?")] = row
            s.add("time", f"{row.get('model')}: training throughput (batch {row.get('batch_size')})",
                  row.get("train_img_s"), "img/s", None, command=r.command, note=_time_note(row))
    s.add("time", "configs measured", len(measured), f"of {len(configs)}", f"all {len(configs)}",
          status="pass" if len(measured) == len(configs) else "fail",
          note="" if len(measured) == len(configs) else "missing: " + ", ".join(
              sorted({Path(c).stem for c in configs} - set(measured))))
    sasa, conv = measured.get("sasa_resnet26_cifar10"), measured.get("resnet26_cifar10")
    if sasa and conv and conv.get("train_img_s"):
        s.add("time", "sasa_resnet26 / resnet26 training throughput", sasa["train_img_s"] / conv["train_img_s"], "x",
              Target(">=", 0.5), note="the SASA step within 2x of the conv step")


def _time_note(row: dict) -> str:
    """The rest of a time.json row, leaving out what a later version of the time task may not have."""
    parts = []
    for key, template, scale in (("infer_img_s", "inference {:,.0f} img/s", 1), ("latency_ms", "latency {:.2f} ms", 1),
                                 ("peak_mem_mb", "peak {:.0f} MiB", 1), ("flops", "{:.3f} GFLOPs", 1e-9),
                                 ("params", "{:.2f}M params", 1e-6)):
        if isinstance(row.get(key), (int, float)):
            parts.append(template.format(row[key] * scale))
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- the run

def probe_environment(s: Session) -> None:
    r = s.run([PYTHON, "-c", ENV_PROBE], timeout=120)
    r.command = "python -c ENV_PROBE (bench/gpu_check.py)"
    line = next((line for line in r.out.splitlines() if line.startswith("ENV ")), None)
    s.env = json.loads(line[4:]) if line else {"error": r.failure()}
    s.cuda = bool(s.env.get("cuda"))
    if s.cuda:
        s.add("env", f"CUDA device {s.env.get('device')}", "yes" if s.env.get("kernel_ok") else "no", "",
              "a matmul on the device matches the CPU", status="pass" if s.env.get("kernel_ok") else "fail",
              command=r.command)
        s.add("env", "Triton importable", s.env.get("triton") or "no", "", "yes (the fused kernels need it)",
              status="pass" if s.env.get("triton") else "fail", command=r.command)
    elif "error" in s.env:
        s.error("env", "torch imports", s.env["error"], r.command)


PART_FUNCTIONS = {"tests": part_tests, "benches": part_benches, "train": part_train, "time": part_time}


def run_parts(s: Session, parts: list[str], budgets: dict[str, float]) -> None:
    carry = 0.0
    for name in parts:
        start = time.monotonic()
        budget = budgets[name] + carry
        clock = PartClock(min(start + budget, s.deadline - RESERVE_S))
        s.say(f"{name}: up to {clock.left():.0f} s")
        note = ""
        try:
            PART_FUNCTIONS[name](s, clock)
        except Exception as exc:  # noqa: BLE001 - one broken part must not cost the others
            s.log.write(f"\n===== part {name} raised:\n{traceback.format_exc()}")
            s.error(name, f"{name} part", f"{type(exc).__name__}: {exc}")
            note = "raised"
        used = time.monotonic() - start
        carry = max(0.0, budget - used)
        s.parts.append({"name": name, "budget_s": round(budget, 1), "used_s": round(used, 1), "note": note})
        s.write()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for gpu_check.json/.md/.log "
                                                    "[default: runs/gpu_check/<timestamp>]")
    parser.add_argument("--quick", action="store_true", help="the 3-minute form (always used without CUDA)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole run's budget in seconds (the parts' budgets scale with it) "
                             "[default: 480, 180 with --quick]")
    parser.add_argument("--families", default="", help="train only these families (comma-separated, of "
                        f"{', '.join(f for f, _ in FAMILIES)}): to rerun what a budget cut short [default: all]")
    parser.add_argument("--work", default=None, help="keep run folders and bench outputs in this folder "
                                                     "[default: a temporary folder, deleted at the end]")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.exit(2, f"error: --parts takes a comma-separated subset of {', '.join(PARTS)}, got {args.parts!r}\n")
    if args.budget_s is not None and args.budget_s <= RESERVE_S:
        parser.exit(2, f"error: --budget-s must be more than {RESERVE_S} seconds, got {args.budget_s:g}\n")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.exit(2, f"error: --out {args.out} is a file; give a folder\n")
    if args.out and (Path(args.out) / "gpu_check.json").exists():
        parser.exit(2, f"error: --out {args.out} already holds an earlier run's gpu_check.json; give another folder "
                       f"(or move that run away)\n")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    known = [f for f, _ in FAMILIES]
    if [f for f in families if f not in known]:
        parser.exit(2, f"error: --families takes a comma-separated subset of {', '.join(known)}, "
                       f"got {args.families!r}\n")
    if families and "train" not in parts:
        parser.exit(2, f"error: --families chooses what the train part trains, and --parts {args.parts} leaves it "
                       f"out; add train to --parts\n")
    args.parts, args.families = parts, families
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else REPO / "runs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    mode = "quick" if args.quick else "full"
    s = Session(out, work, mode, args.budget_s or TOTAL_S[mode], command)
    s.families = args.families
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # still write the files
    try:
        probe_environment(s)
        if not s.cuda:
            why = f"torch does not work here ({s.env['error']})" if "error" in s.env else "no CUDA device here"
            print(f"{why}: running every part in its CPU smoke form; the GPU figures need a CUDA machine "
                  f"(exit code 0)", flush=True)
            s.mode = mode = "quick"
            if args.budget_s is None:
                s.total_s = TOTAL_S[mode]
                s.deadline = s.started + s.total_s
        shares = {name: SHARES[mode][name] for name in args.parts}
        scale = max(s.total_s - SETUP_S, 0.0) / sum(shares.values())
        run_parts(s, args.parts, {name: share * scale for name, share in shares.items()})
    except (KeyboardInterrupt, SystemExit):
        s.interrupted = True
        raise
    finally:
        s.stop_child()
        s.write()
        s.log.close()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table = (out / "gpu_check.md").read_text()
    print("\n" + table)
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'} and {out / 'gpu_check.log'}")
    if not s.cuda:
        return 0
    counts = s.summary()
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
