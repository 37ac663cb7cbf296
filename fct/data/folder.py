"""Images stored as ROOT/<class>/<image> files (ImageNet, Places365, VGGFace2 layouts)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fct.data.base import ImageSource
from fct.errors import FCTError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"})


class ImageFolderSource(ImageSource):
    """Images in ``root/<class_dir>/<image>``, decoded on demand to RGB ``image_size`` squares.

    Classes are the sorted class directory names (the standard ImageNet synset order gives the
    0..999 index), unless ``classes`` lists the class directories (relative to ``root``, may be
    nested like ``a/airfield``) in label order. Each image is resized so its shorter side is
    ``image_size / crop_fraction`` and then center-cropped to ``image_size``, for train and test
    alike: training augmentation is done batch-wise by ``fct.data.augment``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str,
        image_size: int = 224,
        *,
        crop_fraction: float = 0.875,
        classes: Sequence[str] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.root = Path(root).expanduser()
        layout = f"expected {self.root}/<class>/<image>.JPEG (e.g. ROOT/train/n01440764/x.JPEG)"
        if not self.root.is_dir():
            raise FCTError(f"image folder {self.root} does not exist; {layout}")
        class_dirs = list(classes) if classes is not None else _class_dirs(self.root, layout)
        paths, labels = _scan(self.root, class_dirs, layout)
        self._setup(name, paths, labels, class_dirs, image_size, crop_fraction, mean, std)

    def _setup(
        self,
        name: str,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        image_size: int,
        crop_fraction: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        """Everything but the folder scan: shared with sources listing their files otherwise."""
        # Relative paths in one fixed-width bytes array: compact for millions of files, and
        # no per-item Python objects whose refcounts would copy memory into every worker.
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=bytes)
        self.crop_fraction = crop_fraction
        self.resize_size = max(image_size, round(image_size / crop_fraction))
        super().__init__(
            name=name,
            labels=labels,
            num_classes=len(class_names),
            channels=3,
            image_size=image_size,
            mean=mean,
            std=std,
            images=None,
            class_names=class_names,
        )

    def _resize(self, size: int) -> None:
        self.resize_size = max(size, round(size / self.crop_fraction))

    def path(self, i: int) -> Path:
        """The file of item ``i``."""
        return self.root / os.fsdecode(self.paths[i])

    def _read(self, i: int) -> torch.Tensor:
        """Decode item ``i`` to uint8 [3, image_size, image_size]."""
        from PIL import Image

        path = self.path(i)
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise FCTError(f"cannot decode image {path} ({e}); remove or replace the file") from e
        square = resize_center_crop(rgb, self.resize_size, self.image_size)
        return torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def _take(self, idx: np.ndarray) -> None:
        self.paths = self.paths[idx]


def resize_center_crop(image: PILImage, resize_size: int, crop_size: int) -> PILImage:
    """Resize a PIL image so its shorter side is ``resize_size``, then center-crop a square."""
    from PIL import Image

    w, h = image.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(crop_size, round(w * scale)), max(crop_size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = round((new_w - crop_size) / 2), round((new_h - crop_size) / 2)
    return image.crop((left, top, left + crop_size, top + crop_size))


def _class_dirs(root: Path, layout: str) -> list[str]:
    """Sorted names of the subdirectories of ``root``; none at all raises FCTError."""
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise FCTError(f"{root} has no class subfolders; {layout}")
    return names


def _scan(root: Path, class_dirs: Sequence[str], layout: str) -> tuple[list[str], np.ndarray]:
    """Relative image paths (sorted within each class) and their labels."""
    paths: list[str] = []
    counts = []
    for cls in class_dirs:
        folder = root / cls
        if not folder.is_dir():
            raise FCTError(f"class folder {folder} does not exist; {layout}")
        found = sorted(_images_under(folder))
        paths.extend(os.path.relpath(p, root) for p in found)
        counts.append(len(found))
    if not paths:
        raise FCTError(f"{root} has class folders but no images; {layout}")
    return paths, np.repeat(np.arange(len(class_dirs)), counts)


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere below ``folder`` (by extension, case-insensitive)."""
    found = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        found.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return found
