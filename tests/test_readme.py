"""The README's quickstart and figure commands work as written, offline (shrunk to seconds with --set).

They run in this process through the command-line entry point (click's runner), not in subprocesses: the
same code path, without importing torch once per command.
"""

from __future__ import annotations

import re
import shlex

import numpy as np
from click.testing import CliRunner
from PIL import Image

from main import main
from tests.helpers import REPO

README = (REPO / "README.md").read_text()
SHRINK = ["--set", "data.synthetic.train_size=100", "--set", "data.synthetic.test_size=20", "--set",
          "train.epochs=2", "--quiet"]


def run_main(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def bash_block_after(heading: str) -> list[list[str]]:
    """The `python main.py ...` commands of the first bash block after `heading`, as argument lists."""
    section = README[README.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    return [shlex.split(line.split("#")[0])[2:] for line in block.splitlines() if line.startswith("python main.py")]


def test_quickstart_trains_a_family_and_draws_its_attention(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    train, draw = bash_block_after("## Quickstart: one small model of every family")
    output = train[train.index("--output") + 1]
    run = tmp_path / output
    result = run_main(*[str(run) if arg == output else arg for arg in train], *SHRINK)
    assert result.exit_code == 0, result.output
    assert draw[draw.index("--load") + 1] == output
    result = run_main(*[str(run) if arg == output else arg for arg in draw])
    assert result.exit_code == 0, result.output
    assert len(list((run / "viz").glob("viz_1_*.png"))) == 1


def test_attention_figure_examples_work_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = bash_block_after("### Attention figures: `viz_1` and `viz`")
    assert len(commands) == 4
    trained = tmp_path / "trained"
    assert run_main("--config", "configs/quickstart/sasa.yaml", "--output", str(trained), *SHRINK).exit_code == 0
    picture = tmp_path / "cat.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(picture)
    monkeypatch.chdir(tmp_path)  # data.root "data" would be created here by a download attempt
    for i, command in enumerate(commands):
        args = [str(trained) if "<timestamp>" in arg else str(picture) if arg == "cat.jpg" else
                str(REPO / arg) if arg.endswith(".yaml") else arg for arg in command]
        result = run_main(*args, "--output", str(tmp_path / f"figures{i}"))
        assert result.exit_code == 0, (command, result.output)
        assert list((tmp_path / f"figures{i}").glob("*.png")), command
    assert not (tmp_path / "data").exists()  # nothing was downloaded, or tried
