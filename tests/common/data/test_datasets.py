"""Readers of the real on-disk formats, fed files written in those formats."""

import gzip
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

from common.data import datasets
from common.data.datasets import (
    IN_MEMORY,
    STATS,
    imagefolder_dataset,
    imagefolder_transform,
    load_in_memory,
)
from common.errors import UserError
from tests.common.data.dataset_writers import (
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagefolder,
    write_mnist,
    write_svhn,
)

WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn, "mnist": write_mnist,
           "fashion_mnist": write_fashion_mnist}
CHANNELS = {"cifar10": 3, "cifar100": 3, "svhn": 3, "mnist": 1, "fashion_mnist": 1}


def assert_loaded(root, name, written, train):
    images, labels, classes = load_in_memory(name, root, train=train)
    expected_images, expected_labels = written.split(train)
    assert images.dtype == torch.uint8 and images.is_contiguous()
    assert images.shape[1:] == expected_images.shape[1:] and images.shape[-1] == CHANNELS[name]
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), expected_images)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)
    assert classes == written.classes
    return images, labels, classes


def assert_user_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message


# ---- in-memory readers ------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_cifar10_returns_written_pixels(tmp_path, train, bytes_keys):
    written = write_cifar10(tmp_path, n_train=12, n_test=5, seed=1, bytes_keys=bytes_keys)
    images, labels, classes = assert_loaded(tmp_path, "cifar10", written, train)
    assert len(images) == (12 if train else 5)
    assert classes[0] == "airplane" and len(classes) == 10


def test_cifar_rows_are_chw(tmp_path):
    """Independent of the writer: pixel (h, w, c) is row element c*1024 + h*32 + w."""
    write_cifar10(tmp_path, n_train=5, n_test=3)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        rows = pickle.load(f)["data"]
    images, _, _ = load_in_memory("cifar10", tmp_path, train=False)
    for n, h, w, c in [(0, 0, 0, 0), (1, 3, 7, 1), (2, 31, 30, 2)]:
        assert images[n, h, w, c] == rows[n, c * 1024 + h * 32 + w]


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar100_fine_labels_and_names(tmp_path, bytes_keys):
    written = write_cifar100(tmp_path, n_train=8, n_test=4, seed=2, bytes_keys=bytes_keys)
    for train in (True, False):
        _, _, classes = assert_loaded(tmp_path, "cifar100", written, train)
    assert len(classes) == 100 and classes[:2] == ["fine_00", "fine_01"]


def test_svhn_transposes_and_maps_10_to_0(tmp_path):
    written = write_svhn(tmp_path, n_train=6, n_test=4, seed=3)
    for train in (True, False):
        images, labels, classes = assert_loaded(tmp_path, "svhn", written, train)
    assert classes == [str(d) for d in range(10)]
    mat = scipy.io.loadmat(str(tmp_path / "test_32x32.mat"))
    assert mat["y"][0, 0] == 10 and labels[0] == 0  # digit 0 is stored as 10
    for n, h, w, c in [(0, 0, 0, 0), (3, 5, 9, 2)]:
        assert images[n, h, w, c] == mat["X"][h, w, c, n]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_raw_and_gz(tmp_path, gz):
    written = write_mnist(tmp_path, n_train=7, n_test=3, seed=4, gz=gz)
    for train in (True, False):
        images, _, classes = assert_loaded(tmp_path, "mnist", written, train)
        assert images.shape[1:] == (28, 28, 1)  # greyscale stays one channel
    assert classes[0] == "0 - zero" and classes == torchvision.datasets.MNIST.classes


@pytest.mark.parametrize("layout, gz", [("torchvision", False), ("torchvision", True), ("debian", True)])
def test_fashion_mnist_layouts(tmp_path, layout, gz):
    written = write_fashion_mnist(tmp_path, n_train=7, n_test=3, seed=5, gz=gz, layout=layout)
    for train in (True, False):
        images, _, classes = assert_loaded(tmp_path, "fashion_mnist", written, train)
        assert images.shape[1:] == (28, 28, 1)
    assert classes == torchvision.datasets.FashionMNIST.classes  # the dataset's own names, not digits


