"""spans.png: each adaptive layer's learned spans (pixels) per head over the epochs of a run.

Drawn from the per-epoch metric records (metrics.jsonl), whose span keys are
"<layer path>/span_px/head<h>", in pixels of the layer's own feature map, and "<layer path>/map_size", that
map's side. The figure converts the spans to input-image pixels (a span of 1 on a 8x8 map of a 32x32 input
is 4 input pixels) when the input size is known, and says so; panels are titled with the layer paths that
metrics.jsonl, TensorBoard and the viz figures use. One panel per layer (in network order), one line per
head, shared axes; matplotlib's object API with the Agg canvas, so no global backend is changed.
"""

from __future__ import annotations

import re
from pathlib import Path

SPAN_KEY = re.compile(r"^(?P<layer>.+)/span_px/head(?P<head>\d+)$")
MAP_KEY = re.compile(r"^(?P<layer>.+)/map_size$")


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


def collect_map_sizes(history: list[dict]) -> dict[str, float]:
    """{layer: side of its feature map in pixels}, from the latest record that has it."""
    sizes = {}
    for record in history:
        for key, value in record.items():
            match = MAP_KEY.match(key)
            if match:
                sizes[match["layer"]] = float(value)
    return sizes


def input_height(run_dir: Path) -> int | None:
    """The input images' height of the run in `run_dir` (from its config.yaml), None if unknown."""
    from common.config import load_config
    from common.data.loaders import input_spec
    from common.errors import UserError

    try:
        return input_spec(load_config(Path(run_dir) / "config.yaml").data)[0][1]
    except (UserError, OSError, KeyError):
        return None


def plot_spans(history: list[dict], path: Path, max_span: float | None = None,
               input_size: int | None = None) -> Path | None:
    """Write the figure to `path`; returns it, or None when the records hold no spans."""
    fig = spans_figure(history, max_span, input_size)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=150)
    return path


def spans_figure(history: list[dict], max_span: float | None = None, input_size: int | None = None):
    """The matplotlib Figure (Agg canvas) of the spans, or None when the records hold none.

    input_size: the input images' height; with it (and the layers' map sizes in the records) the spans are
    drawn in input pixels, else in pixels of each layer's own feature map.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    spans = collect_spans(history)
    if not spans:
        return None
    sizes = collect_map_sizes(history)
    in_input_px = input_size is not None and all(layer in sizes for layer in spans)
    scale = {layer: input_size / sizes[layer] if in_input_px else 1.0 for layer in spans}
    n = len(spans)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols + 0.6, 2.6 * rows + 0.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    top = max([(max_span or 0.0) * scale[layer] for layer in spans]
              + [max(v) * scale[layer] for layer, heads in spans.items() for _, v in heads.values()])
    for ax, (layer, heads) in zip(axes, spans.items()):
        for head, (epochs, values) in sorted(heads.items()):
            ax.plot(epochs, [v * scale[layer] for v in values], marker="o" if len(epochs) < 20 else None,
                    markersize=3, label=f"head {head}")
        size = sizes.get(layer)
        where = "" if size is None else \
            f"\n{size:g}x{size:g} map" + (f", 1 px = {scale[layer]:g} input px" if in_input_px else "")
        ax.set_title(layer + where, fontsize=9)
        ax.set_ylim(0, top * 1.05 if top > 0 else 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[n:]:
        ax.set_visible(False)
    for i in range(n):
        if i + cols >= n:  # the lowest panel of its column
            axes[i].set_xlabel("epoch")
    for ax in axes[::cols]:
        ax.set_ylabel("span S·z (input pixels)" if in_input_px else "span S·z (pixels of the layer's map)")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Learned attention spans per head", fontsize=11)
    return fig
