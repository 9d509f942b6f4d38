"""One entry point for every paper and task.

    python main.py --config configs/quickstart.yaml --task train
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before torch loads its OpenMP runtime, which reads this once: threads that spin while waiting make every
    # CPU op several times slower when the cores are shared with other processes (README, "Threads on the CPU").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import difflib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import click  # noqa: E402

from common.errors import TrainingInterrupted, UserError, did_you_mean  # noqa: E402
from common.files import WRITE_ERRNOS, check_output_dir  # noqa: E402

# The core's tasks; model packages add figure tasks of their own (common.registry.register_figure_task).
TASKS = {
    "train": "train the config's model; writes checkpoints, logs and a summary into the run folder",
    "eval": "accuracy of a checkpoint (--load) on the val and test splits",
    "viz": "attention maps averaged over queries, per layer and head",
    "viz_1": "attention maps of one query pixel, per layer and head",
    "time": "params, MACs/FLOPs, throughput, latency and peak memory; several --config (or a config list such "
            "as configs/compare/cifar.yaml) give one table and a throughput-vs-params plot",
    "report": "table of run folders (--runs): accuracy mean and 95% CI over seeds, next to the paper's number; "
              "on a study folder, the study's table and figures",
    "study": "every (config, seed) of a study file (--config configs/study/*.yaml) into runs/<study>/, resumable, "
             "with one table and figures; --launcher local or slurm",
}


EXAMPLES = ("\b\nExamples:\n  python main.py --config configs/quickstart.yaml --task train\n"
            "  python main.py --config configs/quickstart.yaml --resume --set train.epochs=20\n"
            "  python main.py --config configs/quickstart.yaml --output runs/quickstart/<timestamp> \\\n"
            "      --set train.optimizer.lr=0.01 --allow-change train.optimizer.lr\n"
            "  python main.py --task eval --load runs/quickstart/<timestamp>\n"
            "  python main.py --task viz_1 --load runs/<config>/<timestamp> --index 3 --pixel 10 20\n"
            "  python main.py --task time --config configs/compare/cifar.yaml\n"
            "  python main.py --task report --runs runs/\n"
            "  python main.py --task study --config configs/study/fashion_mnist.yaml\n"
            "  python main.py --task study --config configs/study/fashion_mnist.yaml --launcher slurm --partition gpu\n"
            "  torchrun --nproc_per_node 8 main.py --config configs/baselines/resnet18_cifar10.yaml")


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if len(lines) > 1 else lines[0]
    prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
    return line.split(prefix, 1)[-1]


def _usage_line(exc: click.UsageError) -> str:
    """click's usage error as our one line (click prints a usage line, a hint and the error on three)."""
    if isinstance(exc, click.NoSuchOption):
        best = difflib.get_close_matches(exc.option_name, exc.possibilities or [], n=1, cutoff=0.0)
        close = f" (did you mean {best[0]}?)" if best else ""
        return f"no such option: {exc.option_name}{close}; see --help"
    text = " ".join(exc.format_message().split())
    return f"{text[:1].lower()}{text[1:].rstrip('.')}; see --help"


def _ignore_stop_signals() -> None:
    """The run is ending: a late Ctrl-C must not turn its exit code into 'terminated by signal 2'."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


class _Command(click.Command):
    """Lists the figure tasks of the model packages in --help (importing them only when help is asked for);
    reports command-line mistakes as one line."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            click.echo(f"error: {_usage_line(exc)}", err=True)
            sys.exit(UserError.exit_code)
        except click.Abort:  # Ctrl-C while click parsed the command line
            sys.exit(130)

    def format_epilog(self, ctx, formatter):
        from common.registry import figure_tasks

        tasks = {**TASKS, **{name: task.help for name, task in figure_tasks().items()}}
        self.epilog = ("\b\nTasks:\n" + "\n".join(f"  {name:<10} {text}" for name, text in tasks.items())
                       + "\n\n" + EXAMPLES)
        super().format_epilog(ctx, formatter)


def is_known_task(task: str) -> bool:
    """A core task, or a figure task registered by the packages imported so far."""
    if task in TASKS:
        return True
    from common.registry import figure_tasks

    return task in figure_tasks()


