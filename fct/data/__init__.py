"""Datasets, class subsets, batch loaders and batch-wise augmentation.

``DATASETS`` maps a name to a loader function ``fn(split, root, download) -> ImageSource``;
``load_dataset`` adds class-range and per-class subsetting on top. Every built-in dataset module
is imported here so that no registered name depends on import order.
"""

from fct.data import cifar, fashion_mnist, folders, synthetic  # noqa: F401  (they fill DATASETS)
from fct.data.base import DATASETS, ImageSource, load_dataset, subset_classes
from fct.data.fashion_mnist import find_fashion_mnist
from fct.data.folder import ImageFolderSource
from fct.data.folders import ImageListSource
from fct.data.loader import BatchLoader, make_loader
from fct.data.synthetic import make_synthetic, synthetic_loader

__all__ = [
    "DATASETS",
    "BatchLoader",
    "ImageFolderSource",
    "ImageListSource",
    "ImageSource",
    "find_fashion_mnist",
    "load_dataset",
    "make_loader",
    "make_synthetic",
    "subset_classes",
    "synthetic_loader",
]
