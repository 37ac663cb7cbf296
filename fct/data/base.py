"""Labeled image sources, the dataset registry, class subsets and where data is looked for."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct.errors import FCTError
from fct.registry import Registry

SPLITS = ("train", "test")

# Where `download=True` puts data when no root is given, and where later runs look for it.
DOWNLOAD_DIR = Path("~/.cache/fct/data")


class ImageSource:
    """A labeled image collection: uint8 images [C,H,W] with int labels, plus metadata.

    In-memory datasets hold every image in ``images`` (uint8 [N,C,H,W]) so loaders can slice
    whole batches at once; folder datasets leave it ``None`` and subclass ``_read``.

    Attributes:
        name: dataset name (the registry key).
        labels: int64 [N], the dataset's original numeric labels (never remapped by subsets).
        num_classes: classes in the full dataset, not only those present after a subset.
        channels: 1 or 3.
        image_size: side length of the square images returned by ``__getitem__``.
        mean, std: per-channel normalisation constants for images scaled to [0, 1].
        images: uint8 [N,C,H,W] for in-memory data, else None.
        class_names: optional names indexed by label.
    """

    def __init__(
        self,
        name: str,
        labels: np.ndarray | Sequence[int],
        num_classes: int,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        images: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.name = name
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.images = images
        self.class_names = tuple(class_names) if class_names is not None else None
        self._check()

    def _check(self) -> None:
        """Catch inconsistent metadata at construction rather than deep inside training."""
        if self.labels.ndim != 1:
            raise ValueError(f"{self.name}: labels must be 1-D, got shape {self.labels.shape}")
        if self.channels not in (1, 3):
            raise ValueError(f"{self.name}: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels outside 0..{self.num_classes - 1}")
        if self.images is not None:
            want = (len(self.labels), self.channels, self.image_size, self.image_size)
            if self.images.dtype != torch.uint8 or tuple(self.images.shape) != want:
                raise ValueError(
                    f"{self.name}: images must be uint8 {want}, got "
                    f"{self.images.dtype} {tuple(self.images.shape)}"
                )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` as uint8 [C,H,W] and its label."""
        image = self.images[i] if self.images is not None else self._read(i)
        return image, int(self.labels[i])

    def _read(self, i: int) -> torch.Tensor:
        """Decode item ``i``; only sources without in-memory ``images`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no images to read")

    def subset(self, indices: np.ndarray | Sequence[int] | torch.Tensor) -> ImageSource:
        """A source restricted to ``indices`` (in that order), with the same metadata."""
        idx = np.asarray(indices).reshape(-1)
        # A boolean mask would otherwise be read as the indices 0 and 1.
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
        out = copy.copy(self)
        out.labels = self.labels[idx]
        if self.images is not None:
            # A contiguous copy keeps batch slicing in the loader a single fast gather.
            out.images = self.images[torch.from_numpy(idx)].contiguous()
        out._take(idx)
        return out

    def resized(self, size: int) -> ImageSource:
        """The same items as ``size`` x ``size`` images (a copy; ``self`` is unchanged).

        In-memory images are resized once here (bilinear, antialiased); folder sources decode
        straight to the new size.
        """
        if size == self.image_size:
            return self
        out = copy.copy(self)
        out.image_size = int(size)
        if self.images is not None:
            x = torch.nn.functional.interpolate(
                self.images.float(),
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            out.images = x.round_().clamp_(0, 255).to(torch.uint8).contiguous()
        out._resize(int(size))
        return out

    def _resize(self, size: int) -> None:
        """Hook for subclasses that decode on demand (e.g. folder sources)."""

    def _take(self, idx: np.ndarray) -> None:
        """Hook for subclasses to restrict their own per-item arrays (e.g. file paths)."""

    def class_counts(self) -> np.ndarray:
        """Number of items per label, int64 [num_classes]."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        present = len(np.unique(self.labels))
        size = f"{self.channels}x{self.image_size}x{self.image_size}"
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, classes={present}/{self.num_classes}, {size})"


DatasetFn = Callable[[str, "str | None", bool], ImageSource]

DATASETS: Registry[DatasetFn] = Registry("dataset", hint="fct list datasets")


def check_split(split: str) -> None:
    """Raise FCTError unless ``split`` is 'train' or 'test'."""
    if split not in SPLITS:
        raise FCTError(f"unknown split '{split}'; use 'train' or 'test'")


