"""Attention figures for every attention model, built on the capture contract (`common.inspect.capture`).

- `viz_1`: the attention of one query pixel, per layer and head, over the input image.
- `viz`: the attention averaged over all query positions, per layer and head, plus per-head statistics
  (mean attention distance in input pixels, entropy in nats) as JSON and as a plot per layer and head.

Placement. Layer l's map lives on its key grid (Hk, Wk); `AttentionMap.key_stride` = image_size / key_grid
is how many input pixels one key cell covers, so every map is drawn with the extent of the whole input
image: a local window appears where it is, a global map covers the image, a 2x-pooled grid has 2x2-pixel
cells. Cells with exactly zero weight (outside a local window) are transparent over a dimmed grey copy of
the input.

Statistics. A query at cell (i, j) of its layer's query grid sits at ((i + 0.5) * H / Hq, (j + 0.5) * W / Wq)
in input pixels, a key likewise with the key grid. Mean attention distance of a head = mean over queries
(and images) of sum_k w_qk * ||pos_q - pos_k||_2; entropy = mean over queries of -sum_k w_qk log w_qk
(nats). Maps that are not probabilities (SAN patchwise weights are signed) use |w| normalised to sum 1 and
are flagged `signed` in the JSON.

Memory. The averaged figure needs every query's map. When all layers' dense maps fit in `budget_bytes` they
are recorded in one forward pass; otherwise queries are recorded in chunks (one forward pass each) on a
lattice of at most `max_queries` cell centres of the finest query grid (the JSON says which).

Overlays. A layer may define `viz_overlay(self) -> per-head effective window radius in pixels of its grid`
(adaptive span does); the window is drawn as a dashed square around the query (in `viz`, around the
image centre).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import UserError
from common.inspect.capture import AttentionMap, record_attention

MAX_LAYERS_SHOWN = 8  # default cap of layer rows in a figure (--layers picks others, or "all")
MAX_HEADS_SHOWN = 4  # layers with more heads are drawn as their mean over heads by default (--heads picks)
BUDGET_BYTES = 256 * 2 ** 20  # dense maps recorded at once for the averaged figure
MAX_QUERIES = 4096  # query positions sampled for the averaged figure when the dense maps do not fit


# ---------------------------------------------------------------------------- input images


@dataclass
class InputImage:
    tensor: torch.Tensor  # (1, C, H, W), normalised as the model's dataset is
    display: np.ndarray  # (H, W, 3) in [0, 1], what the model sees before normalisation
    source: str  # for titles: "test image 12 (ring)" or the file path
    tag: str  # for file names: "test12" or the file's stem

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.tensor.shape[-2:])


def normalisation(data_cfg, seed: int = 0) -> tuple[tuple, tuple]:
    """The (mean, std) the dataset's loaders use, without reading the dataset when it is not needed."""
    from common.data import loaders

    if data_cfg.dataset != "synthetic" or (data_cfg.mean is not None and data_cfg.std is not None):
        return loaders.normalisation(data_cfg)
    # synthetic: the statistics of its generated training set, as common.data.loaders computes them
    bundle = loaders.build_data(data_cfg, 1, 1, torch.device("cpu"), seed)
    return bundle.mean, bundle.std


def _normalise(display: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(display, dtype=np.float32)).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1))[None]


def display_from_normalised(x: torch.Tensor, mean, std) -> np.ndarray:
    """(1 or no batch, C, H, W) normalised -> (H, W, 3) in [0, 1]."""
    x = x.detach().float().cpu().reshape(-1, *x.shape[-2:])
    img = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]


