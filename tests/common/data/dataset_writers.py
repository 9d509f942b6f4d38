"""Write small datasets in the real on-disk formats (torchvision's layouts).

For tests that must go through the same readers users do. Each in-memory
writer returns a `Written` holding exactly what `common.data.datasets.load_in_memory`
should give back (uint8 (N, H, W, C) images, int64 labels, class names), so
tests can compare pixel-exactly.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Written:
    """What a reader should return, per split, in the reader's output format."""

    train_images: np.ndarray  # (N, H, W, C) uint8, C = 3 (colour) or 1 (greyscale)
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]

    def split(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return (self.train_images, self.train_labels) if train else (self.test_images, self.test_labels)


def _random_split(rng: np.random.Generator, n: int, size: int, channels: int, n_classes: int):
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    return images, labels


# ---- CIFAR -----------------------------------------------------------------


def _dump(path: Path, obj: dict, bytes_keys: bool) -> None:
    """Python 3 pickles; bytes_keys mimics files whose keys load as bytes."""
    if bytes_keys:
        obj = {k.encode(): ([v.encode() for v in vals] if k.endswith("names") else vals) for k, vals in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) in CIFAR's CHW row order."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def write_cifar10(root, n_train: int = 50, n_test: int = 10, seed: int = 0, bytes_keys: bool = False) -> Written:
    """<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; train split over 5 batches."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_images, train_labels = _random_split(rng, n_train, 32, 3, 10)
    test_images, test_labels = _random_split(rng, n_test, 32, 3, 10)

    batches = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(batches, start=1):
        entry = {"batch_label": f"training batch {i} of 5", "data": _cifar_rows(train_images[idx]),
                 "labels": train_labels[idx].tolist()}
        _dump(folder / f"data_batch_{i}", entry, bytes_keys)
    _dump(folder / "test_batch",
          {"batch_label": "testing batch 1 of 1", "data": _cifar_rows(test_images), "labels": test_labels.tolist()},
          bytes_keys)
    _dump(folder / "batches.meta", {"label_names": classes, "num_cases_per_batch": 10000}, bytes_keys)
    return Written(train_images, train_labels, test_images, test_labels, classes)


def write_cifar100(root, n_train: int = 50, n_test: int = 10, seed: int = 0, bytes_keys: bool = False) -> Written:
    """<root>/cifar-100-python/{train, test, meta} with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"fine_{i:02d}" for i in range(100)]
    written = []
    for name, n in (("train", n_train), ("test", n_test)):
        images, labels = _random_split(rng, n, 32, 3, 100)
        entry = {"data": _cifar_rows(images), "fine_labels": labels.tolist(),
                 "coarse_labels": (labels // 5).tolist()}
        _dump(folder / name, entry, bytes_keys)
        written += [images, labels]
    _dump(folder / "meta", {"fine_label_names": classes,
                            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]}, bytes_keys)
    return Written(*written, classes)


# ---- SVHN ------------------------------------------------------------------


def write_svhn(root, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Written:
    """<root>/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    written = []
    for name, n in (("train", n_train), ("test", n_test)):
        images, labels = _random_split(rng, n, 32, 3, 10)
        labels[:1] = 0  # make sure the 10 -> 0 mapping is exercised
        file_labels = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(Path(root) / f"{name}_32x32.mat"),
                         {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": file_labels})
        written += [images, labels]
    return Written(*written, [str(d) for d in range(10)])


# ---- MNIST -----------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 00 00 08 <ndim>, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


MNIST_CLASSES = [f"{d} - {w}" for d, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def write_idx_dataset(folder, classes: list[str], n_train: int = 20, n_test: int = 10, seed: int = 0,
                      gz: bool = False) -> Written:
    """folder/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; images returned with one channel."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        gray, labels = _random_split(rng, n, 28, 1, len(classes))
        for name, array in ((f"{prefix}-images-idx3-ubyte", gray[..., 0]), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(array)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written += [gray, labels]
    return Written(*written, list(classes))


def write_mnist(root, n_train: int = 20, n_test: int = 10, seed: int = 0, gz: bool = False) -> Written:
    """<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (torchvision's layout)."""
    return write_idx_dataset(Path(root) / "MNIST" / "raw", MNIST_CLASSES, n_train, n_test, seed, gz)


def write_fashion_mnist(root, n_train: int = 20, n_test: int = 10, seed: int = 0, gz: bool = False,
                        layout: str = "torchvision") -> Written:
    """Fashion-MNIST's four IDX files: in <root>/FashionMNIST/raw/ (layout "torchvision") or directly in
    <root> with .gz (layout "debian", as the dataset-fashion-mnist package installs them)."""
    folder = Path(root) / "FashionMNIST" / "raw" if layout == "torchvision" else Path(root)
    return write_idx_dataset(folder, FASHION_MNIST_CLASSES, n_train, n_test, seed, gz or layout == "debian")


# ---- Image folders -----------------------------------------------------------


@dataclass
class WrittenFolder:
    """Files per split ("train", "val") as (path, class index), in ImageFolder's order."""

    classes: list[str]
    files: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)
    corrupt: Path | None = None  # the undecodable file, listed in files["train"] too


def write_imagefolder(root, classes, per_class: int = 2, size=16, corrupt: bool = False,
                      seed: int = 0) -> WrittenFolder:
    """<root>/{train,val}/<class>/img_<i>.png, random RGB noise.

    size is an int (square) or (width, height). corrupt=True adds
    train/<classes[0]>/zz_corrupt.png holding bytes no decoder accepts.
    """
    rng = np.random.default_rng(seed)
    width, height = (size, size) if isinstance(size, int) else size
    classes = sorted(classes)
    written = WrittenFolder(classes)
    for split in ("train", "val"):
        files = written.files.setdefault(split, [])
        for index, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"img_{i}.png"  # PNG: lossless, pixel-exact
                Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
                files.append((path, index))
            if split == "train" and corrupt and index == 0:
                written.corrupt = folder / "zz_corrupt.png"  # sorts last in its class
                written.corrupt.write_bytes(b"this is not a PNG file")
                files.append((written.corrupt, index))
    return written