def subset_classes(
    source: ImageSource,
    classes: Sequence[int] | None = None,
    max_per_class: int | None = None,
) -> ImageSource:
    """Keep labels in the half-open range ``classes`` = (lo, hi), at most ``max_per_class`` each.

    Labels keep their original values so that models trained on different subsets agree on
    class ids. The first items in index order are kept, so the result is deterministic.
    """
    keep = np.ones(len(source), dtype=bool)
    if classes is not None:
        lo, hi = _class_range(source, classes)
        keep &= (source.labels >= lo) & (source.labels < hi)
    if max_per_class is not None:
        if int(max_per_class) < 1:
            raise FCTError(f"max_per_class must be at least 1, got {max_per_class}")
        keep &= _rank_within_class(source.labels) < int(max_per_class)
    if keep.all():
        return source
    if not keep.any():
        raise FCTError(
            f"class subset {classes} of dataset {source.name} has no images; check the range"
        )
    return source.subset(np.flatnonzero(keep))


def _class_range(source: ImageSource, classes: Sequence[int]) -> tuple[int, int]:
    """Validate a (lo, hi) half-open class range against the dataset's class count."""
    if len(classes) != 2:
        raise FCTError(f"classes must be a (lo, hi) range, got {classes!r}")
    lo, hi = int(classes[0]), int(classes[1])
    if lo < 0 or hi <= lo:
        raise FCTError(f"class range ({lo}, {hi}) is empty or negative; use 0 <= lo < hi")
    if hi > source.num_classes:
        raise FCTError(
            f"class subset {lo}..{hi - 1} is larger than dataset {source.name} with "
            f"{source.num_classes} classes; use a range within 0..{source.num_classes - 1}"
        )
    return lo, hi


def _rank_within_class(labels: np.ndarray) -> np.ndarray:
    """For each item, how many items of the same label come before it (0 for the first)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - group_start
    return rank


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    classes: Sequence[int] | None = None,
    max_per_class: int | None = None,
    download: bool = False,
) -> ImageSource:
    """Load a registered dataset split, optionally restricted to a class range and per-class cap."""
    check_split(split)
    fn = DATASETS.get(name)
    source = fn(split, None if root is None else str(root), download)
    return subset_classes(source, classes, max_per_class)


def search_bases(root: str | os.PathLike[str] | None) -> list[Path]:
    """Base folders to look for data in, in order: ``root``, ``$FCT_DATA``, the download cache."""
    bases = [Path(root).expanduser()] if root else []
    if os.environ.get("FCT_DATA"):
        bases.append(Path(os.environ["FCT_DATA"]).expanduser())
    bases.append(download_dir(None))
    return bases


def download_dir(root: str | os.PathLike[str] | None) -> Path:
    """Where ``download=True`` stores data: ``root`` if given, else ``~/.cache/fct/data``."""
    return Path(root).expanduser() if root else DOWNLOAD_DIR.expanduser()


def read_data_file(path: str | os.PathLike[str], max_bytes: int, fix: str) -> bytes:
    """The bytes of the dataset file ``path``, only if it is a regular file of at most
    ``max_bytes``; anything else raises FCTError ending in ``fix``.

    A FIFO in a file's place is refused instead of hanging the run; symlinks are followed
    (datasets are often linked in from shared storage). See ``fct.io.read_regular_bytes``.
    """
    from fct.io import read_regular_bytes

    return read_regular_bytes(path, max_bytes, "file", fix, follow_symlinks=True)


#: Seconds a stalled download connection may stay silent before it gives up.
DOWNLOAD_TIMEOUT_S = 30.0


def short_error(error: BaseException, limit: int = 240) -> str:
    """An exception as one short line: torchvision's download error spans lines ("Error
    downloading F:", then "Tried MIRROR, got:" and the cause per mirror); keep the first line
    and the last cause."""
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    lines = [line for line in lines if line] or [type(error).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def torchvision_download(
    dataset: Callable[..., Any],
    label: str,
    root: str | os.PathLike[str] | None,
    hint: str,
    target: Path | None = None,
    check: Callable[[], str | None] | None = None,
    fills: Path | None = None,
) -> Path:
    """Download a dataset through its torchvision class (train split; torchvision fetches the
    archive holding both splits) into ``target`` (default ``download_dir(root)``); return it.

    A stalled connection gives up after DOWNLOAD_TIMEOUT_S; ``check()`` may name what the
    download failed to leave. Any failure (network, disk, a bad archive) removes the empty
    folders the attempt created, down to ``fills`` (the folder torchvision writes into, under
    ``target``), and is one FCTError line naming the folder, the error and ``hint``.
    """
    target = target or download_dir(root)
    leaf = fills or target
    created = [p for p in (leaf, *leaf.parents) if not p.exists()][::-1]  # outermost first
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        dataset(str(target), train=True, download=True)
        problem = check() if check is not None else None
        if problem:
            raise RuntimeError(problem)
    except Exception as e:  # network, disk and archive errors come in many types
        for folder in reversed(created):  # leave no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise FCTError(
            f"downloading {label} into {target} failed ({short_error(e)}); {hint}"
        ) from e
    finally:
        socket.setdefaulttimeout(before)
    return target
