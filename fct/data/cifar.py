"""CIFAR-100 from torchvision's on-disk layout, read with a pickle loader that runs no code."""

from __future__ import annotations

import _codecs
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct.data.base import (
    DATASETS,
    ImageSource,
    check_split,
    search_bases,
    torchvision_download,
)
from fct.errors import FCTError

FOLDER = "cifar-100-python"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
LAYOUT = f"expected DIR/{FOLDER}/{{train,test,meta}} (torchvision's CIFAR100 layout)"

# The only globals a CIFAR pickle needs: numpy's array reconstruction (the 'data' entry) and
# the byte-string encoder Python 3 uses in protocol-2 pickles. Anything else is refused, so a
# tampered file cannot import modules or call functions such as os.system.
# numpy moved _reconstruct from numpy.core to numpy._core in 2.0; ask numpy for it instead.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the whitelisted globals above."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle a CIFAR-style file (plain containers and numpy arrays only).

    Keys are decoded as latin1 like torchvision does, so Python 2 str keys come back as str.
    Anything that is not plain data, or a truncated file, raises FCTError naming the file.
    """
    try:
        with open(path, "rb") as fh:
            return _SafeUnpickler(fh, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise FCTError(
            f"{path} is not a plain CIFAR data file ({e}); delete it and get it again"
        ) from e
    except (EOFError, ValueError, TypeError, OSError) as e:
        raise FCTError(f"{path} is corrupt or unreadable ({e}); delete it and get it again") from e


def _str_keys(entry: Any, path: Path) -> dict[str, Any]:
    """The entry with str keys (files unpickled with encoding='bytes' have bytes keys)."""
    if not isinstance(entry, dict):
        raise FCTError(
            f"{path} holds a {type(entry).__name__}, not a dict; delete it and get it again"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def find_cifar100(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The ``cifar-100-python`` folder: under root, ``$FCT_DATA`` or the download cache."""
    looked = []
    for base in search_bases(root):
        # DIR/cifar100/ lets one data root hold every dataset, as for the other datasets.
        for folder in (base / FOLDER, base / "cifar100" / FOLDER, base):
            if (folder / "train").is_file() and (folder / "test").is_file():
                return folder
            looked.append(str(folder))
    if download:
        return _download(root)
    raise FCTError(
        f"CIFAR-100 not found; looked in: {', '.join(looked)}; {LAYOUT}. Pass --data-root DIR "
        "or --download"
    )


def _download(root: str | os.PathLike[str] | None) -> Path:
    """Download through torchvision, which unpacks into DIR/cifar-100-python."""
    from torchvision.datasets import CIFAR100

    return torchvision_download(CIFAR100, "CIFAR-100", root, LAYOUT) / FOLDER


def _class_names(folder: Path) -> tuple[str, ...] | None:
    """Fine label names from ``meta`` when present (they are informative, not required)."""
    if not (folder / "meta").is_file():
        return None
    meta = _str_keys(safe_load_pickle(folder / "meta"), folder / "meta")
    names = meta.get("fine_label_names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names) if names else None


@DATASETS.register("cifar100")
def load_cifar100(split: str, root: str | None = None, download: bool = False) -> ImageSource:
    """CIFAR-100 ``split`` with fine labels: 32x32 RGB, 100 classes, 50000 train / 10000 test."""
    check_split(split)
    folder = find_cifar100(root, download)
    path = folder / split
    entry = _str_keys(safe_load_pickle(path), path)
    try:
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    except (KeyError, ValueError) as e:
        raise FCTError(f"{path} lacks CIFAR-100 'data'/'fine_labels' ({e}); {LAYOUT}") from e
    if len(data) != len(labels) or (len(labels) and (labels.min() < 0 or labels.max() > 99)):
        raise FCTError(f"{path} has inconsistent data and fine_labels; delete it and get it again")
    return ImageSource(
        name="cifar100",
        labels=labels,
        num_classes=100,
        channels=3,
        image_size=32,
        mean=MEAN,
        std=STD,
        images=torch.from_numpy(np.ascontiguousarray(data)),
        class_names=_class_names(folder),
    )
