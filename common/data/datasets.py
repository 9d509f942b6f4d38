"""Readers for the real datasets the papers train on.

Small datasets are read whole into memory as uint8 tensors; ImageNet-style
image folders are read lazily through torchvision's ImageFolder.

On-disk layouts (torchvision's own, so folders users already have just work):

- cifar10:  <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
            python pickles; "data" is uint8 (N, 3072) in CHW order, "labels";
            meta "label_names".
- cifar100: <root>/cifar-100-python/{train, test, meta}
            same pickles with "fine_labels"; meta "fine_label_names".
- svhn:     <root>/{train_32x32.mat, test_32x32.mat}
            MATLAB files; X is uint8 (32, 32, 3, N), y is (N, 1) with 10 = digit 0.
- mnist:    <root>/MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte,
            t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte}, each optionally .gz;
            IDX files, one (grey) channel. The four files directly in <root> work too.
- fashion_mnist: the same with FashionMNIST/ for MNIST/; or the four files
            directly in <root>, as Debian's dataset-fashion-mnist installs them
            (/usr/share/datasets/fashion-mnist/).
- imagefolder (ImageNet / Tiny-ImageNet): <root>/train/<class>/<images> and
            <root>/val/<class>/<images>; classes come from train/, sorted.

The in-memory readers are our own rather than torchvision's dataset classes:
those verify md5 checksums, which rules out the small files tests write, and
give tracebacks instead of messages a user can act on. torchvision is only used
to download, into the same layout, when the files are missing and
download=True.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from common.errors import UserError

IN_MEMORY = ("cifar10", "cifar100", "svhn", "mnist", "fashion_mnist")

# Per-channel (mean, std) of each dataset's training set in [0, 1] units, one value per channel.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The true per-pixel std; the widely copied (0.2023, 0.1994, 0.2010) is
    # the std of per-image means, not of pixels.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    # Computed over the 60,000 training images (tests/common/data/test_real_data.py checks them).
    "fashion_mnist": ((0.2860,), (0.3530,)),
    # ImageNet's; an image folder uses them only when its config names them (configs/datasets/imagenet.yaml).
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Standard ImageNet evaluation: resize to image_size / 0.875, center-crop.
EVAL_CROP_FRACTION = 0.875

_DOWNLOAD_HINT = "or set data.download=true on a machine with internet"


# --------------------------------------------------------------------------
# In-memory datasets
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What is needed to find, fetch and read one in-memory dataset."""

    title: str
    layout: Callable[[Path], str]  # expected files, for messages
    where: Callable[[Path], str]  # where to get them, for messages
    missing: Callable[[Path, bool], list[Path]]  # files absent for a split
    download: Callable[[Path, bool], None]  # torchvision fetch into layout
    read: Callable[[Path, bool], tuple[np.ndarray, np.ndarray, list[str]]]


