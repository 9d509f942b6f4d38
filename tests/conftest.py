"""Shared fixtures: tiny configs that train in seconds on the CPU; one intra-op thread per test; the device of
the tests marked `gpu`."""

from __future__ import annotations

import os
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


def _gpu_tests_on_cpu() -> bool:
    return os.environ.get("GPU_TESTS_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped without CUDA, unless GPU_TESTS_ON_CPU=1 dry-runs them on the CPU (which
    checks the tests themselves, not the GPU code paths)."""
    if torch.cuda.is_available() or _gpu_tests_on_cpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu; GPU_TESTS_ON_CPU=1 dry-runs it on the CPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def gpu_device() -> torch.device:
    """The device of a `gpu` test: cuda, or the CPU when GPU_TESTS_ON_CPU=1 and there is no GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def no_tf32(monkeypatch):
    """Full fp32 convolutions and matmuls on CUDA (cuDNN defaults to TF32, ~1e-3 relative), for comparisons of
    fp32 results against the CPU at fp32 tolerances."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
