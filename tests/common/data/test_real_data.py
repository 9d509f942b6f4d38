"""The real Fashion-MNIST, as Debian's dataset-fashion-mnist installs it (.ci/run installs it where apt exists).

Elsewhere these tests skip, saying what to install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.datasets import STATS, load_in_memory
from tests.helpers import REPO, run_main

FOLDER = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (FOLDER / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"the real Fashion-MNIST is not installed in {FOLDER} (apt-get install dataset-fashion-mnist)")


def test_the_debian_folder_reads_as_fashion_mnist_with_its_statistics():
    images, labels, classes = load_in_memory("fashion_mnist", FOLDER, train=True)
    assert images.shape == (60000, 28, 28, 1) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10 and classes[0] == "T-shirt/top"
    pixels = images.double() / 255
    mean, std = STATS["fashion_mnist"]
    assert pixels.mean().item() == pytest.approx(mean[0], abs=5e-5)
    assert pixels.std().item() == pytest.approx(std[0], abs=5e-5)
    test_images, test_labels, _ = load_in_memory("fashion_mnist", FOLDER, train=False)
    assert test_images.shape == (10000, 28, 28, 1) and torch.bincount(test_labels).tolist() == [1000] * 10
    assert not np.array_equal(images[:10].numpy(), test_images[:10].numpy())


def test_a_study_config_trains_on_a_subset_of_the_real_data(tmp_path):
    out = tmp_path / "run"
    result = run_main("--config", str(REPO / "configs/study/fashion_mnist/conv.yaml"), "--output", str(out),
                      "--set", "data.train_subset=2000", "--set", "train.epochs=1", "--set", "train.batch_size=32",
                      "--set", "model.widths=[8,16,16,32]", "--set", "model.stem_width=8")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist" and summary["test_acc"] > 0.5  # 10 classes: chance is 0.1
