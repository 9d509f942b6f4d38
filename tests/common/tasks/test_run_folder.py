"""`--resume` without `--output`: the newest run whose config matches, or a list of the runs that exist."""

from __future__ import annotations

import contextlib
import io

import pytest

from common import tasks
from common.config import load_config
from common.errors import UserError
from common.tasks import run_folder


def test_resume_takes_the_newest_matching_run_and_lists_the_others(write_config, tmp_path, monkeypatch):
    path = write_config({"train": {"epochs": 1}})
    runs = tmp_path / "runs" / "tiny"
    for name, overrides in (("20240101-000000", []), ("20240102-000000", ["train.optimizer.lr=0.01"])):
        monkeypatch.setattr(run_folder, "timestamp", lambda name=name: name)
        with contextlib.redirect_stdout(io.StringIO()):
            tasks.train(load_config(path, overrides))
    # The newer run is an aborted variant with another lr: resuming the config continues the older one.
    with contextlib.redirect_stdout(io.StringIO()):
        tasks.train(load_config(path, ["train.epochs=2"]), resume=True)
    assert [len((runs / name / "metrics.jsonl").read_text().splitlines())
            for name in ("20240101-000000", "20240102-000000")] == [2, 1]
    with pytest.raises(UserError) as info:
        tasks.train(load_config(path, ["train.optimizer.momentum=0.5"]), resume=True)
    message = str(info.value)
    assert "--resume: no run under" in message and "has this config" in message
    assert "20240102-000000 (train.optimizer.lr, train.optimizer.momentum differ)" in message
    assert "20240101-000000 (train.optimizer.momentum differ)" in message
