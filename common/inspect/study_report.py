"""A study's table and figures, from its folder (what `--task study` refreshes after each run and `--task report`
gives on a study folder).

Files written into the study folder:
- study.md / study.csv: one row per config, in the study file's order: test accuracy as the mean and 95%
  confidence interval over seeds (`report`'s grouping and statistics: seeds counted by seed, unfinished runs
  flagged and never averaged), params, GMACs and training images/s (measured once per config, cost.json),
  mean wall time and training time per run, and the paper's top-1 where the family's metafile has one;
- acc_vs_gmacs.png, acc_vs_time.png: test accuracy against GMACs and against training time per run, one point
  per config with its confidence interval as an error bar;
- learning_curves.png: validation accuracy and training loss per epoch of every config in one figure (the mean
  over seeds, the band from the lowest to the highest seed).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from common.errors import UserError
from common.files import write_atomic
from common.inspect import report

STUDY_FILE = "study.yaml"  # the resolved study, written into its folder by common.tasks.study
COST_FILE = "cost.json"  # per config folder: params, GMACs, images/s (common.tasks.study.measure_cost)
FIGURES = ("acc_vs_gmacs.png", "acc_vs_time.png", "learning_curves.png")


def is_study_folder(path: str | Path) -> bool:
    return (Path(path) / STUDY_FILE).is_file()


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it is missing or unreadable (a run still being written)."""
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def study_records(folder: Path) -> tuple[dict, list[dict], list[report.Row], list[str]]:
    """The study's metadata, one record per (config, variant) in the study file's order, the rows, and notes."""
    try:
        meta = yaml.safe_load((folder / STUDY_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{folder / STUDY_FILE}: unreadable ({str(exc).splitlines()[0][:80]}); rerun the study "
                        f"command to rewrite it") from None
    order = [entry["name"] for entry in meta.get("configs", [])]
    runs, notes = report.find_runs([folder], allow_none=True)
    rows = report.group_runs(runs, report.load_metafiles())
    notes += report.row_notes(rows)
    rows.sort(key=lambda row: (order.index(row.config) if row.config in order else len(order), row.differs))
    records = []
    for row in rows:
        record = row.record()
        cost = read_json(folder / row.config / COST_FILE)
        record.update({
            "gmacs": cost.get("gmacs"), "train_img_s": cost.get("train_img_s"),
            "cost_device": cost.get("device", ""), "cost_batch": cost.get("batch_size"),
            "train_time_s_mean": _mean([float(r.summary.get("time_s", {}).get("train", r.summary["wall_time_s"]))
                                        for r in row.runs]),
        })
        records.append(record)
    for name in order:  # configs without a run folder yet
        if not any(r["config"] == name for r in records):
            records.append({"config": name, "differs": "", "model": "", "seeds": 0, "unfinished": 0,
                            "test_acc_mean": math.nan, "test_acc_ci95": None, "params_m": math.nan,
                            "gmacs": None, "train_img_s": None, "wall_time_s_mean": math.nan,
                            "train_time_s_mean": math.nan, "paper_top1": None, "epochs": ""})
            rows.append(report.Row(name, "", ""))
    return meta, records, rows, notes


COLUMNS = ("Config", "Model", "Seeds", "Test acc (%)", "Params (M)", "GMACs", "Train img/s", "Wall time / run",
           "Training / run", "Paper top-1 (%)")


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- | --- | " + " | ".join(["---:"] * (len(COLUMNS) - 2)) + " |"]
    for r in records:
        seeds = report.seeds_cell(r) if r["seeds"] or r["unfinished"] else "not started"
        model = r["model"].split(" (")[0] or "–"  # the options are in the config; the row names it
        cells = [report.config_cell(r).replace("|", r"\|"), model, seeds,
                 report.mean_pm(r["test_acc_mean"], r["test_acc_ci95"]), report.fmt(r["params_m"], ".3f"),
                 report.fmt(r["gmacs"], ".4f"), report.fmt(r["train_img_s"], ".0f"),
                 report.duration(r["wall_time_s_mean"]), report.duration(r["train_time_s_mean"]),
                 report.fmt(r["paper_top1"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(meta: dict, records: list[dict], rows: list[report.Row]) -> str:
    finished = [run for row in rows for run in row.runs]
    total = sum(float(run.summary["wall_time_s"]) for run in finished)
    devices = sorted({str(run.summary.get("device", "?")) for run in finished})
    cost_devices = sorted({r["cost_device"] for r in records if r.get("cost_device")})
    effective = {o.split("=", 1)[0]: o for o in meta.get("overrides", [])}  # a later --set wins
    overrides = ", ".join(f"`{o}`" for o in effective.values()) or "none"
    batch = next((r["cost_batch"] for r in records if r.get("cost_batch")), "–")
    lines = [f"# Study {meta.get('study', '')}", "",
             f"- study file: {meta.get('study_file', '?')}; seeds {meta.get('seeds')}; shared overrides: {overrides}",
             f"- finished runs: {len(finished)} of {len(meta.get('seeds', [])) * len(meta.get('configs', []))}, "
             f"their wall times add up to {report.duration(total)} on {', '.join(devices) or '–'} (less time "
             f"passes when several study processes or jobs run at once)",
             f"- cost columns measured once per config on {', '.join(cost_devices) or '–'} "
             f"(the `time` task's measurement: batch {batch})"]
    return "\n".join(lines) + "\n"


NOTES = ("Test accuracy in %: mean ± half-width of the 95% confidence interval over seeds (Student's t; n/a for one "
         "seed), each run's best-validation checkpoint. GMACs: multiply-accumulates of one forward pass of one "
         "image. Train img/s: full training steps on random inputs, measured once per config (cost.json). Wall "
         "time: the whole run (data, training, validation, test); training: the training steps alone.")


def write_study_report(folder: str | Path, echo: bool = True, output: str | Path | None = None) -> list[dict]:
    """study.md, study.csv and the figures of the study in `folder`, written there (or to `output`)."""
    folder = Path(folder)
    meta, records, rows, notes = study_records(folder)
    table = markdown_table(records)
    listed = "".join(f"- {note}\n" for note in notes)
    out = Path(output) if output else folder
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(out, records, rows, meta.get("study", folder.name))
    links = "".join(f"![{path.stem}]({path.name})\n" for path in figures)
    text = f"{_header(meta, records, rows)}\n{table}\n{NOTES}\n" + (f"\n{listed}" if listed else "") + \
        (f"\n{links}" if links else "")
    write_atomic(out / "study.md", text)
    shown = [{k: v for k, v in r.items() if k != "cost_batch"} for r in records]
    write_atomic(out / "study.csv", report.csv_text(shown))
    if echo:
        for note in notes:
            print(note)
        print(table, end="")
        print(f"wrote {out / 'study.md'}, study.csv and {', '.join(p.name for p in figures) or 'no figures yet'}")
    return records


# ---------------------------------------------------------------------------- figures


def _curves(row: report.Row) -> dict[str, dict[int, list[float]]]:
    """Per metric, per epoch, the values of the row's counted runs (from their metrics.jsonl)."""
    out: dict[str, dict[int, list[float]]] = {"val/acc": {}, "train/loss": {}}
    for run in row.runs:
        path = run.folder / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            for key in out:
                if record.get(key) is not None:
                    out[key].setdefault(int(record["epoch"]), []).append(float(record[key]))
    return out


def draw_figures(folder: Path, records: list[dict], rows: list[report.Row], study: str) -> list[Path]:
    """The three PNGs (only once some config has a finished run)."""
    done = [(r, row) for r, row in zip(records, rows) if r["seeds"]]
    if not done:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colours = plt.get_cmap("tab20" if len(done) > 10 else "tab10")
    markers = "osD^vP*Xh<>p"
    style = {report.config_cell(r): (colours(i % colours.N), markers[i % len(markers)])
             for i, (r, _) in enumerate(done)}
    paths = []
    for name, key, scale, label, log in (
            ("acc_vs_gmacs.png", "gmacs", 1.0, "GMACs per image (forward pass)", True),
            ("acc_vs_time.png", "train_time_s_mean", 1 / 60, "training time per run (minutes)", False)):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=150, layout="constrained")
        for r, _ in done:
            if r.get(key) is None or (isinstance(r[key], float) and math.isnan(r[key])):
                continue
            colour, marker = style[report.config_cell(r)]
            ax.errorbar(r[key] * scale, r["test_acc_mean"], yerr=r["test_acc_ci95"] or 0.0, fmt=marker,
                        color=colour, markersize=7, capsize=3, markeredgecolor="black", markeredgewidth=0.4,
                        label=f"{report.config_cell(r)} ({r['seeds']} seed{'s' * (r['seeds'] != 1)})")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%), mean ± 95% CI")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        ax.set_title(f"{study}: test accuracy vs {label.split(' (')[0]}", fontsize=10)
        report.save_figure_atomically(fig, folder / name)
        plt.close(fig)
        paths.append(folder / name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=150, layout="constrained")
    for r, row in done:
        colour, _ = style[report.config_cell(r)]
        curves = _curves(row)
        for ax, key, scale in ((axes[0], "val/acc", 100.0), (axes[1], "train/loss", 1.0)):
            epochs = sorted(curves[key])
            if not epochs:
                continue
            values = [curves[key][e] for e in epochs]
            ax.plot(epochs, [scale * _mean(v) for v in values], color=colour, linewidth=1.4, marker="o",
                    markersize=3, label=report.config_cell(r))
            if any(len(v) > 1 for v in values):
                ax.fill_between(epochs, [scale * min(v) for v in values], [scale * max(v) for v in values],
                                color=colour, alpha=0.15, linewidth=0)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[1].set_ylabel("training loss")
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"{study}: learning curves (mean over seeds; band: lowest to highest seed)", fontsize=10)
    report.save_figure_atomically(fig, folder / "learning_curves.png")
    plt.close(fig)
    paths.append(folder / "learning_curves.png")
    return paths
