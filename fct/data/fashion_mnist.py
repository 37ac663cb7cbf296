"""Fashion-MNIST from its IDX files (gzipped or not), found on disk or else downloaded.

When no copy is found, the loader tries torchvision's download by itself (with its progress
bar) into the data root: ``--data-root``, else ``$FCT_DATA``, else ``~/.cache/fct/data``.
``FCT_NO_DOWNLOAD=1`` turns that automatic attempt off (``--download`` still downloads).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from fct.data.base import (
    DATASETS,
    ImageSource,
    check_split,
    download_dir,
    read_data_file,
    search_bases,
    torchvision_download,
)
from fct.errors import FCTError

log = logging.getLogger(__name__)

# The Debian/Ubuntu package dataset-fashion-mnist installs the four .gz files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Layouts inside a base folder: the files directly, torchvision's, and our own.
SUBDIRS = ("", "FashionMNIST/raw", "fashion_mnist")

PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MEAN, STD = (0.2860,), (0.3530,)
#: The largest IDX file, train images, is 47 MB (60,000 x 28 x 28 bytes and a header).
MAX_IDX_BYTES = 64 << 20
HOW_TO_GET = (
    "get it with `apt-get install dataset-fashion-mnist`, or pass --data-root DIR with the "
    "IDX files, or --download"
)
#: What to do when a download failed (no network, a full disk, a mirror down).
AFTER_FAILED_DOWNLOAD = (
    "get it with `apt-get install dataset-fashion-mnist`, or pass --data-root DIR with the "
    "four IDX files (train-images-idx3-ubyte.gz, ...)"
)
#: Set to 1 (true, yes, on) to turn off the automatic download of a missing Fashion-MNIST.
NO_DOWNLOAD_ENV = "FCT_NO_DOWNLOAD"
#: Download folders whose attempt failed in this process: not tried again (one wait only).
_FAILED: dict[Path, str] = {}


def _stems(split: str) -> tuple[str, str]:
    """File names (without .gz) of a split's images and labels."""
    p = PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (plain first: it reads faster)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing_files(folder: Path) -> list[str]:
    """Names of the four IDX files that ``folder`` lacks (all of them if it does not exist)."""
    stems = [*_stems("train"), *_stems("test")]
    return [s for s in stems if _find_file(folder, s) is None]


def _candidates(root: str | os.PathLike[str] | None) -> list[Path]:
    """Folders to search, in order: root, $FCT_DATA, the Debian package, the download cache."""
    *user_bases, cache = search_bases(root)
    folders = [base / sub if sub else base for base in user_bases for sub in SUBDIRS]
    folders.append(DEBIAN_FASHION_MNIST)
    folders.extend(cache / sub for sub in SUBDIRS[1:])
    return folders


def auto_download() -> bool:
    """Whether a missing Fashion-MNIST is downloaded without ``--download``: yes, unless
    ``$FCT_NO_DOWNLOAD`` is set to 1, true, yes or on."""
    return os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def download_target(root: str | os.PathLike[str] | None) -> Path:
    """Where a download goes: ``root`` (--data-root), else ``$FCT_DATA``, else
    ``~/.cache/fct/data``; the files land in its ``FashionMNIST/raw``, searched next time."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("FCT_DATA"):
        return Path(os.environ["FCT_DATA"]).expanduser()
    return download_dir(None)


def find_fashion_mnist(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The folder holding the four Fashion-MNIST IDX files.

    Looks in ``root`` (and root/FashionMNIST/raw, root/fashion_mnist), then ``$FCT_DATA`` (same
    sub-paths), the Debian package folder, and the download cache. When nothing is found it
    downloads through torchvision into ``download_target(root)``: always with
    ``download=True``, and by default without it too, unless ``$FCT_NO_DOWNLOAD`` is set.
    A failed download raises one FCTError line naming the apt package, --data-root and the
    download's error.
    """
    looked = []
    for folder in _candidates(root):
        missing = _missing_files(folder)
        if not missing:
            return folder
        why = "missing" if not folder.is_dir() else f"lacks {', '.join(missing)}"
        looked.append(f"{folder} ({why})")
    if download or auto_download():
        return _download(root, looked, asked=download)
    raise FCTError(
        f"Fashion-MNIST not found; looked in: {'; '.join(looked)}. {HOW_TO_GET} "
        f"(the automatic download is off: {NO_DOWNLOAD_ENV} is set)"
    )


