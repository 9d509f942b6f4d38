"""spans.png: each adaptive layer's learned spans (pixels) per head over the epochs of a run.

Drawn from the per-epoch metric records (metrics.jsonl), whose span keys are
"<layer path>/span_px/head<h>". One panel per layer (in network order), one line per head, shared axes;
matplotlib's object API with the Agg canvas, so no global backend is changed.
"""

from __future__ import annotations

import re
from pathlib import Path

SPAN_KEY = re.compile(r"^(?P<layer>.+)/span_px/head(?P<head>\d+)$")


def collect_spans(history: list[dict]) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """{layer: {head: (epochs, spans)}} from the records, layers in the order they first appear."""
    spans: dict[str, dict[int, tuple[list[int], list[float]]]] = {}
    for record in history:
        for key, value in record.items():
            match = SPAN_KEY.match(key)
            if match:
                epochs, values = spans.setdefault(match["layer"], {}).setdefault(int(match["head"]), ([], []))
                epochs.append(int(record["epoch"]))
                values.append(float(value))
    return spans


def _short(layer: str) -> str:
    """'stages.1.0.mix.0' -> 'stage 2, block 1' (the backbone's layout); other paths are kept."""
    match = re.match(r"^stages\.(\d+)\.(\d+)\.mix(\.0)?$", layer)
    return f"stage {int(match[1]) + 1}, block {int(match[2]) + 1}" if match else layer


def plot_spans(history: list[dict], path: Path, max_span: float | None = None) -> Path | None:
    """Write the figure to `path`; returns it, or None when the records hold no spans."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    spans = collect_spans(history)
    if not spans:
        return None
    n = len(spans)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols + 0.6, 2.6 * rows + 0.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    top = max([max_span or 0.0] + [max(v) for heads in spans.values() for _, v in heads.values()])
    for ax, (layer, heads) in zip(axes, spans.items()):
        for head, (epochs, values) in sorted(heads.items()):
            ax.plot(epochs, values, marker="o" if len(epochs) < 20 else None, markersize=3, label=f"head {head}")
        ax.set_title(_short(layer), fontsize=10)
        ax.set_ylim(0, top * 1.05 if top > 0 else 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[n:]:
        ax.set_visible(False)
    for i in range(n):
        if i + cols >= n:  # the lowest panel of its column
            axes[i].set_xlabel("epoch")
    for ax in axes[::cols]:
        ax.set_ylabel("span S·z (px)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Learned attention spans per head", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path
