"""`study`: every (config, seed) of a study file, run into one folder, with one table and its figures.

A study file (configs/study/*.yaml) names configs, seeds and the overrides they share (the budget):

    study: fashion_mnist            # the study's name, its folder <output_root>/<study>/ (default: file stem)
    seeds: 3                        # seeds 0, 1, 2; or a list, e.g. [0, 1, 2]
    set: {train.epochs: 6}          # overrides for every run, as --set would give them
    configs:                        # paths relative to the study file
      - fashion_mnist/conv.yaml
      - {config: fashion_mnist/vit.yaml, name: vit_spt_lsa, set: {model.spt: true, model.lsa: true}}
    launcher: local                 # or slurm (--launcher overrides)
    slurm: {partition: gpu, nodes: 1, gpus_per_node: 1, time_limit_min: 120, account: null}

`--set` on the command line applies to every run after the study's own overrides. Each run goes to
<folder>/<name>/seed<k>/. Everything is checked before the first run starts: a missing config, a duplicate
name, a bad seed list, a config that does not validate, a launcher that is not installed, or a run folder
holding a run with another config is a one-line error (exit 2) with nothing written.

Running is resumable: a finished run is skipped, an interrupted one resumes from its last.ckpt, and after
each run the study's table and figures are refreshed (`common.inspect.study_report`; `--task report --runs
<folder>` gives the same). Killing and rerunning the study command never repeats finished work. The cost
columns (params, GMACs, training images/s) are measured once per config, into <folder>/<name>/cost.json.

Launchers (`common.tasks.launchers`): `local` runs one run after another in this process; `slurm` submits
each run as a SLURM job through submitit, multi-GPU jobs running DDP with the process group set up from
SLURM's environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.config import Config, is_study_file, load_config  # noqa: F401  (is_study_file: re-exported)
from common.errors import UserError, did_you_mean
from common.files import write_atomic
from common.inspect.study_report import STUDY_FILE, read_json

KEYS = ("study", "seeds", "set", "configs", "launcher", "slurm")
LAUNCHERS = ("local", "slurm")


@dataclass
class SlurmOptions:
    """Where and how big each run's SLURM job is (the study file's `slurm:`, or the command line)."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1  # one process (DDP rank) per GPU
    time_limit_min: int = 24 * 60
    account: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None

    @classmethod
    def from_dict(cls, raw, where: str) -> "SlurmOptions":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise UserError(f"{where}: 'slurm' must be a mapping of options ({', '.join(_field_names(cls))})")
        names = _field_names(cls)
        for key in raw:
            if key not in names:
                raise UserError(f"{where}: unknown slurm option '{key}'{did_you_mean(key, names)}; "
                                f"options: {', '.join(names)}")
        options = cls(**raw)
        options.check(where)
        return options

    def check(self, where: str) -> None:
        for key in ("nodes", "gpus_per_node", "time_limit_min"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "gpus_per_node" else 1):
                raise UserError(f"{where}: slurm.{key} must be a positive integer, got {value!r}")
        for key in ("partition", "account"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: slurm.{key} must be a string, got {value!r}")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclass
class StudyRun:
    """One (config, seed) of a study: its resolved config and its run folder."""

    name: str
    seed: int
    cfg: Config
    folder: Path

    @property
    def finished(self) -> bool:
        return run_finished(self.folder, self.cfg.train.epochs)


@dataclass
class Study:
    name: str
    path: Path
    folder: Path
    seeds: list[int]
    entries: list[dict]  # {"name", "config", "set"}: what each config is, for study.yaml
    overrides: list[str]  # the study's `set` then the command line's --set, as KEY=VALUE
    launcher: str
    slurm: SlurmOptions
    runs: list[StudyRun] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [entry["name"] for entry in self.entries]

    def record(self) -> dict:
        """study.yaml: what the folder holds, for `report` and for people."""
        return {"study": self.name, "study_file": str(self.path), "seeds": self.seeds,
                "overrides": self.overrides, "configs": self.entries, "launcher": self.launcher}


def run_finished(folder: Path, epochs: int) -> bool:
    """A summary.json of a run that trained all `epochs` (one from before a resume with more epochs is not)."""
    return read_json(folder / "summary.json").get("epochs", -1) >= epochs


# ---------------------------------------------------------------------------- loading and checking


def _seeds(raw, where: str) -> list[int]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 1:
            raise UserError(f"{where}: seeds must be a positive count (3: seeds 0, 1, 2) or a list of seeds, "
                            f"got {raw}")
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool) for s in raw):
        if any(s < 0 for s in raw) or len(set(raw)) != len(raw):
            raise UserError(f"{where}: seeds must be distinct non-negative integers, got {raw}")
        return list(raw)
    raise UserError(f"{where}: seeds must be a positive count (3: seeds 0, 1, 2) or a list of seeds, got {raw!r}")


