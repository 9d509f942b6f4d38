"""What a study costs on this machine's CPU, before running it: per config, CPU time per training and per
evaluated image, and the whole study's CPU time and predicted duration.

    python bench/study_budget.py --config configs/study/fashion_mnist.yaml [--set train.epochs=4] [--speedup]
                                 [--processes 2]

Each config's model runs real training steps (forward, cross-entropy, backward, SGD step) and evaluation
passes at the config's batch sizes on random inputs of the data's shape, on ONE thread, timed by process
CPU time: unlike wall time, that hardly depends on what else the machine runs, so it estimates a quiet run.
The study's CPU time is then, per run,

    epochs x (train images x train cost + val images x eval cost) + test images x eval cost

summed over configs and seeds (the data and the cost measurement add a few seconds per run, not counted).
Dividing by the speedup that the default threads give over one thread is the predicted duration; --speedup
measures it here (wall time of the same steps at 1 thread and at torch's default, interleaved; meaningful
only on a quiet machine), otherwise the table assumes 1.5 for 2 threads.

`--processes N` predicts instead N study processes sharing the study folder, each on one thread
(`OMP_NUM_THREADS=1`, one per core): each takes the next run no other process holds, so the duration is the
longest of N queues filled in the study's order, assuming the processes do not slow each other down.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.data.loaders import build_data, input_spec  # noqa: E402
from common.inspect.timing import timed_rounds  # noqa: E402
from common.tasks.study import load_study  # noqa: E402
from common.train.engine import build_model  # noqa: E402

ASSUMED_SPEEDUP = 1.5


def split_sizes(cfg) -> tuple[int, int, int]:
    """Images per epoch in the train and val splits, and in the test split, as the loaders will see them."""
    data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, torch.device("cpu"), cfg.seed)
    train = len(data.train) * cfg.train.batch_size  # full batches only
    return train, data.val.num_samples if data.val is not None else 0, data.test.num_samples


def steps_for(cfg):
    input_size, num_classes = input_spec(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(cfg.train.batch_size, *input_size)
    y = torch.randint(0, num_classes, (cfg.train.batch_size,))
    x_eval = torch.randn(min(cfg.train.eval_batch_size, 500), *input_size)

    def train_step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_step():
        model.eval()
        with torch.inference_mode():
            model(x_eval)

    return train_step, eval_step, len(x), len(x_eval)


def cpu_seconds(fn, repeats: int) -> float:
    """Median process CPU seconds of fn() after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


def parallel_duration(run_seconds: list[float], processes: int) -> float:
    """Wall time of runs taken in order by `processes` one-thread processes, each the next when it is free."""
    free_at = [0.0] * processes
    for seconds in run_seconds:
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds)
    return max(free_at)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a study file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--speedup", action="store_true", help="measure the default threads' speedup over 1")
    parser.add_argument("--processes", type=int, default=1,
                        help="predict N one-thread study processes sharing the folder (default 1: one process)")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    study = load_study(args.config, args.overrides, output="/nonexistent/study_budget")  # checks, writes nothing
    configs = {run.name: run.cfg for run in study.runs if run.seed == study.seeds[0]}
    default_threads = torch.get_num_threads()
    sizes = split_sizes(next(iter(configs.values())))
    print(f"study {study.name}: {len(configs)} configs x {len(study.seeds)} seeds; images per epoch train "
          f"{sizes[0]}, val {sizes[1]}; test {sizes[2]}; load average {os.getloadavg()[0]:.1f}")
    print(f"| config | train ms/img (1 thread CPU) | eval ms/img | epochs | CPU min / run | "
          f"{'speedup at ' + str(default_threads) + ' threads | ' if args.speedup else ''}")
    total, wall, speedups, run_seconds = 0.0, 0.0, [], {}
    for name, cfg in configs.items():
        torch.set_num_threads(1)
        train_step, eval_step, batch, eval_batch = steps_for(cfg)
        train_ms = 1e3 * cpu_seconds(train_step, args.repeats) / batch
        eval_ms = 1e3 * cpu_seconds(eval_step, args.repeats) / eval_batch
        train_n, val_n, test_n = split_sizes(cfg) if cfg.data != next(iter(configs.values())).data else sizes
        epochs = cfg.train.epochs
        run_s = epochs * (train_n * train_ms + val_n * eval_ms) / 1e3 + test_n * eval_ms / 1e3
        total += run_s * len(study.seeds)
        run_seconds[name] = run_s
        extra = ""
        if args.speedup:
            def at(threads, fn=train_step):
                def call():
                    torch.set_num_threads(threads)
                    fn()
                return call
            medians = timed_rounds({"one": at(1), "default": at(default_threads)}, args.repeats, torch.device("cpu"))
            speedups.append(medians["one"] / medians["default"])
            extra = f" {speedups[-1]:.2f} |"
        wall += run_s * len(study.seeds) / (speedups[-1] if speedups else ASSUMED_SPEEDUP)
        print(f"| {name} | {train_ms:.2f} | {eval_ms:.2f} | {epochs} | {run_s / 60:.1f} |{extra}", flush=True)
    how = "the speedups measured here" if speedups else f"an assumed speedup of {ASSUMED_SPEEDUP}"
    if args.processes == 1:
        print(f"whole study: {total / 3600:.2f} CPU-hours on one thread; at {default_threads} threads, with {how}, "
              f"about {wall / 3600:.2f} hours on a quiet machine")
        return
    in_order = [run_seconds[run.name] for run in study.runs]
    hours = parallel_duration(in_order, args.processes) / 3600
    lacking = "" if args.processes <= (os.cpu_count() or 1) else f" (this machine has {os.cpu_count()})"
    print(f"whole study: {total / 3600:.2f} CPU-hours on one thread; {args.processes} study processes of one thread "
          f"each on {args.processes} quiet cores{lacking}: about {hours:.2f} hours (one process at {default_threads} "
          f"threads, with {how}: {wall / 3600:.2f} hours)")


if __name__ == "__main__":
    main()