def check_task(task: str) -> None:
    """A one-line error with a suggestion unless the task is known."""
    if is_known_task(task):
        return
    from common.registry import figure_tasks

    known = [*TASKS, *figure_tasks()]
    raise UserError(f"unknown task '{task}'{did_you_mean(task, known)}; tasks: {', '.join(known)}")


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--config", "configs", multiple=True, metavar="YAML",
              help="Config file (repeat with --task time to compare models).")
@click.option("--task", default="train", show_default=True, metavar="TASK", help="What to do (tasks below).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, value parsed as YAML (repeatable), e.g. --set train.epochs=5.")
@click.option("--output", metavar="DIR", help="Run / output folder [default: runs/<config name>/<timestamp>]. "
                                              "Training into a folder that holds a run resumes it.")
@click.option("--resume", is_flag=True, help="Continue the newest run of this config whose settings match (or the "
                                             "--output run).")
@click.option("--allow-change", "allow_changes", multiple=True, metavar="KEY",
              help="train: let a resumed run take a new value of KEY (train.optimizer.lr, train.grad_clip or "
                   "train.schedule.*), e.g. a lower lr after a divergence; the run records the change.")
@click.option("--load", metavar="DIR|FILE", help="Checkpoint (or run folder) for eval, viz, time and figure tasks.")
@click.option("--quiet", is_flag=True, help="No progress bar: one line per epoch (for batch jobs).")
@click.option("--image", metavar="PATH", help="viz/viz_1: an image file (any format Pillow reads) to look at.")
@click.option("--index", type=int, metavar="N", help="viz/viz_1: image N of the dataset's test split [default: 0].")
@click.option("--pixel", type=int, nargs=2, metavar="Y X", help="viz_1: the query pixel [default: the centre].")
@click.option("--layers", metavar="SPEC", help="viz/viz_1: layers to draw: indices, names or globs, comma-separated "
                                               "(e.g. 0,3,-1 or 'stages.2.*'), or 'all' [default: at most 8].")
@click.option("--heads", metavar="SPEC", help="viz/viz_1: heads to draw per layer: indices (e.g. 0,1 or -1), 'mean' "
                                              "(one panel per layer) or 'all' [default: all, or the mean when a "
                                              "layer has more than 4].")
@click.option("--runs", multiple=True, metavar="DIR", help="report: run folders or folders of run folders "
                                                           "(--runs A B C, or repeat --runs).")
@click.option("--launcher", metavar="NAME", help="study: local (one run after another here) or slurm (a SLURM "
                                                 "job per run, through submitit) [default: the study file's]")
@click.option("--partition", metavar="NAME", help="study --launcher slurm: the SLURM partition.")
@click.option("--nodes", type=int, metavar="N", help="study --launcher slurm: nodes per run.")
@click.option("--gpus-per-node", type=int, metavar="N", help="study --launcher slurm: GPUs (DDP processes) per node.")
@click.option("--time-limit", type=int, metavar="MIN", help="study --launcher slurm: each job's time limit, minutes.")
@click.option("--account", metavar="NAME", help="study --launcher slurm: the SLURM account to charge.")
@click.argument("more_runs", nargs=-1, metavar="")
def main(configs, task, overrides, output, resume, allow_changes, load, quiet, image, index, pixel, layers, heads,
         runs, launcher, partition, nodes, gpus_per_node, time_limit, account, more_runs):
    """Self-attention as a replacement for convolution: train, evaluate, time and inspect the papers' models."""
    try:
        if more_runs and not runs:
            raise UserError(f"unexpected argument(s): {' '.join(more_runs)} (options start with --; see --help)")
        slurm = {"partition": partition, "nodes": nodes, "gpus_per_node": gpus_per_node, "time_limit_min": time_limit,
                 "account": account}
        run(configs, task, overrides, output, resume, load, quiet, image=image, index=index,
            pixel=tuple(pixel) if pixel else None, layers=layers, heads=heads, runs=list(runs) + list(more_runs),
            allow_changes=allow_changes, launcher=launcher, slurm=slurm)
    except UserError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(UserError.exit_code)
    except TrainingInterrupted as exc:
        _ignore_stop_signals()
        _echo_if_possible(str(exc))
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        _ignore_stop_signals()
        _echo_if_possible("aborted" + ("; a training run continues from its last checkpoint with --resume"
                                       if task in ("train", "study") else ""))
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        # A write outside the paths that name their file (e.g. a library's): still one line, exit 2.
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: cannot write{where}: {exc.strerror}; free some space (or fix the permissions); "
                   f"a training run continues from its last checkpoint with --resume", err=True)
        sys.exit(UserError.exit_code)