def _overrides(raw, where: str) -> list[str]:
    """A `set:` mapping ({train.epochs: 6}) as --set items ("train.epochs=6")."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise UserError(f"{where}: 'set' must map dotted config keys to values, e.g. {{train.epochs: 6}}")
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in raw.items()]


def _entries(raw, path: Path) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{path}: 'configs' must be a non-empty list of config paths (relative to the study file) "
                        f"or mappings {{config: PATH, name: NAME, set: {{...}}}}")
    entries = []
    for i, item in enumerate(raw, start=1):
        if isinstance(item, str):
            item = {"config": item}
        if not isinstance(item, dict) or not isinstance(item.get("config"), str):
            raise UserError(f"{path}: configs entry {i} must be a path or a mapping with a 'config' path, got {item!r}")
        extra = sorted(set(item) - {"config", "name", "set"})
        if extra:
            raise UserError(f"{path}: configs entry {i} has unknown key(s) {', '.join(extra)}; it takes config, name "
                            f"and set")
        target = path.parent / item["config"]
        if not target.is_file():
            raise UserError(f"{path}: configs entry {i} names a missing config: {item['config']} (looked at {target})")
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise UserError(f"{path}: configs entry {i}: name must be a folder name, got {name!r}")
        entries.append({"config": target, "name": name, "set": _overrides(item.get("set"), f"{path} entry {i}")})
    return entries


def load_study(path: str | Path, overrides: list[str] = (), output: str | None = None, launcher: str | None = None,
               slurm_overrides: dict | None = None) -> Study:
    """Read and check a study file and every run it implies; raises UserError before anything is written."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: cannot parse YAML: {getattr(exc, 'problem', None) or 'invalid YAML'}") from None
    if not isinstance(data, dict) or "configs" not in data or "seeds" not in data:
        raise UserError(f"{path} is not a study file: a study names `configs:` and `seeds:` (see "
                        f"configs/study/fashion_mnist.yaml); to train one config use --task train")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'{did_you_mean(unknown[0], KEYS)}; a study file has "
                        f"{', '.join(KEYS)}")
    name = data.get("study", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise UserError(f"{path}: study must be a name (a folder name), got {name!r}")
    seeds = _seeds(data["seeds"], str(path))
    shared = _overrides(data.get("set"), str(path)) + list(overrides)
    chosen = launcher or data.get("launcher", "local")
    if chosen not in LAUNCHERS:
        raise UserError(f"{path}: unknown launcher {chosen!r}{did_you_mean(chosen, LAUNCHERS)}; launchers: "
                        f"{', '.join(LAUNCHERS)}")
    slurm = SlurmOptions.from_dict(data.get("slurm"), str(path))
    if slurm_overrides:
        slurm = dataclasses.replace(slurm, **{k: v for k, v in slurm_overrides.items() if v is not None})
        slurm.check("the command line")

    entries = []
    for entry in _entries(data["configs"], path):
        cfg = load_config(entry["config"], entry["set"] + shared)
        entry_name = entry["name"] or cfg.name
        entries.append({"name": entry_name, "config": str(entry["config"]), "set": entry["set"], "cfg": cfg})
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries, start=1):
        if entry["name"] in seen:
            raise UserError(f"{path}: duplicate name '{entry['name']}' (configs entries {seen[entry['name']]} and {i});"
                            f" give one of them a `name:`")
        seen[entry["name"]] = i

    folder = Path(output) if output else Path(entries[0]["cfg"].output_root) / name
    study = Study(name, path, folder, seeds, [{k: v for k, v in e.items() if k != "cfg"} for e in entries], shared,
                  chosen, slurm)
    for seed in seeds:
        for entry in entries:
            cfg = dataclasses.replace(entry["cfg"], name=entry["name"], seed=seed)
            study.runs.append(StudyRun(entry["name"], seed, cfg, folder / entry["name"] / f"seed{seed}"))
    _check_existing_runs(study)
    from common.tasks.launchers import check_launcher

    check_launcher(study)
    return study


