"""How a study's runs get run: `local` (one after another, in this process) or `slurm` (a job each, via submitit).

Several `local` study processes may work on one study folder at once (two one-thread processes use two CPU
cores better than one two-thread process; or one process per GPU): each claims a run with an exclusive lock
(`<study>/.running/<config>-seed<k>.lock`, released by the system when the process ends, even killed) and
skips the runs another process holds.

Both run the same `StudyJob`: measure the config's cost once (cost.json next to its seeds), train into the run
folder (resuming its last.ckpt if there is one), then refresh the study's table and figures. A SLURM job
with several GPUs runs one task per GPU, and each task joins the DDP process group that SLURM's environment
describes (submitit's TorchDistributedEnvironment exports MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and
LOCAL_RANK, as torchrun would). A job preempted or at its time limit is requeued by submitit and resumes from
the run's last.ckpt (saved every epoch, or every train.checkpoint_every_steps).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no claims; run one study process per folder there
    fcntl = None

from common.errors import TrainingInterrupted, UserError

# The submitit cluster behind `--launcher slurm`; tests set "local" or "debug" (submitit's own stand-ins).
SUBMITIT_CLUSTER = "slurm"
JOB_MARKER = "slurm_job_id"  # in a run folder: the job that runs it, so a rerun does not submit it twice


def check_launcher(study) -> None:
    """A launcher that cannot run here is a one-line error before any run starts."""
    if study.launcher != "slurm":
        return
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--launcher slurm needs submitit, which is not installed: pip install submitit") from None
    if SUBMITIT_CLUSTER == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: SLURM is not installed here (no sbatch on PATH); run the study on the "
                        "cluster's login node, or use --launcher local")


class StudyJob:
    """One run of a study, the same on this machine and in a SLURM job (picklable: plain data only)."""

    def __init__(self, config: dict, folder: str, study_folder: str, quiet: bool = True):
        self.config, self.folder, self.study_folder, self.quiet = config, folder, study_folder, quiet

    def __call__(self) -> dict:
        from common.config import config_from_dict
        from common.inspect.study_report import COST_FILE
        from common.tasks.study import measure_cost, refresh_report
        from common.tasks.training import train

        cfg = config_from_dict(self.config, source=f"{self.folder}/config.yaml")
        _export_slurm_process_group()
        main_rank = int(os.environ.get("RANK", "0")) == 0
        cost = Path(self.folder).parent / COST_FILE
        if main_rank and not cost.is_file():
            measure_cost(cfg, cost)
        summary = train(cfg, output=self.folder, quiet=self.quiet)
        if main_rank:
            refresh_report(Path(self.study_folder), quiet=True)
        return {"test_acc": summary["test_acc"], "run_dir": summary["run_dir"]}

    def checkpoint(self, *args, **kwargs):
        """submitit calls this at a time limit or preemption: requeue the same job, which resumes last.ckpt."""
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _export_slurm_process_group() -> None:
    """In a submitit job with several tasks, the torchrun-style variables init_distributed reads."""
    try:
        import submitit
    except ImportError:
        return
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job: this machine, or torchrun's own variables
        return
    if env.num_tasks < 2:
        return
    # Each task sees all of its node's GPUs and takes cuda:LOCAL_RANK, as under torchrun.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def launch(study, pending: list, quiet: bool = False) -> None:
    if study.launcher == "local":
        _run_here(study, pending, quiet)
    else:
        _submit(study, pending)


def _job(run, study, quiet: bool) -> StudyJob:
    from common.config import config_to_dict

    # Absolute: a SLURM job may start in another working directory.
    return StudyJob(config_to_dict(run.cfg), str(run.folder.resolve()), str(study.folder.resolve()), quiet)


CLAIMS = ".running"  # in a study folder: a lock file per run that a local study process is running


@contextlib.contextmanager
def claim(study, run):
    """Yields True while this process holds run's lock, False if another study process holds it."""
    if fcntl is None:
        yield True
        return
    path = study.folder / CLAIMS / f"{run.name}-seed{run.seed}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_here(study, pending: list, quiet: bool) -> None:
    from common.tasks.study import refresh_report

    failures, elsewhere = [], []
    for i, run in enumerate(pending, start=1):
        with claim(study, run) as mine:
            if not mine:
                elsewhere.append(run)
                print(f"[{i}/{len(pending)}] {run.name} seed {run.seed}: being run by another study process; "
                      f"skipped", flush=True)
                continue
            if run.finished:  # by another study process, since this one started
                print(f"[{i}/{len(pending)}] {run.name} seed {run.seed}: finished by another study process",
                      flush=True)
                continue
            print(f"[{i}/{len(pending)}] {run.name} seed {run.seed} -> {run.folder}", flush=True)
            failures += _run_one(study, run, quiet)
    refresh_report(study.folder)
    elsewhere = [run for run in elsewhere if not run.finished]
    if elsewhere:
        print(f"{len(elsewhere)} run{'s' * (len(elsewhere) != 1)} still being run by another study process "
              f"({', '.join(f'{r.name} seed {r.seed}' for r in elsewhere)}); the table is complete when it ends",
              flush=True)
    _raise_failures(failures, len(pending), study)