def test_fashion_mnist_prefers_the_torchvision_folder(tmp_path):
    write_fashion_mnist(tmp_path, n_train=4, n_test=2, seed=1, layout="debian")
    nested = write_fashion_mnist(tmp_path, n_train=5, n_test=2, seed=2, layout="torchvision")
    assert_loaded(tmp_path, "fashion_mnist", nested, train=True)


def test_missing_fashion_mnist_names_the_apt_package(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_in_memory("fashion_mnist", tmp_path / "data", train=True)
    assert_user_error(excinfo, f"{tmp_path / 'data'}/FashionMNIST/raw/", "apt-get install dataset-fashion-mnist",
                      "data.root=/usr/share/datasets/fashion-mnist", "data.download=true")


# ---- missing data and downloads ------------------------------------------------


@pytest.mark.parametrize(
    "name, expected_path, url",
    [
        ("cifar10", "cifar-10-batches-py/", "https://www.cs.toronto.edu/~kriz/cifar.html"),
        ("cifar100", "cifar-100-python/", "https://www.cs.toronto.edu/~kriz/cifar.html"),
        ("svhn", "train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/"),
        ("mnist", "MNIST/raw/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        ("fashion_mnist", "FashionMNIST/raw/", "https://github.com/zalandoresearch/fashion-mnist"),
    ],
)
def test_missing_dataset_says_where_to_put_it(tmp_path, name, expected_path, url):
    with pytest.raises(UserError) as excinfo:
        load_in_memory(name, tmp_path / "data", train=True)
    assert_user_error(excinfo, f"{tmp_path / 'data'}/{expected_path}", url, "data.download=true")


def test_missing_split_is_reported(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    load_in_memory("cifar10", tmp_path, train=True)  # the train split is complete
    with pytest.raises(UserError) as excinfo:
        load_in_memory("cifar10", tmp_path, train=False)
    assert_user_error(excinfo, "missing", "test_batch")


@pytest.mark.parametrize("error", [urllib.error.URLError("no network"), RuntimeError("bad md5")])
def test_failed_download_is_a_user_error(tmp_path, monkeypatch, error):
    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError) as excinfo:
        load_in_memory("cifar10", tmp_path, train=True, download=True)
    assert_user_error(excinfo, "CIFAR-10 download failed", "cifar-10-batches-py", "cifar.html")


@pytest.mark.parametrize("root_exists", [False, True])
def test_failed_download_removes_what_it_created(tmp_path, monkeypatch, root_exists):
    root = tmp_path / "data"
    if root_exists:  # a data folder holding another dataset, and a file of this one from before
        write_cifar10(root / "other")
        (root / "cifar-10-batches-py").mkdir()
        (root / "cifar-10-batches-py" / "batches.meta").write_bytes(b"kept")
    before = sorted(tmp_path.rglob("*"))

    def fails_half_way(root, download, **kwargs):  # what torchvision does: folders, a partial archive, an error
        (Path(root) / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"partial")
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fails_half_way)
    with pytest.raises(UserError, match="download failed"):
        load_in_memory("cifar10", root, train=True, download=True)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name, tv_class", [("cifar10", "CIFAR10"), ("svhn", "SVHN"), ("mnist", "MNIST"),
                                            ("fashion_mnist", "FashionMNIST")])
def test_download_fetches_into_layout_then_reads_it(tmp_path, monkeypatch, name, tv_class):
    calls = []

    def fake_download(root, download, **kwargs):
        calls.append((root, download))
        calls.append(WRITERS[name](root, n_train=5, n_test=5))  # what the real download would leave

    monkeypatch.setattr(torchvision.datasets, tv_class, fake_download)
    images, labels, _ = load_in_memory(name, tmp_path, train=False, download=True)
    assert calls[0] == (str(tmp_path), True)
    np.testing.assert_array_equal(images.numpy(), calls[1].test_images)
    load_in_memory(name, tmp_path, train=False, download=True)  # present now: no second download
    assert len(calls) == 2


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_in_memory("cifar11", tmp_path, train=True)
    assert_user_error(excinfo, "cifar11", "cifar10")