def image_from_file(path: str | Path, data_cfg, input_size: tuple[int, int, int], seed: int = 0) -> InputImage:
    """Any image Pillow reads, resized (and cropped) and normalised as the configured dataset's images are.

    Image folders: the evaluation transform (short side to size / 0.875, centre crop). In-memory datasets
    (fixed-size images): centre crop to the model input's aspect ratio, then a bilinear resize to it.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image {path}: no such file; give the path of an image (PNG, JPEG, ...)")
    from common.data.datasets import to_rgb

    try:
        with Image.open(path) as im:
            im.load()
            image = to_rgb(im)  # 16-bit greyscale scaled to 8 bits, not saturated
            if input_size[0] == 1:  # as the model's dataset stores images
                image = image.convert("L")
    except UnidentifiedImageError:
        raise UserError(f"--image {path}: cannot read it as an image (not a format Pillow knows); "
                        f"give a PNG, JPEG, BMP, ... file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--image {path}: cannot decode the image ({reason[:120]}); give an intact image file") \
            from None
    _, h, w = input_size
    if data_cfg.dataset == "imagefolder":
        from torchvision import transforms as T

        from common.data.datasets import EVAL_CROP_FRACTION

        image = T.CenterCrop(data_cfg.image_size)(T.Resize(round(data_cfg.image_size / EVAL_CROP_FRACTION))(image))
    else:
        iw, ih = image.size
        scale = min(iw / w, ih / h)
        cw, ch = w * scale, h * scale
        left, top = (iw - cw) / 2, (ih - ch) / 2
        image = image.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    pixels = np.asarray(image, dtype=np.float32).reshape(h, w, -1) / 255.0
    mean, std = normalisation(data_cfg, seed)
    return InputImage(_normalise(pixels, mean, std), np.repeat(pixels, 3 // pixels.shape[2], axis=2), str(path),
                      path.stem)


def image_from_dataset(data_cfg, index: int, seed: int = 0) -> InputImage:
    """Image `index` of the configured dataset's test split (ImageFolder: val/), as the model sees it."""
    from common.data.loaders import build_data

    bundle = build_data(data_cfg, 1, 1, torch.device("cpu"), seed)
    test = bundle.test
    if not 0 <= index < test.num_samples:
        raise UserError(f"--index {index} is outside the test split of {data_cfg.dataset} "
                        f"({test.num_samples} images: 0..{test.num_samples - 1})")
    if hasattr(test, "images"):  # in-memory: uint8 (N, C, H, W) on the device
        x = ((test.images[index].float() - test.mean[0]) / test.std[0])[None].cpu()
        label = int(test.labels[index])
    else:  # image folder: the dataset applies the evaluation transform
        x, label = test.loader.dataset[index]
        x = x[None]
    display = display_from_normalised(x, bundle.mean, bundle.std)
    name = bundle.classes[label] if 0 <= label < len(bundle.classes) else str(label)
    return InputImage(x, display, f"{data_cfg.dataset} test image {index} ({name})", f"test{index}")


# ---------------------------------------------------------------------------- capture


@dataclass
class LayerAttention:
    """One attention layer (one call of it) reduced to what the figures draw."""

    name: str
    image_size: tuple[int, int]
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    maps: np.ndarray  # (heads, Hk, Wk): one query's map (viz_1) or the mean over queries (viz)
    query_cell: tuple[int, int] | None = None  # viz_1: the query's cell in the query grid
    window_radius: list[float] | None = None  # overlay: per-head effective radius in pixels of this grid
    mean_distance_px: list[float] | None = None
    entropy_nats: list[float] | None = None
    signed: bool = False  # weights are not probabilities (statistics use |w| normalised)
    finite: bool = True
    query_token: str | None = None  # the query is a token with no position (a ViT's CLS), not a grid cell
    head_ids: list | None = None  # what each map is: a head index, or "mean" (over all heads); None: 0..heads-1
    mean_of: int = 0  # how many heads a "mean" map averages

    @property
    def heads(self) -> int:
        return self.maps.shape[0]

    def head_label(self, i: int) -> str:
        head = self.head_ids[i] if self.head_ids is not None else i
        return f"head {head}" if isinstance(head, int) else f"mean of {self.mean_of} heads"

    @property
    def panel_ids(self) -> list:
        return self.head_ids if self.head_ids is not None else list(range(self.heads))

    @property
    def key_stride(self) -> tuple[float, float]:
        return self.image_size[0] / self.key_grid[0], self.image_size[1] / self.key_grid[1]

    @property
    def query_stride(self) -> tuple[float, float]:
        return self.image_size[0] / self.query_grid[0], self.image_size[1] / self.query_grid[1]

    def stats(self) -> dict:
        out = {"name": self.name, "heads": self.heads, "query_grid": list(self.query_grid),
               "key_grid": list(self.key_grid), "key_stride_px": list(self.key_stride),
               "mean_distance_px": _json_floats(self.mean_distance_px),
               "entropy_nats": _json_floats(self.entropy_nats), "signed": self.signed}
        if self.query_token is not None:
            out["query_token"] = self.query_token
        if self.window_radius is not None:
            out["window_radius_px"] = _json_floats([r * self.key_stride[0] for r in self.window_radius])
        return out


