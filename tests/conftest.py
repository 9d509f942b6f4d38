"""Shared fixtures: tiny configs that train in seconds on the CPU; one intra-op thread per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import TINY_CONFIG, deep_update


@pytest.fixture
def write_config(tmp_path):
    """write_config(changes=None, name="tiny") -> path of a tiny YAML config, optionally modified."""

    def write(changes: dict | None = None, name: str = "tiny") -> Path:
        changes = changes or {}
        base = dict(TINY_CONFIG)
        if "name" in changes.get("model", {}):
            base.pop("model")  # another model: the tiny ResNet's options would not fit it
        cfg = deep_update(base, changes)
        cfg.setdefault("output_root", str(tmp_path / "runs"))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests run their (tiny) ops on one thread.

    Their ops are small; on a 2-core machine with other work on it, two OpenMP
    threads per op mostly wait for each other (measured: a tiny SAN training
    step 80 s with 2 threads, 8 s with 1). Subprocess tests keep the default.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