# ---- corrupt files -----------------------------------------------------------------


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def corrupt_cifar_pickle(root):
    path = root / "cifar-10-batches-py" / "data_batch_3"
    truncate(path)
    return "cifar10", True, path


def corrupt_cifar_meta(root):
    path = root / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(b"garbage")
    return "cifar10", False, path


def cifar_wrong_shape(root):
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, f)
    return "cifar10", False, path


def cifar100_coarse_only(root):
    path = root / "cifar-100-python" / "test"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "coarse_labels": [0]}, f)
    return "cifar100", False, path


def bad_mat(root):
    path = root / "train_32x32.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, but not really" + bytes(200))
    return "svhn", True, path


def svhn_bad_labels(root):
    path = root / "test_32x32.mat"
    scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)})
    return "svhn", False, path


def idx_bad_magic(root):
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[0] = 0x1F
    path.write_bytes(bytes(data))
    return "mnist", True, path


def idx_truncated(root):
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    truncate(path, keep=0.9)
    return "mnist", False, path


def idx_label_count_mismatch(root):
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4]))  # 2 labels for 10 images
    return "mnist", False, path


def test_gzipped_idx_without_gz_suffix_is_read(tmp_path):
    written = write_mnist(tmp_path, n_train=3, n_test=2, gz=True)
    raw = tmp_path / "MNIST" / "raw"
    for gz in raw.glob("*.gz"):
        gz.rename(gz.with_suffix(""))
    assert_loaded(tmp_path, "mnist", written, train=True)


def corrupt_gz(root):
    raw = root / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte").unlink()
    path = raw / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"x" * 100)[:30])
    return "mnist", True, path


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_cifar_pickle, corrupt_cifar_meta, cifar_wrong_shape, cifar100_coarse_only, bad_mat,
     svhn_bad_labels, idx_bad_magic, idx_truncated, idx_label_count_mismatch, corrupt_gz],
)
def test_corrupt_file_is_named(tmp_path, corrupt):
    for writer in WRITERS.values():
        writer(tmp_path, n_train=10, n_test=10)
    name, train, path = corrupt(tmp_path)
    with pytest.raises(UserError) as excinfo:
        load_in_memory(name, tmp_path, train=train)
    assert_user_error(excinfo, path)


# ---- image folders ---------------------------------------------------------------------


def test_imagefolder_classes_and_lengths(tmp_path):
    written = write_imagefolder(tmp_path, ["n02", "n01", "n03"], per_class=2, size=(20, 12))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    for train, split in ((True, "train"), (False, "val")):
        dataset = imagefolder_dataset(tmp_path, train=train, transform=None)
        assert dataset.classes == ["n01", "n02", "n03"]
        assert len(dataset) == 6
        assert [(p, t) for p, t in dataset.samples] == [(str(p), t) for p, t in written.files[split]]
    image, target = dataset[5]
    assert image.mode == "RGB" and image.size == (20, 12) and target == 2
    path = written.files["val"][5][0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(path)))


def test_imagefolder_converts_to_rgb(tmp_path):
    write_imagefolder(tmp_path, ["a"], per_class=1)
    Image.new("L", (8, 8), 7).save(tmp_path / "train" / "a" / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "train" / "a" / "rgba.png")
    dataset = imagefolder_dataset(tmp_path, train=True, transform=None)
    assert {dataset[i][0].mode for i in range(len(dataset))} == {"RGB"}


def test_val_uses_train_mapping_even_with_missing_classes(tmp_path):
    write_imagefolder(tmp_path, ["a", "b", "c"], per_class=1)
    shutil.rmtree(tmp_path / "val" / "a")
    dataset = imagefolder_dataset(tmp_path, train=False, transform=None)
    assert dataset.classes == ["a", "b", "c"] and dataset.targets == [1, 2]