def load_in_memory(
    name: str, root: str | Path, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read a whole split: images uint8 (N, H, W, 3) contiguous; labels int64 (N,); class names."""
    if name not in _SOURCES:
        raise UserError(f"unknown in-memory dataset {name!r}; choose one of {', '.join(IN_MEMORY)}")
    source, root = _SOURCES[name], Path(root)

    missing = source.missing(root, train)
    if missing and download:
        _download(source, root, train)
        missing = source.missing(root, train)
    if missing:
        raise UserError(
            f"{source.title} not found (missing {missing[0]}): expected {source.layout(root)} "
            f"({source.where(root)}), {'the download did not create it' if download else _DOWNLOAD_HINT}"
        )

    images, labels, classes = source.read(root, train)
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return images, labels, classes


def _download(source: _Source, root: Path, train: bool) -> None:
    """Fetch with torchvision; no network shows up as one of these errors.

    A failed (or interrupted) download leaves nothing behind: torchvision creates the root folder and a
    partial archive or extraction before it fails, and all of that is removed again.
    """
    before = _existing(root)
    try:
        source.download(root, train)
    except BaseException as exc:
        _remove_created(root, before)
        if not isinstance(exc, (OSError, RuntimeError)):  # URLError is an OSError
            raise
        raise UserError(
            f"{source.title} download failed ({_one_line(exc)}): put the files there yourself, "
            f"expected {source.layout(root)} ({source.where(root)})"
        ) from exc


def _existing(root: Path) -> tuple[Path | None, set[str]]:
    """What exists before a download: the outermost missing folder on the way to `root` (None when `root`
    exists) and every path below `root`."""
    missing = None
    for folder in (root, *root.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    if missing is not None:
        return missing, set()
    return None, {os.path.join(top, name) for top, dirs, files in os.walk(root) for name in dirs + files}


def _remove_created(root: Path, before: tuple[Path | None, set[str]]) -> None:
    """Delete every file and folder that appeared since `_existing(root)` was taken."""
    missing, paths = before
    if missing is not None:
        shutil.rmtree(missing, ignore_errors=True)
        return
    created = [os.path.join(top, name) for top, dirs, files in os.walk(root) for name in dirs + files]
    for path in sorted(set(created) - paths, key=len, reverse=True):  # contents before their folders
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)


def _one_line(exc: BaseException) -> str:
    """Exception text squeezed onto one line (the CLI prints a single line)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _absent(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not p.is_file()]


def _check_labels(labels: np.ndarray, n_images: int, n_classes: int, path: Path, fix: str) -> None:
    """Catch files that parse but are not this dataset (wrong split, wrong label set)."""
    if labels.shape != (n_images,):
        raise UserError(f"{path} has {labels.size} labels for {n_images} images; {fix}")
    if n_images and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(
            f"{path} has labels outside 0..{n_classes - 1} "
            f"(found {labels.min()}..{labels.max()}); {fix}"
        )


# ---- CIFAR-10 / CIFAR-100 (python pickles) -------------------------------

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _CifarFormat:
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str


_CIFAR10 = _CifarFormat(
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    labels_key="labels",
    names_key="label_names",
)
_CIFAR100 = _CifarFormat(
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    labels_key="fine_labels",
    names_key="fine_label_names",
)


def _cifar_files(fmt: _CifarFormat, root: Path, train: bool) -> list[Path]:
    names = fmt.train_files if train else fmt.test_files
    return [root / fmt.folder / n for n in (*names, fmt.meta_file)]


def _cifar_fix(fmt: _CifarFormat, root: Path) -> str:
    return f"re-extract {fmt.archive} from {_CIFAR_URL} into {root}/"


def _unpickle(path: Path, fix: str) -> dict[str, object]:
    """Load a CIFAR pickle with str keys.

    The originals are Python 2 pickles: latin1 is what makes their numpy
    arrays loadable (as torchvision does), and turns their keys into str.
    Pickles written by Python 3 keep bytes keys, so those are decoded too.
    """
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    # Garbage can make the unpickler raise almost anything (EOFError,
    # UnpicklingError, ValueError, KeyError, ImportError, ...).
    except Exception as exc:
        raise UserError(f"cannot read {path}: not a valid CIFAR pickle ({_one_line(exc)}); {fix}") from exc
    if not isinstance(obj, dict):
        raise UserError(f"cannot read {path}: expected a pickled dict, got {type(obj).__name__}; {fix}")
    return {_text(k): v for k, v in obj.items()}


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _field(entry: dict[str, object], key: str, path: Path, fix: str) -> object:
    if key not in entry:
        raise UserError(f"cannot read {path}: no {key!r} entry (has {', '.join(sorted(entry))}); {fix}")
    return entry[key]


def _read_cifar_batch(path: Path, labels_key: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path, fix)
    data = np.asarray(_field(entry, "data", path, fix))
    labels = np.asarray(_field(entry, labels_key, path, fix), dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(
            f"cannot read {path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); {fix}"
        )
    # Rows are the red, green, blue 32x32 planes one after another (CHW).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _read_cifar(fmt: _CifarFormat, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    fix = _cifar_fix(fmt, root)
    meta_path = root / fmt.folder / fmt.meta_file
    names = _field(_unpickle(meta_path, fix), fmt.names_key, meta_path, fix)
    classes = [_text(n) for n in names]

    images, labels = [], []
    for path in _cifar_files(fmt, root, train)[:-1]:  # the last one is the meta file
        batch_images, batch_labels = _read_cifar_batch(path, fmt.labels_key, fix)
        _check_labels(batch_labels, len(batch_images), len(classes), path, fix)
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels), classes


def _cifar_source(title: str, fmt: _CifarFormat, tv_class: str) -> _Source:
    def layout(root: Path) -> str:
        if fmt is _CIFAR10:
            files = "{data_batch_1..5,test_batch,batches.meta}"
        else:
            files = "{" + ",".join((*fmt.train_files, *fmt.test_files, fmt.meta_file)) + "}"
        return f"{root}/{fmt.folder}/{files}"

    def download(root: Path, train: bool) -> None:
        getattr(torchvision.datasets, tv_class)(root=str(root), train=train, download=True)

    return _Source(
        title=title,
        layout=layout,
        where=lambda root: f"extract {fmt.archive} from {_CIFAR_URL} into {root}/",
        missing=lambda root, train: _absent(_cifar_files(fmt, root, train)),
        download=download,
        read=lambda root, train: _read_cifar(fmt, root, train),
    )


# ---- SVHN (MATLAB .mat) --------------------------------------------------

_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def _svhn_file(root: Path, train: bool) -> Path:
    return root / ("train_32x32.mat" if train else "test_32x32.mat")


def _read_svhn(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    path = _svhn_file(root, train)
    fix = f"download {path.name} again from {_SVHN_URL} into {root}/"
    try:
        import scipy.io  # only SVHN needs scipy
    except ImportError as exc:
        raise UserError("reading SVHN needs scipy, which is not installed: pip install scipy") from exc
    try:
        mat = scipy.io.loadmat(str(path))
    # scipy raises ValueError, TypeError, OSError, MatReadError... on bad files.
    except Exception as exc:
        raise UserError(f"cannot read {path}: not a valid SVHN .mat file ({_one_line(exc)}); {fix}") from exc

    if "X" not in mat or "y" not in mat:
        raise UserError(f"cannot read {path}: no 'X' and 'y' arrays in it; {fix}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise UserError(f"cannot read {path}: 'X' is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N); {fix}")

    images = x.transpose(3, 0, 1, 2)  # (H, W, C, N) -> (N, H, W, C)
    labels = y.astype(np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    _check_labels(labels, len(images), 10, path, fix)
    return images, labels, [str(d) for d in range(10)]


def _download_svhn(root: Path, train: bool) -> None:
    torchvision.datasets.SVHN(root=str(root), split="train" if train else "test", download=True)


_SVHN = _Source(
    title="SVHN",
    layout=lambda root: f"{root}/{{train_32x32.mat,test_32x32.mat}}",
    where=lambda root: f"download them from {_SVHN_URL} into {root}/",
    missing=lambda root, train: _absent([_svhn_file(root, train)]),
    download=_download_svhn,
    read=_read_svhn,
)


# ---- MNIST and Fashion-MNIST (IDX files, raw or gzipped) ------------------

_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class _IdxFormat:
    """An MNIST-style dataset: four IDX files, in torchvision's <root>/<folder>/raw/ or directly in <root>."""

    title: str
    folder: str  # torchvision's folder name (its dataset class name)
    url: str
    classes: tuple[str, ...]
    package: str | None = None  # a Debian package that installs the four files ...
    package_folder: str | None = None  # ... into this folder (a valid data.root as it is)


_MNIST_FORMAT = _IdxFormat(
    title="MNIST", folder="MNIST", url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    # torchvision's MNIST.classes, so names match checkpoints made with it.
    classes=tuple(f"{d} - {w}" for d, w in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))))
_FASHION_MNIST_FORMAT = _IdxFormat(
    title="Fashion-MNIST", folder="FashionMNIST", url="https://github.com/zalandoresearch/fashion-mnist",
    # The dataset's own label names (its README's table), as torchvision's FashionMNIST.classes lists them.
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
    package="dataset-fashion-mnist", package_folder="/usr/share/datasets/fashion-mnist")


def _idx_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _idx_file(folder: Path, name: str) -> Path:
    """The raw file if present, else its .gz (torchvision's download keeps both)."""
    raw = folder / name
    gz = raw.with_name(name + ".gz")
    return gz if not raw.is_file() and gz.is_file() else raw


def _idx_folder(fmt: _IdxFormat, root: Path, train: bool) -> Path:
    """torchvision's <root>/<folder>/raw/ unless only <root> itself holds the files (e.g. Debian's folder)."""
    layout = root / fmt.folder / "raw"
    if not _absent([_idx_file(layout, n) for n in _idx_names(train)]):
        return layout
    if not _absent([_idx_file(root, n) for n in _idx_names(train)]):
        return root
    return layout


def _idx_paths(fmt: _IdxFormat, root: Path, train: bool) -> list[Path]:
    folder = _idx_folder(fmt, root, train)
    return [_idx_file(folder, n) for n in _idx_names(train)]


def _read_idx(path: Path, fix: str) -> np.ndarray:
    """Parse an unsigned-byte IDX file: magic 00 00 08 <ndim>, big-endian uint32 dims, data."""
    try:
        data = path.read_bytes()
        # Sniff rather than trust the suffix: a gzipped file saved without
        # ".gz" is common after browser downloads. IDX files start with 00.
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: {_one_line(exc)}; {fix}") from exc

    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserError(f"cannot read {path}: bad IDX magic number (not an MNIST-style file); {fix}")
    if data[2] != _IDX_UBYTE:
        raise UserError(f"cannot read {path}: IDX data type 0x{data[2]:02x}, expected unsigned bytes (0x08); {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"cannot read {path}: truncated IDX header; {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise UserError(
            f"cannot read {path}: IDX header says {dims} ({expected} bytes) but it holds "
            f"{len(data) - header} bytes (truncated?); {fix}"
        )
    # A writable copy: torch warns about (and must not write into) the read-only bytes buffer.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_where(fmt: _IdxFormat, root: Path) -> str:
    where = f"download the .gz files from {fmt.url} into {root}/{fmt.folder}/raw/"
    if fmt.package:
        where += f", or on Debian/Ubuntu `apt-get install {fmt.package}` and set data.root={fmt.package_folder}"
    return where


def _read_idx_dataset(fmt: _IdxFormat, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    image_path, label_path = _idx_paths(fmt, root, train)
    fix = f"get {image_path.name} and {label_path.name} again ({_idx_where(fmt, root)})"
    gray = _read_idx(image_path, fix)
    labels = _read_idx(label_path, fix).astype(np.int64)
    if gray.ndim != 3:
        raise UserError(f"cannot read {image_path}: IDX has shape {gray.shape}, expected (N, 28, 28) images; {fix}")
    if labels.ndim != 1:
        raise UserError(f"cannot read {label_path}: IDX has shape {labels.shape}, expected (N,) labels; {fix}")
    _check_labels(labels, len(gray), len(fmt.classes), label_path, fix)
    return gray[..., None], labels, list(fmt.classes)  # one (grey) channel


def _idx_source(fmt: _IdxFormat, tv_class: str) -> _Source:
    def download(root: Path, train: bool) -> None:
        getattr(torchvision.datasets, tv_class)(root=str(root), train=train, download=True)

    return _Source(
        title=fmt.title,
        layout=lambda root: (
            f"{root}/{fmt.folder}/raw/{{train-images-idx3-ubyte,train-labels-idx1-ubyte,"
            f"t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}} (or the same names with .gz, "
            f"or the four files directly in {root}/)"
        ),
        where=lambda root: _idx_where(fmt, root),
        missing=lambda root, train: _absent(_idx_paths(fmt, root, train)),
        download=download,
        read=lambda root, train: _read_idx_dataset(fmt, root, train),
    )


_SOURCES: dict[str, _Source] = {
    "cifar10": _cifar_source("CIFAR-10", _CIFAR10, "CIFAR10"),
    "cifar100": _cifar_source("CIFAR-100", _CIFAR100, "CIFAR100"),
    "svhn": _SVHN,
    "mnist": _idx_source(_MNIST_FORMAT, "MNIST"),
    "fashion_mnist": _idx_source(_FASHION_MNIST_FORMAT, "FashionMNIST"),
}
assert tuple(_SOURCES) == IN_MEMORY


# --------------------------------------------------------------------------
# Image folders (ImageNet / Tiny-ImageNet layout)
# --------------------------------------------------------------------------

_IMAGEFOLDER_LAYOUT = "<root>/train/<class>/<images> and <root>/val/<class>/<images>"


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit (and 32-bit integer or float) greyscale is scaled, where Pillow's convert saturates it."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values / 65535.0
        elif image.mode == "I":
            values = values / 255.0
        grey = np.clip(np.nan_to_num(values) * 255.0 + 0.5, 0, 255).astype(np.uint8)  # "F": values in [0, 1]
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; a file PIL cannot decode is the user's to fix."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)  # decodes now, while the file is open
    except UnidentifiedImageError as exc:  # its own text repeats the path
        raise UserError(
            f"cannot decode image {path}: not an image format PIL knows; remove or replace the file"
        ) from exc
    # "image file is truncated" is an OSError; malformed headers can raise
    # SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {_one_line(exc)}; remove or replace the file") from exc


def _class_folders(directory: Path) -> list[str]:
    """Sorted class subfolders; hidden ones (.ipynb_checkpoints, ...) are not classes."""
    return sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )


class _ClassFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose class-to-index mapping is given (the train folder's),
    so train and val agree even when val lacks some classes."""

    def __init__(self, root: Path, classes: list[str], transform, allow_empty: bool) -> None:
        self._given_classes = classes  # read by find_classes during super().__init__
        super().__init__(str(root), transform=transform, loader=_load_rgb, allow_empty=allow_empty)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._given_classes), {c: i for i, c in enumerate(self._given_classes)}


def imagefolder_dataset(root: str | Path, train: bool, transform) -> torch.utils.data.Dataset:
    """train=True reads <root>/train, else <root>/val; labels index the sorted train classes."""
    root = Path(root)
    train_dir, split_dir = root / "train", root / ("train" if train else "val")
    for directory in (train_dir, split_dir):
        if not directory.is_dir():
            raise UserError(
                f"image folder not found: {directory} does not exist; expected {_IMAGEFOLDER_LAYOUT} "
                f"with root={root} (check data.root)"
            )

    classes = _class_folders(train_dir)
    if not classes:
        raise UserError(f"no class folders in {train_dir}: expected {train_dir}/<class>/<images>")
    if not train:
        unknown = sorted(set(_class_folders(split_dir)) - set(classes))
        if unknown:
            raise UserError(
                f"{split_dir} has class folders that {train_dir} lacks: {', '.join(unknown[:5])}"
                f"{' ...' if len(unknown) > 5 else ''}; val classes must be train classes - rename or remove "
                f"them (Tiny-ImageNet's val/images + val_annotations.txt must first be sorted into val/<class>/)"
            )

    try:
        # val may be a subset of the classes; every train class needs images.
        dataset = _ClassFolder(split_dir, classes, transform, allow_empty=not train)
    except FileNotFoundError as exc:  # "Found no valid file for the classes ..."
        raise UserError(f"bad image folder {split_dir}: {_one_line(exc)}; add images or remove those folders") from exc
    if len(dataset) == 0:
        raise UserError(f"no images in {split_dir}: expected {split_dir}/<class>/<images>")
    return dataset


def imagefolder_transform(
    train: bool,
    image_size: int,
    mean,
    std,
    random_resized_crop: bool = True,
    hflip: bool = True,
    augment=None,
):
    """PIL image -> normalized float tensor (3, image_size, image_size).

    Eval is the standard ImageNet protocol (resize the short side to
    image_size / 0.875, center-crop). Training without random_resized_crop
    takes random crops at that same scale, so train and eval see objects at
    the same size. `augment` (the `data.augment` config) adds its policy
    after the flip and random erasing after normalisation, as torchvision
    implements them.
    """
    resize = round(image_size / EVAL_CROP_FRACTION)
    if not train:
        steps = [T.Resize(resize), T.CenterCrop(image_size)]
    elif random_resized_crop:
        steps = [T.RandomResizedCrop(image_size)]
    else:
        steps = [T.Resize(resize), T.RandomCrop(image_size)]
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    if train and augment is not None and augment.policy == "autoaugment":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy(augment.autoaugment_policy)))
    elif train and augment is not None and augment.policy == "randaugment":
        steps.append(T.RandAugment(augment.randaugment_ops, augment.randaugment_magnitude))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and augment is not None and augment.erase_prob > 0:
        if augment.erase_aspect != "log_uniform" or augment.erase_attempts != 10:
            raise UserError("data.augment.erase_aspect and erase_attempts other than log_uniform / 10 are implemented "
                            "for in-memory datasets only; image folders use torchvision's RandomErasing")
        aspect = augment.erase_min_aspect
        value = {"random": "random", "zero": 0, "unnormalized_mean": tuple(mean)}[augment.erase_value]
        steps.append(T.RandomErasing(augment.erase_prob, scale=tuple(augment.erase_area), ratio=(aspect, 1 / aspect),
                                     value=value))
    return T.Compose(steps)