def _json_floats(values):
    return None if values is None else [round(v, 4) if math.isfinite(v) else None for v in values]


def _unique_names(maps: list[AttentionMap]) -> list[str]:
    """Module paths, with #2, #3 ... for later calls of a layer called more than once per forward."""
    seen: dict[str, int] = {}
    names = []
    for m in maps:
        seen[m.name] = seen.get(m.name, 0) + 1
        names.append(m.name if seen[m.name] == 1 else f"{m.name}#{seen[m.name]}")
    return names


def _overlay(model: nn.Module, name: str) -> list[float] | None:
    module = dict(model.named_modules()).get(re.split(r"[#\[]", name)[0])
    fn = getattr(module, "viz_overlay", None)
    if not callable(fn):
        return None
    radius = fn()
    return [float(r) for r in (radius.tolist() if torch.is_tensor(radius) else radius)]


def cell_centres(grid: tuple[int, int], image_size: tuple[int, int], device=None) -> torch.Tensor:
    """(Hg * Wg, 2) row-major (y, x) centres of a grid's cells in input-image pixels."""
    sy, sx = image_size[0] / grid[0], image_size[1] / grid[1]
    ys = (torch.arange(grid[0], device=device, dtype=torch.float64) + 0.5) * sy
    xs = (torch.arange(grid[1], device=device, dtype=torch.float64) + 0.5) * sx
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def query_cell(pixel: tuple[int, int], image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The cell of `grid` that an input pixel falls in (the rule of `record_attention(queries=...)`)."""
    (y, x), (h, w) = pixel, image_size
    return min(grid[0] - 1, y * grid[0] // h), min(grid[1] - 1, x * grid[1] // w)


class _Accumulator:
    """Sums over queries (and images) of one layer's maps, distances and entropies."""

    def __init__(self, m: AttentionMap):
        self.map_sum = None
        self.dist_sum = self.ent_sum = None
        self.count = 0
        self.signed = False
        self.finite = True
        self.key_pos = cell_centres(m.key_grid, m.image_size, m.weights.device)

    def add(self, weights: torch.Tensor, query_pos: torch.Tensor) -> None:
        """weights (B, heads, Q, Hk, Wk); query_pos (Q, 2) in input pixels."""
        w = weights.double()
        self.finite &= bool(torch.isfinite(w).all())
        self.signed |= bool((w < 0).any())
        total = w.sum((0, 2))
        self.map_sum = total if self.map_sum is None else self.map_sum + total
        p = w.flatten(-2).abs()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        dist = torch.cdist(query_pos.to(p), self.key_pos.to(p))  # (Q, K)
        d = (p * dist).sum(-1).sum((0, 2))
        e = -torch.special.xlogy(p, p).sum(-1).sum((0, 2))
        self.dist_sum = d if self.dist_sum is None else self.dist_sum + d
        self.ent_sum = e if self.ent_sum is None else self.ent_sum + e
        self.count += w.shape[0] * w.shape[2]


def _eval_forward(model: nn.Module, x: torch.Tensor, queries=None) -> list[AttentionMap]:
    with torch.no_grad(), record_attention(model, queries=queries) as maps:
        model(x)
    return maps


def _check_recorded(maps: list, model_name: str) -> None:
    if not maps:
        raise UserError(f"model '{model_name}' has attention layers but none recorded a map in a forward pass "
                        f"(are they used by this configuration?)")


def one_query(model: nn.Module, x: torch.Tensor, pixel: tuple[int, int], model_name: str = "model"
              ) -> list[LayerAttention]:
    """Each layer's per-head map of the query at input pixel `pixel` (y, x), for the first image of x."""
    maps = _eval_forward(model, x[:1], queries=[pixel])
    _check_recorded(maps, model_name)
    out = []
    for name, m in zip(_unique_names(maps), maps):
        w = m.weights[0, :, 0].float().cpu()
        out.append(LayerAttention(name, m.image_size, m.query_grid, m.key_grid, w.numpy(),
                                  query_cell=query_cell(pixel, m.image_size, m.query_grid),
                                  window_radius=_overlay(model, name), signed=bool((w < 0).any()),
                                  finite=bool(torch.isfinite(w).all()), query_token=m.query_token))
    return out


def averaged(model: nn.Module, x: torch.Tensor, model_name: str = "model", budget_bytes: int = BUDGET_BYTES,
             max_queries: int = MAX_QUERIES) -> tuple[list[LayerAttention], str]:
    """Each layer's per-head map averaged over query positions (and the images of x), with statistics.

    Returns the layers and a phrase saying which queries were averaged.
    """
    h, w = x.shape[-2:]
    probe = _eval_forward(model, x, queries=[(h // 2, w // 2)])
    _check_recorded(probe, model_name)
    accs = [_Accumulator(m) for m in probe]
    b = x.shape[0]
    dense_bytes = sum(b * m.heads * math.prod(m.query_grid) * math.prod(m.key_grid) * 4 for m in probe)
    if dense_bytes <= budget_bytes:
        maps = _eval_forward(model, x)
        for acc, m in zip(accs, maps):
            acc.add(m.weights.flatten(2, 3), cell_centres(m.query_grid, m.image_size, m.weights.device))
        note = "all query positions of each layer"
    else:
        finest = max((m.query_grid for m in probe), key=math.prod)
        step = max(1, math.ceil(math.sqrt(math.prod(finest) / max_queries)))
        cells = [(i, j) for i in range(step // 2, finest[0], step) for j in range(step // 2, finest[1], step)]
        pixels = [(min(h - 1, int((i + 0.5) * h / finest[0])), min(w - 1, int((j + 0.5) * w / finest[1])))
                  for i, j in cells]
        per_query = sum(b * m.heads * math.prod(m.key_grid) * 4 for m in probe)
        chunk = max(1, budget_bytes // per_query)
        for start in range(0, len(pixels), chunk):
            queries = pixels[start:start + chunk]
            maps = _eval_forward(model, x, queries=queries)
            for acc, m in zip(accs, maps):
                cells_l = [query_cell(p, m.image_size, m.query_grid) for p in queries]
                pos = cell_centres(m.query_grid, m.image_size, m.weights.device)
                index = torch.tensor([i * m.query_grid[1] + j for i, j in cells_l], device=pos.device)
                acc.add(m.weights, pos[index])
        note = (f"{len(pixels)} query pixels (every {step}th cell of the {finest[0]}x{finest[1]} grid; "
                f"the dense maps would take {dense_bytes / 2 ** 20:.0f} MB)")
    out = []
    for name, m, acc in zip(_unique_names(probe), probe, accs):
        mean_map = (acc.map_sum / acc.count).float().cpu().numpy()
        # A token query (CLS) has no position, so it has no attention distance.
        distance = [math.nan] * m.heads if m.query_token else (acc.dist_sum / acc.count).tolist()
        out.append(LayerAttention(name, m.image_size, m.query_grid, m.key_grid, mean_map,
                                  window_radius=_overlay(model, name), mean_distance_px=distance,
                                  entropy_nats=(acc.ent_sum / acc.count).tolist(), signed=acc.signed,
                                  finite=acc.finite, query_token=m.query_token))
    return out, note


# ---------------------------------------------------------------------------- layer selection


def select_layers(layers: list[LayerAttention], spec: str | None, cap: int = MAX_LAYERS_SHOWN
                  ) -> tuple[list[LayerAttention], str | None]:
    """The layers a figure shows and, when some were left out by default, a note saying how to pick.

    spec: None (all, or `cap` evenly spaced ones when there are more), "all", or a comma-separated list of
    indices (negative from the end), module paths and glob patterns (e.g. "0,3,-1" or "stages.2.*").
    """
    n = len(layers)
    if spec is None:
        if n <= cap:
            return layers, None
        keep = sorted({round(i) for i in np.linspace(0, n - 1, cap)})
        return [layers[i] for i in keep], (f"showing {len(keep)} of {n} attention layers ({', '.join(map(str, keep))})"
                                           f"; pick others with --layers, e.g. --layers 0,1,-1, "
                                           f"--layers '{layers[-1].name.rsplit('.', 1)[0]}.*' or --layers all")
    if spec.strip() == "all":
        return layers, None
    chosen: list[int] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            i = int(item)
        except ValueError:
            hits = [k for k, layer in enumerate(layers) if fnmatch.fnmatchcase(layer.name, item)]
            if not hits:
                names = ", ".join(layer.name for layer in layers[:12]) + (" ..." if n > 12 else "")
                raise UserError(f"--layers: no attention layer matches '{item}'; the {n} layers are: {names}") \
                    from None
            chosen.extend(hits)
            continue
        if not -n <= i < n:
            raise UserError(f"--layers: index {i} is out of range; the model has {n} attention layers "
                            f"(0..{n - 1}, or -1 for the last)")
        chosen.append(i % n)
    if not chosen:
        raise UserError("--layers is empty; give indices, names or patterns, e.g. --layers 0,-1")
    return [layers[i] for i in dict.fromkeys(chosen)], None


def select_heads(layers: list[LayerAttention], spec: str | None, cap: int = MAX_HEADS_SHOWN
                 ) -> tuple[list[LayerAttention], str | None]:
    """The maps a figure shows of each layer and, when heads were summarised by default, a note saying how to pick.

    spec: None (every head when no layer has more than `cap`, else one panel per layer: the mean over its heads),
    "all", "mean", or comma-separated head indices (negative from the end) applied to every layer; a layer that
    lacks a chosen head shows the others, and a layer with none of them is left out (the note says which).
    """
    if spec is None:
        most = max((layer.heads for layer in layers), default=0)
        if most <= cap:
            return layers, None
        return [_mean_of_heads(layer) for layer in layers], (
            f"each panel is the mean over a layer's {most} heads; pick heads with --heads, e.g. --heads 0,1 "
            f"or --heads all")
    spec = spec.strip()
    if spec == "all":
        return layers, None
    if spec == "mean":
        return [_mean_of_heads(layer) for layer in layers], None
    try:
        wanted = [int(item) for item in spec.split(",") if item.strip()]
    except ValueError:
        raise UserError(f"--heads {spec}: give head indices (e.g. 0,3 or -1), 'mean' or 'all'") from None
    if not wanted:
        raise UserError("--heads is empty; give head indices (e.g. 0,3), 'mean' or 'all'")
    shown, left_out = [], []
    for layer in layers:
        picked = list(dict.fromkeys(h % layer.heads for h in wanted if -layer.heads <= h < layer.heads))
        if picked:
            shown.append(_pick_heads(layer, picked))
        else:
            left_out.append(layer.name)
    if not shown:
        most = max(layer.heads for layer in layers)
        raise UserError(f"--heads {spec}: no layer has those heads; the layers have at most {most} "
                        f"(0..{most - 1}, or -1 for the last)")
    note = f"left out (fewer heads than --heads asks for): {', '.join(left_out)}" if left_out else None
    return shown, note


def _pick_heads(layer: LayerAttention, heads: list[int]) -> LayerAttention:
    def pick(values):
        return None if values is None else [values[h] for h in heads]

    return dataclasses.replace(layer, maps=layer.maps[heads], window_radius=pick(layer.window_radius),
                               mean_distance_px=pick(layer.mean_distance_px), entropy_nats=pick(layer.entropy_nats),
                               head_ids=[layer.panel_ids[h] for h in heads])


def _mean_of_heads(layer: LayerAttention) -> LayerAttention:
    """One map per layer: the mean of its heads' maps (each head's window overlay is per head, so none)."""
    if layer.heads == 1 and layer.head_ids is None:
        return layer
    return dataclasses.replace(layer, maps=layer.maps.mean(0, keepdims=True), window_radius=None,
                               mean_distance_px=None, entropy_nats=None, head_ids=["mean"], mean_of=layer.heads)


# ---------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class FigureText:
    title: str  # first line: config / model / weights
    subtitle: str = ""  # what is drawn
    notes: list[str] = field(default_factory=list)


def attention_grid(layers: list[LayerAttention], image: np.ndarray, text: FigureText,
                   query: tuple[int, int] | None = None, dpi: int = 150):
    """The input image (query marked), then a layers x heads grid of maps over it, one colour bar each.

    Layers with few heads share a row (4 panels a row at most when heads < 4), so the grid stays readable.
    query: the input pixel (y, x) of viz_1; None for averaged maps (the overlay is drawn at the centre).
    Returns the matplotlib Figure; each map panel has `panel_key` = (layer name, head).
    """
    plt = _pyplot()
    from matplotlib import colors, patheffects, ticker
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    max_heads = max(layer.heads for layer in layers)
    per_row = max(1, min(len(layers), 4 // max_heads))
    ncols = max_heads * per_row
    nrows = 1 + math.ceil(len(layers) / per_row)
    width, height = 2.4 * max(ncols, 2) + 0.3, 2.15 * nrows + 0.5
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    grid = fig.add_gridspec(nrows, max(ncols, 2), left=0.3 / width, right=1 - 0.45 / width, bottom=0.1 / height,
                            top=1 - 0.55 / height, wspace=0.55, hspace=0.4)
    gray = image.mean(-1)
    gray_range = (float(gray.min()), float(gray.max()) if gray.max() > gray.min() else float(gray.min()) + 1)
    extent = (0, w, h, 0)
    outline = [patheffects.withStroke(linewidth=2.5, foreground="white")]

    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(image, extent=extent, interpolation="nearest")
    ax.set_title(f"input {h}x{w}", fontsize=8)
    ax.tick_params(labelsize=6)
    if query is not None:
        ax.plot(query[1] + 0.5, query[0] + 0.5, marker="+", color="red", ms=10, mew=2)
        ax.set_title(f"input {h}x{w}, query (y={query[0]}, x={query[1]})", fontsize=8)
    info = fig.add_subplot(grid[0, 1:])
    info.axis("off")
    chars = max(30, int((max(ncols, 2) - 1) * 2.4 * 72 / (8 * 0.6)))  # what fits in the panel at 8 pt
    lines = [textwrap.fill(line, chars) for line in (text.subtitle, *text.notes) if line]
    info.text(0.0, 0.95, "\n".join(lines), fontsize=8, va="top", ha="left", transform=info.transAxes)
    fig.suptitle(text.title, fontsize=10)

    for index, layer in enumerate(layers):
        row, slot = 1 + index // per_row, index % per_row
        sy, sx = layer.key_stride
        for head in range(layer.heads):
            ax = fig.add_subplot(grid[row, slot * max_heads + head])
            ax.panel_key = (layer.name, layer.panel_ids[head])
            values = layer.maps[head].astype(np.float64)
            finite = np.isfinite(values)
            shown = np.ma.masked_where(~finite | ((values == 0) & (not layer.signed)), values)
            top = float(np.abs(values[finite]).max()) if finite.any() else 1.0
            top = top if top > 0 else 1.0
            if layer.signed:
                cmap, norm = "RdBu_r", colors.Normalize(-top, top)
            else:
                cmap, norm = "viridis", colors.Normalize(0.0, top)
            ax.imshow(gray, cmap="gray", vmin=gray_range[0] - 0.25 * (gray_range[1] - gray_range[0]),
                      vmax=gray_range[1], extent=extent, alpha=0.7, interpolation="nearest")
            im = ax.imshow(shown, cmap=cmap, norm=norm, extent=extent, alpha=0.9, interpolation="nearest")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{layer.name} / {layer.head_label(head)}" + ("" if finite.all() else " (non-finite)")
            ax.set_title(title, fontsize=7.5)
            if head == 0:
                ax.set_ylabel(f"{layer.query_token.upper()} query" if layer.query_token else
                              f"{layer.query_grid[0]}x{layer.query_grid[1]} grid", fontsize=7)
            cb = fig.colorbar(im, cax=ax.inset_axes([1.04, 0.0, 0.06, 1.0]))
            cb.locator = ticker.MaxNLocator(4)
            cb.formatter = ticker.FormatStrFormatter("%.2g")
            cb.update_ticks()
            cb.ax.tick_params(labelsize=6)
            if query is not None and layer.query_token is None:
                cy, cx = layer.query_cell
                qy, qx = layer.query_stride
                centre = ((cy + 0.5) * qy, (cx + 0.5) * qx)
                ax.plot(centre[1], centre[0], marker="+", color="red", ms=7, mew=1.3, path_effects=outline)
            else:
                centre = ((h // 2) + 0.5, (w // 2) + 0.5)
            if layer.window_radius is not None:
                r = layer.window_radius[head]
                half_y, half_x = (r + 0.5) * sy, (r + 0.5) * sx
                ax.add_patch(Rectangle((centre[1] - half_x, centre[0] - half_y), 2 * half_x, 2 * half_y,
                                       fill=False, edgecolor="red", linestyle="--", linewidth=1.2))
    return fig


def map_panels(fig) -> list[tuple[str, int]]:
    """(layer name, head) of each attention panel of an `attention_grid` figure, in drawing order."""
    return [ax.panel_key for ax in fig.axes if hasattr(ax, "panel_key")]


def statistics_figure(layers: list[LayerAttention], title: str, dpi: int = 150):
    """Mean attention distance and entropy of each head, per layer (layers in forward order)."""
    plt = _pyplot()

    n = len(layers)
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(5.0, 1.5 + 0.4 * n), 4.8), dpi=dpi, layout="constrained")
    max_heads = max(layer.heads for layer in layers)
    cmap = plt.get_cmap("tab10" if max_heads <= 10 else "tab20")
    for ax, key, label in ((axes[0], "mean_distance_px", "mean attention distance (input pixels)"),
                           (axes[1], "entropy_nats", "attention entropy (nats)")):
        means = []
        for i, layer in enumerate(layers):
            values = np.array(getattr(layer, key), dtype=np.float64)
            offsets = np.linspace(-0.25, 0.25, layer.heads) if layer.heads > 1 else np.zeros(1)
            for head, (dx, v) in enumerate(zip(offsets, values)):
                ax.scatter(i + dx, v, color=cmap(head % cmap.N), s=18, zorder=3,
                           label=f"head {head}" if i == 0 or head >= layers[0].heads else None)
            means.append(np.nanmean(values) if np.isfinite(values).any() else np.nan)
        ax.plot(range(n), means, color="0.4", linewidth=1, zorder=2, label="mean over heads")
        ax.set_xticks(range(n))
        ax.set_xticklabels([layer.name for layer in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label, fontsize=9)
        ax.set_xlabel("attention layer (forward order)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=7, loc="best", ncol=2 if len(unique) > 6 else 1)
    fig.suptitle(title, fontsize=10)
    return fig


def figure_to_tensor(fig) -> torch.Tensor:
    """A drawn figure as a (3, H, W) float tensor in [0, 1] (for TensorBoard)."""
    plt = _pyplot()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


# ---------------------------------------------------------------------------- tasks


@dataclass
class VizRequest:
    task: str  # "viz" or "viz_1"
    model: nn.Module
    image: InputImage
    title: str  # config, model and weights
    output_dir: Path
    pixel: tuple[int, int] | None = None  # viz_1; None: the centre
    layers: str | None = None  # the --layers spec
    heads: str | None = None  # the --heads spec
    model_name: str = "model"
    device: torch.device = torch.device("cpu")


def check_pixel(pixel: tuple[int, int] | None, size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if pixel is None:
        return h // 2, w // 2
    y, x = pixel
    if not (0 <= y < h and 0 <= x < w):
        raise UserError(f"--pixel {y} {x} is outside the {h}x{w} input image; give Y in 0..{h - 1} and X in "
                        f"0..{w - 1} (row, column)")
    return int(y), int(x)


def run(req: VizRequest) -> list[Path]:
    """Draw the task's figures (everything is checked and drawn before anything is written); return the paths."""
    plt = _pyplot()
    model = req.model.to(req.device).eval()
    x = req.image.tensor.to(req.device)
    figures: dict[str, object] = {}
    texts: dict[str, str] = {}
    if req.task == "viz_1":
        pixel = check_pixel(req.pixel, req.image.size)
        layers = one_query(model, x, pixel, req.model_name)
        shown, note = select_layers(layers, req.layers)
        shown, head_note = select_heads(shown, req.heads)
        notes = [n for n in (note, head_note) if n]
        if any(layer.window_radius is not None for layer in shown):
            notes.append("dashed square: each head's effective window (adaptive span), around the query")
        text = FigureText(req.title, f"attention of the query pixel (y={pixel[0]}, x={pixel[1]}) of "
                                     f"{req.image.source}; each map over the input at its grid's scale", notes)
        figures[f"viz_1_{req.image.tag}_y{pixel[0]}_x{pixel[1]}.png"] = attention_grid(shown, req.image.display,
                                                                                      text, query=pixel)
    else:
        if req.pixel is not None:
            raise UserError("--pixel chooses the query of viz_1; viz averages over all query pixels "
                            "(use --task viz_1 --pixel Y X)")
        layers, averaged_over = averaged(model, x, req.model_name)
        shown, note = select_layers(layers, req.layers)
        shown, head_note = select_heads(shown, req.heads)
        notes = [n for n in (note, head_note) if n]
        if any(layer.window_radius is not None for layer in shown):
            notes.append("dashed square: each head's effective window (adaptive span), around the image centre")
        if any(not layer.finite for layer in layers):
            notes.append("some maps have non-finite weights (left blank)")
        text = FigureText(req.title, f"attention averaged over {averaged_over}; {req.image.source}", notes)
        stem = f"viz_{req.image.tag}"
        figures[f"{stem}.png"] = attention_grid(shown, req.image.display, text)
        figures[f"{stem}_distance.png"] = statistics_figure(
            layers, f"{req.title}\nper-head statistics, averaged over {averaged_over}")
        texts[f"{stem}_stats.json"] = _compact_json({
            "title": req.title, "image": req.image.source, "image_size": list(req.image.size),
            "averaged_over": averaged_over,
            "definitions": {"mean_distance_px": "mean over queries of sum_k w_qk * Euclidean distance between the "
                                                "query's and key's cell centres, in input-image pixels",
                            "entropy_nats": "mean over queries of -sum_k w_qk ln w_qk",
                            "query_token": "the layer's map of a token query with no position (a ViT's CLS "
                                           "token): its mean_distance_px is null",
                            "signed": "weights are not probabilities; the statistics use |w| normalised"},
            "layers": [layer.stats() for layer in layers],
        })
    req.output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = req.output_dir / name
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    for name, content in texts.items():
        path = req.output_dir / name
        path.write_text(content)
        written.append(path)
    return written


def _compact_json(data) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def tensorboard_image(model: nn.Module, x: torch.Tensor, mean, std, title: str) -> torch.Tensor:
    """The `viz` grid of one (normalised) image as a (3, H, W) tensor: the engine's periodic TensorBoard image."""
    was_training = model.training
    model.eval()
    try:
        layers, over = averaged(model, x[:1])
    finally:
        model.train(was_training)
    shown, note = select_layers(layers, None)
    shown, head_note = select_heads(shown, None)
    text = FigureText(title, f"attention averaged over {over}", [n for n in (note, head_note) if n])
    return figure_to_tensor(attention_grid(shown, display_from_normalised(x[:1], mean, std), text, dpi=70))