def test_val_class_not_in_train(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"], per_class=1)
    (tmp_path / "val" / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "images" / "x.png")
    with pytest.raises(UserError) as excinfo:
        imagefolder_dataset(tmp_path, train=False, transform=None)
    assert_user_error(excinfo, tmp_path / "val", "images")


def test_corrupt_image_names_the_file(tmp_path):
    written = write_imagefolder(tmp_path, ["a", "b"], per_class=1, corrupt=True)
    dataset = imagefolder_dataset(tmp_path, train=True, transform=None)
    index = [p for p, _ in dataset.samples].index(str(written.corrupt))
    with pytest.raises(UserError) as excinfo:
        dataset[index]
    assert_user_error(excinfo, f"cannot decode image {written.corrupt}", "remove or replace the file")


def test_truncated_image_names_the_file(tmp_path):
    write_imagefolder(tmp_path, ["a"], per_class=1, size=64)
    path = tmp_path / "train" / "a" / "img_0.png"
    truncate(path, keep=0.5)
    dataset = imagefolder_dataset(tmp_path, train=True, transform=None)
    with pytest.raises(UserError) as excinfo:
        dataset[0]
    assert_user_error(excinfo, path)


@pytest.mark.parametrize("layout", ["no_root", "no_val", "no_classes", "empty_class"])
def test_bad_imagefolder_layouts(tmp_path, layout):
    if layout != "no_root":
        write_imagefolder(tmp_path, ["a", "b"], per_class=1)
    if layout == "no_val":
        shutil.rmtree(tmp_path / "val")
    if layout == "no_classes":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "train").mkdir()
        tmp_path = tmp_path / "empty"
    if layout == "empty_class":
        (tmp_path / "train" / "c").mkdir()
    with pytest.raises(UserError) as excinfo:
        imagefolder_dataset(tmp_path, train=layout != "no_val", transform=None)
    assert_user_error(excinfo, tmp_path)


@pytest.mark.parametrize("train, rrc", [(True, True), (True, False), (False, True)])
def test_imagefolder_transform_shapes(tmp_path, train, rrc):
    write_imagefolder(tmp_path, ["a"], per_class=2, size=(50, 30))
    mean, std = STATS["imagenet"]
    transform = imagefolder_transform(train, 24, mean, std, random_resized_crop=rrc)
    dataset = imagefolder_dataset(tmp_path, train=train, transform=transform)
    image, target = dataset[1]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and target == 0


def test_eval_transform_normalizes():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    transform = imagefolder_transform(False, 8, mean, std)
    out = transform(Image.new("RGB", (10, 13), (255, 51, 0)))
    assert out.shape == (3, 8, 8)
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, 0.0])
    torch.testing.assert_close(out[:, 4, 4], expected)


def test_eval_transform_is_the_imagenet_protocol():
    transform = imagefolder_transform(False, 224, (0, 0, 0), (1, 1, 1))
    resize, crop = transform.transforms[:2]
    assert resize.size == 256 and crop.size == (224, 224)


# ---- stats -----------------------------------------------------------------------------


def test_stats_cover_every_dataset():
    assert set(STATS) == set(IN_MEMORY) | {"imagenet"}
    for name, (mean, std) in STATS.items():
        assert len(mean) == len(std) == CHANNELS.get(name, 3)
        assert all(0 < m < 1 for m in mean) and all(0 < s < 1 for s in std)
    assert datasets.IN_MEMORY == ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist")


# ---- 16-bit images -----------------------------------------------------------------------


def test_16_bit_greyscale_is_scaled_not_saturated(tmp_path):
    from common.config import DataConfig
    from common.inspect.viz import image_from_file

    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 1000], [32768, 65535]], np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"  # Pillow's convert("RGB") would make every non-zero pixel white
        rgb = np.asarray(datasets.to_rgb(image))
    assert rgb.shape == (2, 2, 3) and rgb[..., 0].tolist() == [[0, 4], [128, 255]]
    shown = image_from_file(path, DataConfig(), (3, 2, 2)).display
    assert abs(float(shown.mean()) - (0 + 4 + 128 + 255) / 4 / 255) < 0.05
