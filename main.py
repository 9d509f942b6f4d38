"""One entry point for every paper and task.

    python main.py --config configs/quickstart.yaml --task train
"""

from __future__ import annotations

import sys

import click

from common.errors import TrainingInterrupted, UserError

TASKS = {
    "train": "train the config's model; writes checkpoints, logs and a summary into the run folder",
    "eval": "accuracy of a checkpoint (--load) on the val and test splits",
    "viz": "attention maps averaged over queries, per layer and head",
    "viz_1": "attention maps of one query pixel, per layer and head",
    "gauss_viz": "Gaussian attention heads' contours per checkpoint (sa_conv models)",
    "time": "params, MACs/FLOPs, throughput, latency and peak memory; several --config give one table",
}


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if len(lines) > 1 else lines[0]
    prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
    return line.split(prefix, 1)[-1]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
               epilog="\b\nTasks:\n" + "\n".join(f"  {name:<10} {text}" for name, text in TASKS.items())
               + "\n\n\b\nExamples:\n  python main.py --config configs/quickstart.yaml --task train\n"
               "  python main.py --config configs/quickstart.yaml --resume --set train.epochs=20\n"
               "  python main.py --task eval --load runs/quickstart/<timestamp>\n"
               "  torchrun --nproc_per_node 8 main.py --config configs/baselines/resnet18_cifar10.yaml")
@click.option("--config", "configs", multiple=True, metavar="YAML",
              help="Config file (repeat with --task time to compare models).")
@click.option("--task", type=click.Choice(list(TASKS)), default="train", show_default=True, help="What to do.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, value parsed as YAML (repeatable), e.g. --set train.epochs=5.")
@click.option("--output", metavar="DIR", help="Run / output folder [default: runs/<config name>/<timestamp>]. "
                                              "Training into a folder that holds a run resumes it.")
@click.option("--resume", is_flag=True, help="Continue the latest run of this config (or the --output run).")
@click.option("--load", metavar="DIR|FILE", help="Checkpoint (or run folder) for eval, viz and time.")
@click.option("--quiet", is_flag=True, help="No progress bar: one line per epoch (for batch jobs).")
def main(configs, task, overrides, output, resume, load, quiet):
    """Self-attention as a replacement for convolution: train, evaluate, time and inspect the papers' models."""
    try:
        run(configs, task, overrides, output, resume, load, quiet)
    except UserError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(UserError.exit_code)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        click.echo("aborted; a training run continues from its last checkpoint with --resume", err=True)
        sys.exit(130)


def run(configs, task, overrides, output, resume, load, quiet):
    from common import tasks
    from common.config import load_config

    if not configs and not (task == "eval" and load):
        raise UserError("--config is required (e.g. --config configs/quickstart.yaml)")
    cfgs = [load_config(path, overrides) for path in configs]
    if len(cfgs) > 1 and task != "time":
        raise UserError(f"several --config are only accepted by --task time, not {task}")
    if task == "train":
        tasks.train(cfgs[0], output=output, resume=resume, quiet=quiet)
    elif task == "eval":
        if not load:
            raise UserError("--task eval needs --load CHECKPOINT_OR_RUN_DIR")
        tasks.evaluate_checkpoint(cfgs[0] if cfgs else None, load, output)
    elif task == "time":
        tasks.time_models(cfgs, load=load, output=output)
    else:
        tasks.visualize(task, cfgs[0], load=load)


if __name__ == "__main__":
    main()