def _check_existing_runs(study: Study) -> None:
    """A run folder that already holds a run must hold this run (else the study would mix two budgets)."""
    from common.tasks.run_folder import changed_keys

    for run in study.runs:
        saved_path = run.folder / "config.yaml"
        if not saved_path.is_file():
            continue
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except yaml.YAMLError:
            raise UserError(f"{saved_path} is not readable YAML; remove {run.folder} or use another --output") from None
        changed = changed_keys(saved if isinstance(saved, dict) else {}, run.cfg)
        if changed:
            raise UserError(f"study {study.name}: {run.folder} holds a run with a different config "
                            f"({', '.join(changed)} changed); to run this budget as a new study, pass --output "
                            f"{study.folder}_<variant>")


# ---------------------------------------------------------------------------- running


def measure_cost(cfg: Config, path: Path) -> dict:
    """Params, MACs and training/inference images per second of a config's model (the `time` task's
    measurement, once per config), written to `path` as JSON."""
    from common.data.loaders import input_spec
    from common.inspect.timing import measure
    from common.tasks.costs import batch_size_for
    from common.train.distributed import select_device
    from common.train.engine import AMP_DTYPES, build_model

    input_size, num_classes = input_spec(cfg.data)
    model = build_model(cfg.model.name, cfg.model.kwargs, num_classes, input_size)
    device = select_device(cfg.device)
    result = measure(model, cfg.name, input_size=input_size, batch_size=batch_size_for(cfg, device), device=str(device),
                     warmup=cfg.time.warmup, iters=cfg.time.iters, latency_iters=cfg.time.latency_iters,
                     amp_dtype=AMP_DTYPES[cfg.train.amp], channels_last=cfg.train.channels_last)
    record = {**result.as_dict(), "gmacs": result.macs / 1e9, "input_size": list(input_size),
              "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return record


def prepare_folder(study: Study) -> None:
    """Write study.yaml: what the folder holds (`report` reads it to give the study's table)."""
    write_atomic(study.folder / STUDY_FILE, yaml.safe_dump(study.record(), sort_keys=False))


def refresh_report(folder: Path, quiet: bool = False) -> None:
    from common.inspect.study_report import write_study_report

    write_study_report(folder, echo=not quiet)


def run_study(study: Study, quiet: bool = False) -> None:
    """The `study` task: every pending run through the study's launcher, the table refreshed after each."""
    from common.tasks.launchers import launch

    prepare_folder(study)
    pending = [run for run in study.runs if not run.finished]
    done = len(study.runs) - len(pending)
    print(f"study {study.name}: {len(study.runs)} runs ({len(study.names)} configs x {len(study.seeds)} seeds) "
          f"in {study.folder}; {done} finished, {len(pending)} to run with the {study.launcher} launcher")
    if pending:
        launch(study, pending, quiet=quiet)
    else:
        refresh_report(study.folder)

