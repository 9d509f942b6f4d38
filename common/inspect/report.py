"""Tables and figures that compare methods: the `report` task and the `time` task's cost plot.

`report`: `python main.py --task report --runs DIR [DIR ...]` reads run folders (summary.json, config.yaml)
and writes report.md and report.csv, one row per configuration: params, best validation accuracy and test
accuracy as the mean with a 95% confidence interval over seeds (Student's t, n - 1 degrees of freedom; n/a
for one seed), epochs, wall time, and the paper's top-1 from the model family's metafile
(configs/*/metafile.yaml) with the difference.

A row is one resolved config minus its seed (and minus what cannot change a number: output and data folders,
loader workers, logging, the time task's settings) run on one number of processes: runs of one config name
that differ otherwise (epochs, learning rate, two processes) get rows of their own, labelled with the keys in
which they differ. Seeds are counted by seed (a seed run twice counts once, its newest run). Unfinished runs
(no summary.json yet, or one left from before a resume with more epochs) are flagged in their row, never
averaged.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.config import flatten_config
from common.errors import UserError
from common.files import check_output_dir, write_atomic

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
SUMMARY, CONFIG = "summary.json", "config.yaml"


# ---------------------------------------------------------------------------- statistics


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the two-sided `level` confidence interval (t-distribution); None for n < 2."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


# ---------------------------------------------------------------------------- runs

# Config keys that cannot change a run's numbers: runs that differ only in these are seeds of one row.
NOT_THE_METHOD = ("seed", "name", "output_root", "data.root", "data.download", "data.num_workers", "device",
                  "log.", "time.")


@dataclass
class Run:
    folder: Path
    summary: dict | None  # None while the run is unfinished
    config: dict
    progress: str = ""  # of an unfinished run: "epoch 3/10" (from metrics.jsonl), or why it is unfinished

    @property
    def model(self) -> dict:
        model = self.config.get("model") or {"name": (self.summary or {}).get("model")}
        return {"name": model.get("name"), **{k: v for k, v in model.items() if k != "name"}}

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def name(self) -> str:
        return (self.summary or {}).get("config") or self.config.get("name") or self.folder.parent.name

    @property
    def seed(self):
        return self.config.get("seed", "?")

    @property
    def dataset(self) -> str:
        return (self.config.get("data") or {}).get("dataset") or (self.summary or {}).get("dataset", "?")

    def method(self) -> dict:
        """The flattened config that makes the run's numbers what they are (NOT_THE_METHOD left out), with the
        number of processes (batch norm statistics are per process)."""
        flat = flatten_config(self.config)
        out = {k: v for k, v in flat.items()
               if not any(k == c or (c.endswith(".") and k.startswith(c)) for c in NOT_THE_METHOD)}
        out["world_size"] = (self.summary or {}).get("world_size", 1)
        return out


def _epochs_done(folder: Path) -> int | None:
    """The last epoch metrics.jsonl records (None without one)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    epochs = [json.loads(line).get("epoch", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(epochs, default=0)


def read_run(folder: Path) -> tuple[Run | None, str | None]:
    """A run folder as a Run (finished or not), or None and why it was skipped."""
    try:
        config = yaml.safe_load((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
        summary = json.loads((folder / SUMMARY).read_text()) if (folder / SUMMARY).is_file() else None
    except (json.JSONDecodeError, yaml.YAMLError, OSError) as exc:
        return None, f"skipped {folder}: unreadable {SUMMARY} or {CONFIG} ({str(exc).splitlines()[0][:80]})"
    config = config if isinstance(config, dict) else {}
    if summary is not None and (not isinstance(summary, dict) or "test_acc" not in summary):
        return None, f"skipped {folder}: {SUMMARY} has no test_acc"
    not_numbers = [k for k in ("test_acc", "best_val_acc") if summary is not None and summary.get(k) is not None
                   and (isinstance(summary[k], bool) or not isinstance(summary[k], (int, float)))]
    if not_numbers:
        return None, f"skipped {folder}: {', '.join(not_numbers)} in {SUMMARY} is not a number"
    planned = (config.get("train") or {}).get("epochs")
    done = _epochs_done(folder)
    if summary is None:
        progress = f"epoch {done or 0}/{planned}" if planned else "no summary yet"
        return Run(folder, None, config, progress), None
    if planned is not None and summary.get("epochs") is not None and summary["epochs"] < planned:
        # Resumed with more epochs: the summary is of the shorter run that came before.
        return Run(folder, None, config, f"epoch {done or summary['epochs']}/{planned}, resumed with more "
                                         f"epochs after a finished {summary['epochs']}"), None
    return Run(folder, summary, config), None


def find_runs(paths, allow_none: bool = False) -> tuple[list[Run], list[str]]:
    """The runs under the given folders (a run folder, or any folder above run folders), finished or not, and
    notes on folders that were skipped."""
    runs, notes, seen = [], [], set()
    for given in map(Path, paths):
        if not given.is_dir():
            raise UserError(f"--runs {given}: no such folder; give run folders or folders that hold them")
        candidates = [given] if (given / CONFIG).is_file() or (given / SUMMARY).is_file() else \
            sorted({p.parent for p in given.rglob(CONFIG)} | {p.parent for p in given.rglob(SUMMARY)})
        for folder in candidates:
            key = folder.resolve()
            if key in seen:
                continue
            seen.add(key)
            run, note = read_run(folder)
            if note:
                notes.append(note)
            if run is not None:
                runs.append(run)
    if not any(run.finished for run in runs) and not allow_none:
        unfinished = sum(not run.finished for run in runs)
        hint = f" ({unfinished} unfinished)" if unfinished else ""
        raise UserError(f"no finished runs (folders with {SUMMARY}) under {', '.join(map(str, paths))}{hint}; "
                        f"train with --task train first, or point --runs at run folders")
    return runs, notes


# ---------------------------------------------------------------------------- paper numbers


def _effective_kwargs(name: str, kwargs: dict) -> dict:
    """The model's options with its defaults filled in (metafiles list options a config may leave unset)."""
    from common.registry import MODELS, list_models

    if name not in list_models():  # imports the model packages
        return dict(kwargs)
    try:
        params = inspect.signature(MODELS.get(name)).parameters
    except UserError:
        return dict(kwargs)
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **kwargs}


def load_metafiles(root: Path = CONFIGS_DIR) -> list[dict]:
    entries = []
    for path in sorted(root.glob("*/metafile.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        for entry in data.get("models", []):
            entries.append({**entry, "metafile": str(path.relative_to(root.parent))})
    return entries


IGNORED_OPTIONS = ("num_classes", "backend")  # options that do not change the method


def paper_reference(model: dict, dataset: str, config_name: str, entries: list[dict]) -> dict | None:
    """The metafile entry of this model that has a top-1, or None.

    An entry fits when the name and dataset are the run's and every option, with the model's defaults filled
    in on both sides, equals the run's (but num_classes and backend): a k = 9 run does not get the k = 7
    number.
    Among several matches, one whose config file is the run's config wins, then the one that pins the most
    options.
    """
    dataset = "imagenet" if dataset == "imagefolder" else dataset
    kwargs = _effective_kwargs(model["name"], {k: v for k, v in model.items() if k != "name"})
    matches = []
    for entry in entries:
        ref = entry.get("reference") or {}
        if entry.get("name") != model["name"] or entry.get("dataset") != dataset or ref.get("top1") is None:
            continue
        listed = _effective_kwargs(model["name"], entry.get("kwargs") or {})
        if any(kwargs.get(k) != v for k, v in listed.items() if k not in IGNORED_OPTIONS):
            continue
        same_config = Path(entry.get("config", "")).stem == config_name
        matches.append((same_config, len(entry.get("kwargs") or {}), entry))
    if not matches:
        return None
    return max(matches, key=lambda m: (m[0], m[1]))[2]


# ---------------------------------------------------------------------------- the table


@dataclass
class Row:
    config: str
    model: str
    dataset: str
    runs: list[Run] = field(default_factory=list)  # the counted ones: one finished run per seed
    reference: dict | None = None
    differs: str = ""  # "train.epochs=20": how this row differs from other rows of the same config name
    unfinished: list[Run] = field(default_factory=list)
    repeats: list[Run] = field(default_factory=list)  # finished runs of a seed counted with a newer run

    def values(self, key: str) -> list[float]:
        return [float(r.summary[key]) for r in self.runs if r.summary.get(key) is not None]

    def record(self) -> dict:
        test_mean, test_ci = mean_ci([100 * v for v in self.values("test_acc")])
        val = [100 * v for v in self.values("best_val_acc")]
        val_mean, val_ci = mean_ci(val) if val else (math.nan, None)
        params = self.values("params")
        epochs = sorted({int(v) for v in self.values("epochs")})
        wall = self.values("wall_time_s")
        paper = (self.reference or {}).get("reference", {}).get("top1") if self.reference else None
        return {
            "config": self.config, "differs": self.differs, "model": self.model, "dataset": self.dataset,
            "seeds": len(self.runs), "seed_values": "/".join(str(r.seed) for r in self.runs),
            "unfinished": len(self.unfinished),
            "params_m": params[0] / 1e6 if params else math.nan,
            "best_val_acc_mean": val_mean, "best_val_acc_ci95": val_ci,
            "test_acc_mean": test_mean, "test_acc_ci95": test_ci,
            "test_acc_ci95_low": None if test_ci is None else test_mean - test_ci,
            "test_acc_ci95_high": None if test_ci is None else test_mean + test_ci,
            "epochs": "/".join(map(str, epochs)),
            "wall_time_s_mean": sum(wall) / len(wall) if wall else math.nan,
            "paper_top1": paper, "diff_vs_paper": None if paper is None or not self.runs else test_mean - paper,
            "paper_source": (self.reference or {}).get("reference", {}).get("source", "") if self.reference else "",
            "run_dirs": ";".join(str(r.folder) for r in self.runs),
            "unfinished_dirs": ";".join(f"{r.folder} ({r.progress})" for r in self.unfinished),
        }


def _model_label(model: dict) -> str:
    options = ", ".join(f"{k}={v}" for k, v in sorted(model.items()) if k not in ("name", "num_classes"))
    return f"{model['name']} ({options})" if options else str(model["name"])


def _value_text(value) -> str:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else str(value)


def _label_variants(rows: list[Row]) -> None:
    """Rows that share a config name get `differs`: their values of the keys in which the rows differ."""
    by_name: dict[str, list[Row]] = {}
    for row in rows:
        by_name.setdefault(row.config, []).append(row)
    for same in by_name.values():
        if len(same) < 2:
            continue
        methods = [(row.runs or row.unfinished)[0].method() for row in same]
        keys = sorted(k for k in set().union(*methods) if len({_value_text(m.get(k)) for m in methods}) > 1)
        for row, method in zip(same, methods):
            row.differs = ", ".join(f"{k}={_value_text(method.get(k, '-'))}" for k in keys)


def group_runs(runs: list[Run], entries: list[dict]) -> list[Row]:
    """One row per (config name, method: the resolved config minus the seed, number of processes).

    Within a row a seed counts once: its newest finished run (older ones are `repeats`). Unfinished runs
    are listed in their row and never averaged.
    """
    rows: dict[tuple, Row] = {}
    for run in runs:
        key = (run.name, json.dumps(run.method(), sort_keys=True, default=str))
        if key not in rows:
            rows[key] = Row(run.name, _model_label(run.model), run.dataset,
                            reference=paper_reference(run.model, run.dataset, run.name, entries))
        row = rows[key]
        (row.runs if run.finished else row.unfinished).append(run)
    for row in rows.values():
        newest: dict[str, Run] = {}
        for run in sorted(row.runs, key=lambda r: ((r.folder / SUMMARY).stat().st_mtime, str(r.folder))):
            if str(run.seed) in newest:
                row.repeats.append(newest[str(run.seed)])
            newest[str(run.seed)] = run
        row.runs = sorted(newest.values(), key=lambda r: (str(r.seed), str(r.folder)))
        row.unfinished.sort(key=lambda r: (str(r.seed), str(r.folder)))
    ordered = sorted(rows.values(), key=lambda r: (r.dataset, r.config, r.model))
    _label_variants(ordered)
    return sorted(ordered, key=lambda r: (r.dataset, r.config, r.differs, r.model))


def row_notes(rows: list[Row]) -> list[str]:
    """What a reader must know about rows: variants of one config, unfinished runs, seeds run twice."""
    notes = []
    for row in rows:
        label = f"{row.config} [{row.differs}]" if row.differs else row.config
        for run in row.unfinished:
            notes.append(f"unfinished, not averaged: {run.folder} (seed {run.seed}, {run.progress})")
        for run in row.repeats:
            notes.append(f"{label}: seed {run.seed} ran more than once; counted its newest run, not {run.folder}")
    names = {}
    for row in rows:
        names.setdefault(row.config, []).append(row)
    for name, same in names.items():
        if len(same) > 1:
            keys = sorted({part.split("=", 1)[0] for row in same for part in row.differs.split(", ") if part})
            notes.append(f"{name}: {len(same)} rows, its runs differ in {', '.join(keys)}")
    return notes


def seeds_cell(record: dict) -> str:
    return str(record["seeds"]) + (f" (+{record['unfinished']} unfinished)" if record["unfinished"] else "")


def config_cell(record: dict) -> str:
    return record["config"] + (f" [{record['differs']}]" if record["differs"] else "")


def mean_pm(mean: float, ci: float | None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}" if ci is not None else f"{mean:.{digits}f} (CI n/a)"


def fmt(value, spec: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


COLUMNS = ("Config", "Model", "Dataset", "Seeds", "Params (M)", "Best val acc (%)", "Test acc (%)", "Epochs",
           "Wall time (mean)", "Paper top-1 (%)", "Δ vs paper")


def duration(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def markdown(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        cells = [config_cell(r).replace("|", r"\|"), r["model"].replace("|", r"\|"), r["dataset"],
                 seeds_cell(r),
                 fmt(r["params_m"], ".2f"), mean_pm(r["best_val_acc_mean"], r["best_val_acc_ci95"]),
                 mean_pm(r["test_acc_mean"], r["test_acc_ci95"]), r["epochs"] or "–",
                 duration(r["wall_time_s_mean"]), fmt(r["paper_top1"], ".2f"),
                 fmt(r["diff_vs_paper"], "+.2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NOTES = ("Accuracies in %: mean ± half-width of the 95% confidence interval over seeds (Student's t, n - 1 "
         "degrees of freedom; n/a for one seed). Test accuracy is of each run's best-validation checkpoint. "
         "A row is one resolved config minus its seed; [key=value] marks rows of one config name that differ "
         "in those keys. Unfinished runs are counted apart and never averaged. "
         "Paper top-1 from the model family's configs/*/metafile.yaml (same model, options and dataset); "
         "Δ = our test mean - paper.")


def csv_text(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buffer.getvalue()


def save_figure_atomically(fig, path: Path) -> None:
    """As common.files.write_atomic, for a matplotlib figure (several study processes or jobs refresh the same PNGs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _default_output(paths) -> Path:
    folders = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath(folders)) if len(folders) > 1 else folders[0]
    return common.parent if (common / SUMMARY).is_file() or (common / CONFIG).is_file() else common


def report(paths, output: str | None = None) -> list[dict]:
    """The `report` task: write report.md and report.csv (to --output, else the folder above the runs).

    A study folder (one `--task study` wrote) gets the study's own table and figures instead.
    """
    from common.inspect import study_report

    if output:
        check_output_dir(output)
    if len(paths) == 1 and study_report.is_study_folder(paths[0]):
        return study_report.write_study_report(paths[0], output=output)
    runs, notes = find_runs(paths)
    rows = group_runs(runs, load_metafiles())
    notes += row_notes(rows)
    records = [row.record() for row in rows]
    table = markdown(records)
    out_dir = Path(output) if output else _default_output(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "report.md", out_dir / "report.csv"
    listed = "".join(f"- {note}\n" for note in notes)
    write_atomic(md_path, f"# Results\n\n{table}\n{NOTES}\n" + (f"\n{listed}" if listed else ""))
    write_atomic(csv_path, csv_text(records))
    for note in notes:
        print(note)
    print(table, end="")
    print(f"wrote {md_path} and {csv_path} ({len(runs)} run{'s' * (len(runs) != 1)} in {len(rows)} "
          f"row{'s' * (len(rows) != 1)})")
    return records


# ---------------------------------------------------------------------------- the cost plot of `time`


def plot_cost(results, path: Path, title: str = "") -> Path:
    """Throughput (training and inference images/s) against parameters: one marker per model, one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), dpi=150, layout="constrained")
    markers = "osD^vP*Xh<>p"
    colours = plt.get_cmap("tab10")
    for ax, key, label in ((axes[0], "train_img_s", "training images/s"),
                           (axes[1], "infer_img_s", "inference images/s")):
        for i, r in enumerate(results):
            ax.scatter(r.params / 1e6, getattr(r, key), color=colours(i % 10), marker=markers[i % len(markers)],
                       s=55, zorder=3, label=r.model, edgecolor="black", linewidth=0.4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(f"{label} (batch {results[0].batch_size})")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    device = ", ".join(sorted({r.device for r in results}))
    fig.suptitle(title or f"cost without accuracy: throughput vs parameters ({device})", fontsize=11)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
