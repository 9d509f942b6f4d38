"""Train through main.py's command line in this process and report what the run folder does not hold: peak
memory and, with torch.compile, recompilations and graph breaks.

    python bench/train_probe.py --output-root DIR [--variants eager,compiled] -- MAIN_ARGS...

MAIN_ARGS are main.py's own arguments (`--config C --set key=value ...`). For each variant the probe runs
`main.py MAIN_ARGS --set train.compile=<false|true> --output DIR/<variant>` and then prints one line

    PROBE {"variant": ..., "rc": ..., "seconds": ..., "peak_mem_mb": ..., "recompiles": ..., "epochs": [...]}

- rc: main.py's exit code (0, or 2 for a one-line error, 1 for a crash, whose traceback goes to stderr);
- peak_mem_mb: torch.cuda.max_memory_allocated over the run, in MiB (the CUDA allocator's peak, reset before
  each variant); on the CPU the process's peak resident set size (`peak_mem_kind` says which);
- recompiles: torch._dynamo's "Recompiling function" events (TORCH_LOGS=recompiles), recompile_limit_hits: how
  often a function hit torch._dynamo.config.recompile_limit and fell back to eager (a recompilation storm),
  graph_breaks and unique_graphs: torch._dynamo's counters; all 0 for the eager variant;
- epochs: the run's metrics.jsonl records (train/loss, time/images_per_s, val/acc, ...).

The variants run one after the other in one process (the eager run also warms the Triton kernels' cache), so
both see the same data and weights initialisation. bench/gpu_check.py runs this for every model family.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"eager": "false", "compiled": "true"}


class DynamoEvents(logging.Handler):
    """Counts torch._dynamo's recompilations and recompile-limit hits from its log records."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.recompiles, self.limit_hits, self.reasons = 0, 0, []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break training
            return
        if message.startswith("Recompiling function"):
            self.recompiles += 1
            lines = [line.strip() for line in message.splitlines()[1:] if line.strip().startswith("-")]
            if lines and len(self.reasons) < 5:
                self.reasons.append(lines[0][:200])
        elif "hit config." in message and ("recompile_limit" in message or "cache_size_limit" in message):
            self.limit_hits += 1

    def reset(self) -> None:
        self.recompiles, self.limit_hits, self.reasons = 0, 0, []


def watch_dynamo() -> DynamoEvents:
    """Turn on torch's recompilation log and count its records (attached after set_logs, which resets handlers)."""
    torch._logging.set_logs(recompiles=True)
    events = DynamoEvents()
    logging.getLogger("torch._dynamo").addHandler(events)
    return events


def dynamo_counters() -> dict:
    """A copy of the torch._dynamo counters this probe reports (graph breaks by reason, unique graphs)."""
    from torch._dynamo.utils import counters

    return {"graph_break": dict(counters.get("graph_break", {})), "stats": dict(counters.get("stats", {}))}


def run_main(args: list[str]) -> tuple[int, str]:
    """main.py's CLI in this process; returns (exit code, error line)."""
    import main as cli

    try:
        cli.main.main(args=args, prog_name="main.py", standalone_mode=False)
        return 0, ""
    except SystemExit as exc:  # main.py exits 2 on a user error, 128 + signal when interrupted
        code = exc.code if isinstance(exc.code, int) else 1
        return code, "" if code == 0 else f"exit code {code}"
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported and not re-raised
        traceback.print_exc()
        return 1, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def read_epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe(variant: str, main_args: list[str], output_root: Path, events: DynamoEvents) -> dict:
    run_dir = output_root / variant
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if variant == "compiled":
        torch._dynamo.reset()
    events.reset()
    before = dynamo_counters()
    start = time.perf_counter()
    rc, error = run_main([*main_args, "--set", f"train.compile={VARIANTS[variant]}", "--output", str(run_dir)])
    seconds = time.perf_counter() - start
    after = dynamo_counters()
    breaks = sum(after["graph_break"].values()) - sum(before["graph_break"].values())
    graphs = after["stats"].get("unique_graphs", 0) - before["stats"].get("unique_graphs", 0)
    top_breaks = sorted(after["graph_break"].items(), key=lambda item: -item[1])[:3]
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2 ** 20, "cuda_max_memory_allocated"
    else:  # Linux reports ru_maxrss in KiB
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"
    return {"variant": variant, "rc": rc, "error": error, "seconds": round(seconds, 2), "run_dir": str(run_dir),
            "peak_mem_mb": round(peak, 1), "peak_mem_kind": kind, "recompiles": events.recompiles,
            "recompile_limit_hits": events.limit_hits, "recompile_reasons": list(events.reasons),
            "graph_breaks": breaks, "graph_break_reasons": [f"{n}x {reason[:200]}" for reason, n in top_breaks],
            "unique_graphs": graphs, "epochs": read_epochs(run_dir)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python bench/train_probe.py --output-root DIR [--variants eager,compiled] -- MAIN_ARGS...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", required=True, help="run folders go to DIR/<variant>")
    parser.add_argument("--variants", default="eager,compiled", help="comma-separated: eager, compiled")
    args = parser.parse_args(argv[:split])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    events = watch_dynamo()
    worst = 0
    for variant in variants:
        result = probe(variant, copy.copy(argv[split + 1:]), Path(args.output_root), events)
        print("PROBE " + json.dumps(result), flush=True)
        worst = worst or result["rc"]
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
