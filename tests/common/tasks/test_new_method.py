"""The README's walkthrough: a new method (mixer, model, figure task) outside common/, used from the CLI."""

from __future__ import annotations

import textwrap

import yaml

from tests.helpers import TINY_CONFIG, deep_update, run_main

PACKAGE = '''
"""A new method: a mixer, a model on the shared backbone, and a figure of its weights."""

from torch import nn

from common.models.resnet import ResNet
from common.registry import register_figure_task, register_mixer, register_model

register_figure_task("mix_weights", help="the mixer's kernel norms", needs="a mixer with kernels",
                     hint="use mypaper's models", file_stem="mixw")


@register_mixer(name="my_mixer")
class MyMixer(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1, width=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, width, stride, width // 2, bias=False)

    def forward(self, x):
        return self.conv(x)

    def figures(self):
        def draw(title, dpi):
            from matplotlib.figure import Figure

            fig = Figure(dpi=dpi)
            fig.add_subplot().plot(self.conv.weight.detach().flatten(1).norm(dim=1).numpy())
            fig.suptitle(title)
            return fig

        return {"mix_weights": draw}


@register_model
def my_net(num_classes: int = 10, width: int = 3):
    return ResNet(block="basic", layers=(1, 1), widths=(8, 16), stem_width=8, mixer="my_mixer",
                  mixer_kwargs={"width": width}, num_classes=num_classes)
'''


def test_a_new_method_needs_no_change_in_common(tmp_path):
    (tmp_path / "mypaper").mkdir()
    (tmp_path / "mypaper" / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    cfg = deep_update(dict(TINY_CONFIG), {"train": {"epochs": 1}, "log": {"tensorboard": False}})
    cfg["model"] = {"name": "my_net", "width": 5}
    cfg["custom_imports"] = ["mypaper"]
    cfg["output_root"] = str(tmp_path / "runs")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": str(tmp_path)}
    run = tmp_path / "run"
    trained = run_main("--config", str(path), "--output", str(run), env=env)
    assert trained.returncode == 0, trained.stderr
    drawn = run_main("--task", "mix_weights", "--load", str(run), env=env)  # the config comes from the checkpoint
    assert drawn.returncode == 0, drawn.stderr
    assert sorted(p.name for p in (run / "mix_weights").glob("*.png")) == ["mixw_epoch_0001.png"]

    missing = dict(cfg, custom_imports=["no_such_paper"])
    path.write_text(yaml.safe_dump(missing))
    refused = run_main("--config", str(path), "--output", str(tmp_path / "never"), env=env)
    assert refused.returncode == 2 and "custom_imports: cannot import 'no_such_paper'" in refused.stderr
    assert not (tmp_path / "never").exists()
    path.write_text(yaml.safe_dump(cfg))
    typo = run_main("--config", str(path), "--task", "gaus_viz", env=env)
    assert typo.returncode == 2 and "unknown task 'gaus_viz' (did you mean 'gauss_viz'?)" in typo.stderr
