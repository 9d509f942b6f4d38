"""`viz` and `viz_1`: attention figures of any attention model, through the capture contract."""

from __future__ import annotations

from pathlib import Path

from common.config import Config
from common.data.loaders import input_spec
from common.errors import UserError
from common.files import check_output_dir
from common.inspect.capture import has_attention
from common.tasks.run_folder import checkpoint_run_dir, load_weights, model_to_inspect, timestamp
from common.train.distributed import select_device

NO_ATTENTION_HINT = "use the config of an attention model (any family in configs/ but baselines/)"


def require_attention(model, model_name: str, task: str) -> None:
    if not has_attention(model):
        raise UserError(f"model '{model_name}' has no attention layers, so `{task}` has nothing to draw; "
                        f"{NO_ATTENTION_HINT}")


def visualize(task: str, cfg: Config | None, load: str | None = None, output: str | None = None,
              image: str | None = None, index: int | None = None, pixel: tuple[int, int] | None = None,
              layers: str | None = None, heads: str | None = None) -> list[Path]:
    """`viz` / `viz_1`: attention figures of the config's model (random init, or the --load checkpoint).

    The config defaults to the checkpoint's own. Output: --output, else `<run>/viz/` beside the checkpoint,
    else `runs/<config name>/viz/<timestamp>`.
    """
    from common.inspect import viz

    cfg, model, path, saved = model_to_inspect(cfg, load)
    require_attention(model, cfg.model.name, task)
    input_size, _ = input_spec(cfg.data)
    if saved is not None:
        which = load_weights(model, saved, path)
        weights = f"weights {path} ({which}, epoch {saved['state']['epoch']})"
    else:
        weights = "random init (no --load)"
    if image is not None and index is not None:
        raise UserError("give either --image PATH or --index N (an image of the test split), not both")
    if image is not None:
        picture = viz.image_from_file(image, cfg.data, input_size, cfg.seed)
    else:
        picture = viz.image_from_dataset(cfg.data, 0 if index is None else index, cfg.seed)
    if output:
        out_dir = Path(output)
    elif path is not None:
        out_dir = checkpoint_run_dir(path) / "viz"
    else:
        out_dir = Path(cfg.output_root) / cfg.name / "viz" / timestamp()
    check_output_dir(out_dir, "--output" if output else None)
    request = viz.VizRequest(task=task, model=model, image=picture, output_dir=out_dir, pixel=pixel,
                             layers=layers, heads=heads, title=f"{cfg.name}: {cfg.model.name}, {weights}",
                             model_name=cfg.model.name, device=select_device(cfg.device))
    written = viz.run(request)
    print("wrote " + "\n      ".join(str(p) for p in written))
    return written
