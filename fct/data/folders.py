"""ImageNet, Places365 and VGGFace2 read from the layouts people keep them in on disk.

None of them can be downloaded by the tool (they need a licence or are very large), so each is
looked for, in order, in ``DATA_ROOT/<name>``, ``DATA_ROOT`` (from ``--data-root``) and
``$FCT_DATA/<name>``; a miss raises one FCTError listing those places and the expected layout.

Images are decoded on demand by ``ImageFolderSource`` (resize the shorter side to
``image_size / 0.875``, center-crop ``image_size``) for train and test alike; training
augmentation happens batch-wise in the loader. Split ``"test"`` is the labeled validation set
for ImageNet and Places365, and VGGFace2's test identities (a label space of its own).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fct.data.base import DATASETS, ImageSource, check_split
from fct.data.folder import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageFolderSource
from fct.errors import FCTError

# Default square sizes: the usual 224 for ImageNet and Places365 (Places "small" images are
# 256x256: resized to 256 and center-cropped to 224), 112 for face crops (the common face
# recognition input size; VGGFace2's loose crops are resized to 128 and center-cropped).
IMAGE_SIZE = {"imagenet": 224, "places365": 224, "vggface2": 112}

IMAGENET_LAYOUT = (
    "expected ROOT/train/<synset>/*.JPEG and ROOT/val/<synset>/*.JPEG (or a flat ROOT/val/ "
    "with ROOT/LOC_val_solution.csv or ROOT/val_labels.txt)"
)
# Kaggle's ImageNet download keeps the images here and LOC_val_solution.csv at its top level.
KAGGLE_SUBDIR = Path("ILSVRC", "Data", "CLS-LOC")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")

PLACES_CATEGORIES = "categories_places365.txt"
# torchvision's Places365(small=True) file lists and image folders for each of our splits.
PLACES_LISTS = {
    "train": ("places365_train_standard.txt", "data_256_standard"),
    "test": ("places365_val.txt", "val_256"),
}
PLACES_LAYOUT = (
    "expected ROOT/places365_standard/{train,val}/<category>/*.jpg (category folders may be "
    "nested, e.g. a/airfield) or torchvision's Places365(small=True) files: "
    f"ROOT/{PLACES_CATEGORIES}, {PLACES_LISTS['train'][0]} with {PLACES_LISTS['train'][1]}/, "
    f"{PLACES_LISTS['test'][0]} with {PLACES_LISTS['test'][1]}/"
)

VGGFACE2_LAYOUT = (
    "expected ROOT/train/<identity>/*.jpg and ROOT/test/<identity>/*.jpg "
    "(e.g. ROOT/train/n000002/0001_01.jpg)"
)


class ImageListSource(ImageFolderSource):
    """Images named by an explicit list of relative paths and labels under ``root``.

    For layouts whose labels come from a file rather than from class folders (a flat ImageNet
    val/ with a label file, torchvision's Places365 file lists). It shares decoding, resizing
    and subsetting with ``ImageFolderSource`` and only skips its folder scan.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        name: str,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        image_size: int = 224,
        *,
        crop_fraction: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
        self.root = Path(root).expanduser()
        self._setup(name, paths, labels, class_names, image_size, crop_fraction, mean, std)


# --- finding a dataset ------------------------------------------------------------------------


def find_dataset_root(
    name: str,
    root: str | os.PathLike[str] | None,
    is_root: Callable[[Path], bool],
    layout: str,
    download: bool = False,
) -> Path:
    """The first of ``root/name``, ``root``, ``$FCT_DATA/name`` for which ``is_root`` holds.

    ``root/name`` comes before ``root`` so that one --data-root can hold several datasets
    without, say, an ImageNet train/ at its top being taken for VGGFace2's.
    """
    looked = []
    if root:
        base = Path(root).expanduser()
        looked += [(base / name, str(base / name)), (base, str(base))]
    env = os.environ.get("FCT_DATA")
    if env:
        looked.append((Path(env).expanduser() / name, f"$FCT_DATA/{name} ({Path(env) / name})"))
    for folder, _ in looked:
        if folder.is_dir() and is_root(folder):
            return folder
    places = [shown for _, shown in looked]
    if not env:
        places.append(f"$FCT_DATA/{name} ($FCT_DATA is not set)")
    no_download = (
        f"; {name} cannot be downloaded by fct (--download covers fashion_mnist and cifar100)"
        if download
        else ""
    )
    raise FCTError(
        f"{name} not found in {', '.join(places)}; {layout}; pass --data-root DIR (holding "
        f"ROOT or ROOT/{name}) or set $FCT_DATA{no_download}"
    )


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Sorted names of the image files directly inside ``folder``."""
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
    )


def class_folders(folder: Path, name: str, layout: str) -> list[str]:
    """Sorted class subfolders of a split folder; a flat or empty one raises FCTError."""
    if not folder.is_dir():
        raise FCTError(f"{name}: {folder} does not exist; {layout}")
    classes = _subdirs(folder)
    if classes:
        return classes
    if _image_files(folder):
        raise FCTError(f"{name}: {folder} holds images but no class subfolders; {layout}")
    raise FCTError(f"{name}: {folder} has no class subfolders; {layout}")


# --- ImageNet ---------------------------------------------------------------------------------


def _imagenet_data(folder: Path) -> Path:
    """The folder holding train/ and val/: ``folder`` or Kaggle's ILSVRC/Data/CLS-LOC in it."""
    kaggle = folder / KAGGLE_SUBDIR
    return kaggle if (kaggle / "train").is_dir() or (kaggle / "val").is_dir() else folder


def find_imagenet(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The ImageNet folder (the one holding a Kaggle tree, or train/ and val/ itself)."""
    return find_dataset_root(
        "imagenet",
        root,
        lambda d: (_imagenet_data(d) / "train").is_dir() or (_imagenet_data(d) / "val").is_dir(),
        IMAGENET_LAYOUT,
        download,
    )


@DATASETS.register("imagenet")
def load_imagenet(split: str, root: str | None = None, download: bool = False) -> ImageSource:
    """ImageNet-1k (ILSVRC-2012): train/ or, for split 'test', val/; 224x224 RGB, 1000 classes.

    Classes are the sorted synset folders of train/ (the standard 0..999 index); val/ is read
    with the same index, from class folders or, when flat, from a label file.
    """
    check_split(split)
    found = find_imagenet(root, download)
    data = _imagenet_data(found)
    train = data / "train"
    classes = class_folders(train, "imagenet", IMAGENET_LAYOUT) if train.is_dir() else None
    if split == "train":
        return ImageFolderSource(train, "imagenet", IMAGE_SIZE["imagenet"], classes=classes)
    val = data / "val"
    if not val.is_dir():
        raise FCTError(f"imagenet: {val} does not exist; {IMAGENET_LAYOUT}")
    val_classes = _subdirs(val)
    if not val_classes:
        return _flat_imagenet_val(val, classes, [data, found])
    extra = sorted(set(val_classes) - set(classes)) if classes is not None else []
    if extra:
        raise FCTError(
            f"imagenet: {val} has class folders that {train} lacks ({', '.join(extra[:3])}); "
            "train/ and val/ need the same synsets so labels agree"
        )
    return ImageFolderSource(
        val,
        "imagenet",
        IMAGE_SIZE["imagenet"],
        classes=classes if classes is not None else val_classes,
    )


def _flat_imagenet_val(
    val: Path, classes: list[str] | None, label_dirs: Sequence[Path]
) -> ImageListSource:
    """val/ holding every image directly, labeled through LOC_val_solution.csv or val_labels.txt.

    Without a train/ folder, the classes are the sorted synsets named in the label file.
    """
    files = _image_files(val)
    if not files:
        raise FCTError(
            f"imagenet: {val} holds neither class subfolders nor images; {IMAGENET_LAYOUT}"
        )
    candidates = [d / f for d in dict.fromkeys(label_dirs) for f in VAL_LABEL_FILES]
    label_file = next((p for p in candidates if p.is_file()), None)
    if label_file is None:
        raise FCTError(
            f"imagenet: {val} holds images but no class folders, and no label file was found "
            f"({', '.join(map(str, candidates))}); add LOC_val_solution.csv (Kaggle: "
            "ImageId,PredictionString with the synset first) or val_labels.txt (lines "
            "'<file> <synset>'), or sort val/ into class folders (torchvision's ImageNet does "
            "it from the devkit; or run valprep.sh)"
        )
    synset_of = read_val_labels(label_file)
    classes = classes if classes is not None else sorted(set(synset_of.values()))
    index = {synset: i for i, synset in enumerate(classes)}
    labels = []
    for f in files:
        synset = synset_of.get(os.path.splitext(f)[0])
        if synset is None:
            raise FCTError(f"imagenet: {val / f} has no entry in {label_file}; fix or remove it")
        if synset not in index:
            raise FCTError(
                f"imagenet: {label_file} gives {f} the synset {synset}, which is not a class "
                f"folder of {val.parent / 'train'}; train/ and val/ need the same synsets"
            )
        labels.append(index[synset])
    return ImageListSource(val, "imagenet", files, labels, classes, IMAGE_SIZE["imagenet"])


def read_val_labels(path: Path) -> dict[str, str]:
    """Image name without extension -> synset, from a ``.csv`` (Kaggle) or text label file.

    CSV: header ``ImageId,PredictionString``, rows ``ILSVRC2012_val_00000001,n01751748 x y x y``
    (the first token of the prediction string is the synset). Text: one ``<file> <synset>``
    pair per line.
    """
    out: dict[str, str] = {}
    try:
        with open(path, newline="") as fh:
            if path.suffix.lower() == ".csv":
                rows = csv.reader(fh)
                header = next(rows, [])
                if [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                    raise FCTError(
                        f"{path} does not start with 'ImageId,PredictionString' (Kaggle's "
                        "LOC_val_solution.csv format)"
                    )
                pairs = ((n, row) for n, row in enumerate(rows, 2) if row)
                for n, row in pairs:
                    tokens = row[1].split() if len(row) > 1 else []
                    if not tokens:
                        raise FCTError(f"{path} line {n}: no synset after {row[0]!r}")
                    out[os.path.splitext(row[0].strip())[0]] = tokens[0]
            else:
                for n, line in enumerate(fh, 1):
                    fields = line.split()
                    if not fields:
                        continue
                    if len(fields) != 2:
                        raise FCTError(f"{path} line {n}: expected '<file> <synset>', got {line!r}")
                    out[os.path.splitext(os.path.basename(fields[0]))[0]] = fields[1]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FCTError(f"cannot read the ImageNet label file {path} ({e})") from e
    return out


# --- Places365 --------------------------------------------------------------------------------


def _places_folder_root(folder: Path) -> Path:
    """Where the train/ and val/ category trees are: places365_standard/ or ``folder`` itself."""
    standard = folder / "places365_standard"
    return standard if standard.is_dir() else folder


def find_places365(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The Places365 folder: torchvision's file lists and images, or category folder trees."""

    def is_root(d: Path) -> bool:
        trees = _places_folder_root(d)
        return (
            (d / PLACES_CATEGORIES).is_file()
            or (trees / "train").is_dir()
            or (trees / "val").is_dir()
        )

    return find_dataset_root("places365", root, is_root, PLACES_LAYOUT, download)


@DATASETS.register("places365")
def load_places365(split: str, root: str | None = None, download: bool = False) -> ImageSource:
    """Places365-Standard, small (256x256) images: train or, for split 'test', val; 365 classes.

    torchvision's file lists (categories_places365.txt order) are used when present, else the
    category folders under places365_standard/{train,val}.
    """
    check_split(split)
    found = find_places365(root, download)
    list_file, _ = PLACES_LISTS[split]
    if (found / PLACES_CATEGORIES).is_file() and (found / list_file).is_file():
        return _places_from_lists(found, split)
    trees = _places_folder_root(found)
    folder = trees / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FCTError(
            f"places365: {found} has neither {PLACES_CATEGORIES} with {list_file} nor {folder}; "
            f"{PLACES_LAYOUT}"
        )
    classes = _places_folder_classes(trees, found)
    return ImageFolderSource(folder, "places365", IMAGE_SIZE["places365"], classes=classes)


def read_places_categories(path: Path) -> list[str]:
    """Category names in index order from ``categories_places365.txt`` (lines ``/a/airfield 0``)."""
    by_index: dict[int, str] = {}
    try:
        with open(path) as fh:
            for n, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not fields[1].isdigit():
                    raise FCTError(f"{path} line {n}: expected '<category> <index>', got {line!r}")
                by_index[int(fields[1])] = fields[0]
    except (OSError, UnicodeDecodeError) as e:
        raise FCTError(f"cannot read {path} ({e})") from e
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise FCTError(f"{path} must number its categories 0..N-1, each once")
    return [by_index[i] for i in range(len(by_index))]


def _places_from_lists(found: Path, split: str) -> ImageListSource:
    """torchvision's Places365(small=True) layout: a file list of ``<image> <index>`` lines."""
    list_name, images_name = PLACES_LISTS[split]
    categories = read_places_categories(found / PLACES_CATEGORIES)
    images = found / images_name
    list_file = found / list_name
    paths: list[str] = []
    labels: list[int] = []
    try:
        with open(list_file) as fh:
            for n, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not fields[1].isdigit():
                    raise FCTError(
                        f"{list_file} line {n}: expected '<image> <index>', got {line!r}"
                    )
                if int(fields[1]) >= len(categories):
                    raise FCTError(
                        f"{list_file} line {n}: index {fields[1]} is beyond the "
                        f"{len(categories)} categories of {PLACES_CATEGORIES}"
                    )
                paths.append(fields[0].lstrip("/"))
                labels.append(int(fields[1]))
    except (OSError, UnicodeDecodeError) as e:
        raise FCTError(f"cannot read {list_file} ({e})") from e
    if not paths:
        raise FCTError(f"{list_file} lists no images; {PLACES_LAYOUT}")
    # Checking every file would cost a stat per image; the first one catches an unpacked archive.
    if not (images / paths[0]).is_file():
        raise FCTError(
            f"places365: {images / paths[0]} (listed in {list_file}) does not exist; unpack the "
            f"images into {images}/; {PLACES_LAYOUT}"
        )
    return ImageListSource(images, "places365", paths, labels, categories, IMAGE_SIZE["places365"])


def _category_dirs(folder: Path) -> list[str]:
    """Relative paths ('a/airfield') of the folders under ``folder`` that directly hold images.

    The walk stops descending at the first folder with an image, so it reads a few directory
    entries per class rather than listing every image (and a category folder is never inside
    another one). Images directly in ``folder`` are not a category and are ignored here.
    """
    found: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        subdirs = []
        with os.scandir(current) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    subdirs.append(Path(e.path))
                elif current != folder and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(current.relative_to(folder).as_posix())
                    break
            else:
                stack.extend(subdirs)
    return sorted(found)


def _places_folder_classes(trees: Path, found: Path) -> list[str]:
    """Category folders in label order, the same for train/ and val/.

    With ``categories_places365.txt`` beside the trees and a folder for each of its categories
    (nested 'a/airfield' or flattened 'airfield', 'apartment_building-outdoor'), its order is
    the label order; otherwise the sorted folder paths of train/ (of val/ when there is no train/).
    """
    reference = trees / "train" if (trees / "train").is_dir() else trees / "val"
    folders = _category_dirs(reference)
    if not folders:
        if _image_files(reference):
            raise FCTError(
                f"places365: {reference} holds images but no category subfolders; {PLACES_LAYOUT}"
            )
        raise FCTError(
            f"places365: {reference} has no category folders with images; {PLACES_LAYOUT}"
        )
    for where in (trees, found):
        if (where / PLACES_CATEGORIES).is_file():
            categories = read_places_categories(where / PLACES_CATEGORIES)
            present = set(folders)
            nested = [c.strip("/") for c in categories]
            flat = ["-".join(c.split("/")[1:]) for c in nested]
            for names in (nested, flat):
                if set(names) == present:
                    return names
            break
    return folders


# --- VGGFace2 ---------------------------------------------------------------------------------


def find_vggface2(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The VGGFace2 folder holding train/ and test/ identity folders."""
    return find_dataset_root(
        "vggface2",
        root,
        lambda d: (d / "train").is_dir() or (d / "test").is_dir(),
        VGGFACE2_LAYOUT,
        download,
    )


@DATASETS.register("vggface2")
def load_vggface2(split: str, root: str | None = None, download: bool = False) -> ImageSource:
    """VGGFace2: train/ (8631 identities) or test/ (500 others), face crops at 112x112 RGB.

    Labels are the sorted identity index *within the split*: train and test labels are two
    different id spaces, and class ranges refer to train identities in sorted order.
    """
    check_split(split)
    found = find_vggface2(root, download)
    folder = found / split
    classes = class_folders(folder, "vggface2", VGGFACE2_LAYOUT)
    return ImageFolderSource(folder, "vggface2", IMAGE_SIZE["vggface2"], classes=classes)
