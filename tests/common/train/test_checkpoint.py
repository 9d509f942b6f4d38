"""Checkpoint files: a checksum over the contents, one-line errors for every damaged or foreign file (fuzzed)."""

from __future__ import annotations

import collections
import contextlib
import fractions
import io
import random

import pytest
import torch
import yaml

from common import tasks
from common.config import load_config
from common.errors import UserError
from common.train import checkpoint as ckpt
from tests.helpers import TINY_CONFIG, deep_update


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real last.ckpt of a one-epoch tiny run."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = deep_update(TINY_CONFIG, {"train": {"epochs": 1}, "log": {"tensorboard": False},
                                    "output_root": str(folder / "runs")})
    (folder / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        tasks.train(load_config(folder / "tiny.yaml"), output=str(folder / "run"))
    return folder / "run" / "last.ckpt"


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_a_flipped_bit_in_the_weights_is_caught_by_the_checksum(trained, tmp_path):
    saved = ckpt.load_checkpoint(trained)
    weight = next(v for v in saved["model"].values() if v.is_floating_point() and v.numel() > 8)
    data = bytearray(trained.read_bytes())
    at = data.find(weight.numpy().tobytes()[:16])
    assert at > 0
    data[at + 3] ^= 0x10  # a small change in one float: it would load fine without the checksum
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="is corrupt: its contents do not match the checksum"):
        ckpt.load_checkpoint(tmp_path / "bad.ckpt")


def test_fuzzed_checkpoints_fail_in_one_line_or_load_unchanged(trained, tmp_path):
    good, reference = trained.read_bytes(), ckpt.load_checkpoint(trained)
    rng = random.Random(0)
    outcomes = collections.Counter()
    for i in range(200):
        data = bytearray(good)
        kind = ("flip", "flip", "bytes", "truncate", "random")[i % 5]
        if kind == "flip":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "bytes":
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == "truncate":
            data = data[:rng.randrange(len(data))]
        else:
            data = bytearray(rng.randbytes(rng.randrange(1, 4096)))
        path = tmp_path / "fuzzed.ckpt"
        path.write_bytes(bytes(data))
        try:
            loaded = ckpt.load_checkpoint(path, needs=("config", "model", "state"))
        except UserError as exc:
            assert "\n" not in str(exc) and "weights_only" not in str(exc), str(exc)
            outcomes["refused"] += 1
        else:  # a change the loader ignores (zip padding, a comment): it must not change a thing
            assert same(loaded, reference), (kind, i)
            outcomes["unchanged"] += 1
    assert outcomes["refused"] > 150, outcomes


def test_a_pickle_of_other_objects_is_refused_in_our_own_words(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"format": ckpt.FORMAT, "version": 2, "x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert "could run code" in message and "weights_only" not in message and "\n" not in message


def test_an_incomplete_checkpoint_is_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path / "part.ckpt", {"model": {"w": torch.zeros(2)}})
    assert "model" in ckpt.load_checkpoint(tmp_path / "part.ckpt")  # what it holds loads ...
    with pytest.raises(UserError, match="is incomplete \\(no valid 'config' entry\\)"):
        ckpt.load_checkpoint(tmp_path / "part.ckpt", needs=("config", "model"))  # ... what a task needs must be there


def test_checkpoints_of_format_1_still_load(tmp_path):
    torch.save({"format": ckpt.FORMAT, "version": 1, "model": {"w": torch.ones(2)}}, tmp_path / "v1.ckpt")
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "v1.ckpt")["model"]["w"], torch.ones(2))