def _echo_if_possible(message: str) -> None:
    try:
        click.echo(message, err=True)
    except OSError:  # the terminal went away (SIGHUP)
        pass


def run(configs, task, overrides, output, resume, load, quiet, image=None, index=None, pixel=None, layers=None,
        heads=None, runs=(), allow_changes=(), launcher=None, slurm=None):
    # Everything here up to `from common import tasks` runs without torch, so that a mistake in the command
    # line or the config is reported in a fraction of a second (the model options are checked last).
    from common.config import expand_config_lists, is_study_file, load_config

    # A figure task may come from a package that the config imports (custom_imports): it is known once the
    # config (or, with --load alone, the checkpoint's config) is loaded.
    pending = not is_known_task(task)
    if pending and not (configs or load):
        check_task(task)
    if output:
        check_output_dir(output)
    if task == "report":
        if not runs:
            raise UserError("--task report needs --runs DIR [DIR ...] (run folders, or folders that hold them)")
        if configs:
            raise UserError("--task report reads each run's own config.yaml; drop --config")
        from common.inspect import report

        report.report(runs, output)
        return
    if runs:
        raise UserError(f"--runs is for --task report, not {task}")
    study_options = [name for name, value in (("--launcher", launcher), *(
        (f"--{key.replace('_min', '').replace('_', '-')}", value) for key, value in (slurm or {}).items()))
        if value is not None]
    if task == "study":
        _study(configs, overrides, output, resume, load, quiet, launcher, slurm)
        return
    if study_options:
        raise UserError(f"{', '.join(study_options)} only apply to --task study, not {task}")
    studies = [path for path in configs if is_study_file(path)]
    if studies:
        raise UserError(f"{studies[0]} is a study file; run it with --task study")
    viz_options = {"--image": image, "--index": index, "--pixel": pixel, "--layers": layers, "--heads": heads}
    given = [name for name, value in viz_options.items() if value is not None]
    if given and task not in ("viz", "viz_1"):
        raise UserError(f"{', '.join(given)} only apply to --task viz and viz_1, not {task}")
    if allow_changes and not (task == "train" and (resume or output)):
        raise UserError("--allow-change applies when resuming a training: use it with --task train and --resume "
                        "or --output RUN_DIR")
    if not configs and not (task not in ("train", "time") and load):
        raise UserError("--config is required (e.g. --config configs/quickstart.yaml)")
    paths, lists = expand_config_lists(configs)
    if lists and task != "time":
        raise UserError(f"{lists[0]} is a config list, which only --task time accepts; pass one of its configs")
    cfgs = [load_config(path, overrides) for path in paths]
    if pending and cfgs:
        check_task(task)
    if len(cfgs) > 1 and task != "time":
        raise UserError(f"several --config are only accepted by --task time, not {task}")
    from common import tasks

    if task == "train":
        tasks.train(cfgs[0], output=output, resume=resume, quiet=quiet, allow_changes=allow_changes)
    elif task == "eval":
        if not load:
            raise UserError("--task eval needs --load CHECKPOINT_OR_RUN_DIR")
        tasks.evaluate_checkpoint(cfgs[0] if cfgs else None, load, output)
    elif task == "time":
        tasks.time_models(cfgs, load=load, output=output, quiet=quiet)
    elif task in ("viz", "viz_1"):
        tasks.visualize(task, cfgs[0] if cfgs else None, load=load, output=output, image=image, index=index,
                        pixel=pixel, layers=layers, heads=heads)
    else:
        tasks.draw_model_figure(task, cfgs[0] if cfgs else None, load=load, output=output)


def _study(configs, overrides, output, resume, load, quiet, launcher, slurm):
    if len(configs) != 1:
        raise UserError("--task study needs one --config: a study file (e.g. configs/study/fashion_mnist.yaml)")
    if resume or load:
        raise UserError("--task study resumes its runs by itself and loads no checkpoint: drop --resume / --load")
    from common.tasks.study import load_study, run_study

    study = load_study(configs[0], overrides, output=output, launcher=launcher, slurm_overrides=slurm)
    run_study(study, quiet=quiet)


if __name__ == "__main__":
    main()