def _download(root: str | os.PathLike[str] | None, looked: list[str], asked: bool) -> Path:
    """Download through torchvision (with its progress bar); its files land in
    TARGET/FashionMNIST/raw. A failure is one FCTError line, remembered for this process so
    that the next split asked for does not wait on the network again."""
    import torchvision.datasets

    target = download_target(root)
    raw = target / "FashionMNIST" / "raw"
    if target in _FAILED and not asked:
        raise FCTError(_FAILED[target])
    how = "--download" if asked else f"not found locally; set {NO_DOWNLOAD_ENV}=1 to skip this"
    log.info("Fashion-MNIST: downloading it with torchvision into %s (%s)", raw, how)

    def check() -> str | None:
        missing = _missing_files(raw)
        return f"the download left no {', '.join(missing)} in {raw}" if missing else None

    hint = f"{AFTER_FAILED_DOWNLOAD}. Not found in: {'; '.join(looked)}"
    try:
        torchvision_download(
            torchvision.datasets.FashionMNIST, "Fashion-MNIST", root, hint, target, check, raw
        )
    except FCTError as e:
        _FAILED[target] = str(e)
        raise
    _FAILED.pop(target, None)
    return raw


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it ends in .gz; unreadable files raise FCTError.

    Bounded both ways by MAX_IDX_BYTES: a regular file only, and at most that much once
    gunzipped, so a small .gz that would expand to gigabytes is refused after reading that much.
    """
    fix = "delete it and get it again"
    raw = read_data_file(path, MAX_IDX_BYTES, fix)
    if path.suffix != ".gz":
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as fh:
            data = fh.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise FCTError(f"{path} is corrupt or unreadable ({e}); {fix}") from e
    if len(data) > MAX_IDX_BYTES:
        raise FCTError(
            f"{path} expands to more than {MAX_IDX_BYTES} bytes, more than any IDX file of this "
            f"dataset; {fix}"
        )
    return data


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file with ``ndim`` dimensions (1: labels, 3: images).

    The magic number and the data length are checked against the header, so a truncated
    or wrong file raises FCTError naming it instead of yielding garbage.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    fix = "delete it and get it again"
    magic = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and magic != 0x0800 + ndim:  # 0x08 = unsigned byte data
        raise FCTError(f"{path} is not a {ndim}-D uint8 IDX file (magic {magic:#x}); {fix}")
    if len(raw) < header:
        raise FCTError(f"{path} is truncated ({len(raw)} bytes, no full IDX header); {fix}")
    dims = [int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise FCTError(
            f"{path} is truncated or corrupt: header says {expected} data bytes, found "
            f"{len(raw) - header}; {fix}"
        )
    # bytearray makes the array writable, which torch.from_numpy needs.
    return np.frombuffer(bytearray(raw[header:]), np.uint8).reshape(dims)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(split: str, root: str | None = None, download: bool = False) -> ImageSource:
    """Fashion-MNIST ``split``: 28x28 grayscale, 10 classes, 60000 train / 10000 test."""
    check_split(split)
    folder = find_fashion_mnist(root, download)
    image_stem, label_stem = _stems(split)
    image_path, label_path = _find_file(folder, image_stem), _find_file(folder, label_stem)
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1).astype(np.int64)
    if len(images) != len(labels) or (len(labels) and labels.max() >= len(CLASS_NAMES)):
        raise FCTError(
            f"{image_path} and {label_path} do not match (counts {len(images)} vs {len(labels)}, "
            "or labels beyond 0..9); delete them and get them again"
        )
    return ImageSource(
        name="fashion_mnist",
        labels=labels,
        num_classes=len(CLASS_NAMES),
        channels=1,
        image_size=images.shape[-1],
        mean=MEAN,
        std=STD,
        images=torch.from_numpy(images).unsqueeze(1),
        class_names=CLASS_NAMES,
    )