def _run_one(study, run, quiet: bool) -> list[str]:
    """Train one run here; returns its failure (a diverged run: the others still run), if any."""
    from common.tasks.study import refresh_report

    try:
        _job(run, study, quiet)()
    except TrainingInterrupted as exc:
        refresh_report(study.folder, quiet=True)
        name = signal.Signals(exc.signum).name
        raise TrainingInterrupted(f"{name}: the study stopped in {run.folder} (its last.ckpt is saved); rerun "
                                  f"the same study command to continue: finished runs are skipped, this one "
                                  f"resumes", exc.signum) from None
    except UserError as exc:
        print(f"run failed: {run.folder}: {exc}", flush=True)
        return [f"{run.folder}: {exc}"]
    return []


def _raise_failures(failures: list[str], total: int, study) -> None:
    if failures:
        raise UserError(f"{len(failures)} of {total} runs failed ({failures[0]}{' ...' if len(failures) > 1 else ''});"
                        f" the others are in {study.folder}/study.md; fix the cause and rerun the study (finished "
                        f"runs are kept)")


def _active_job(folder: Path) -> str | None:
    """The id of a queued or running SLURM job already running this folder's run, else None."""
    marker = folder / JOB_MARKER
    if SUBMITIT_CLUSTER != "slurm" or not marker.is_file():
        return None
    job_id = marker.read_text().strip()
    try:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return job_id if state else None


def _submit(study, pending: list) -> None:
    import submitit

    from common.files import write_atomic
    from common.tasks.study import refresh_report

    options = study.slurm
    executor = submitit.AutoExecutor(folder=study.folder / "slurm" / "%j", cluster=SUBMITIT_CLUSTER)
    params = {"name": study.name, "timeout_min": options.time_limit_min, "nodes": options.nodes,
              "tasks_per_node": max(options.gpus_per_node, 1), "gpus_per_node": options.gpus_per_node}
    params.update({key: value for key, value in (("cpus_per_task", options.cpus_per_task),
                                                 ("mem_gb", options.mem_gb),
                                                 ("slurm_partition", options.partition),
                                                 ("slurm_account", options.account)) if value is not None})
    executor.update_parameters(**params)
    jobs = []
    for run in pending:
        active = _active_job(run.folder)
        if active:
            print(f"{run.folder}: already queued or running as job {active}; not submitted again")
            continue
        executor.update_parameters(name=f"{study.name}/{run.name}/seed{run.seed}")
        job = executor.submit(_job(run, study, quiet=True))
        write_atomic(run.folder / JOB_MARKER, f"{job.job_id}\n")
        jobs.append((run, job))
    print(f"submitted {len(jobs)} job{'s' * (len(jobs) != 1)} ({', '.join(str(j.job_id) for _, j in jobs)}); logs in "
          f"{study.folder / 'slurm'}. Waiting for them (Ctrl-C stops waiting, not the jobs; "
          f"`python main.py --task report --runs {study.folder}` shows the table meanwhile)", flush=True)
    failures = []
    for run, job in jobs:
        try:
            job.results()  # one per task (a multi-GPU job has several)
        except Exception as exc:  # submitit re-raises the job's failure with its traceback
            lines = [line for line in str(exc).splitlines() if line.strip()]
            failures.append(f"{run.folder}: job {job.job_id} failed ({lines[-1] if lines else type(exc).__name__})")
            print(failures[-1], flush=True)
        refresh_report(study.folder, quiet=True)
    refresh_report(study.folder)
    _raise_failures(failures, len(jobs), study)
