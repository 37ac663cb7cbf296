"""Tiny fabricated copies of the paper datasets, written in their real on-disk formats.

Each ``fabricate_*`` function writes a few images per class under ``root`` exactly where and how
the real download keeps them, so the loaders in ``fct.data`` are tested on the real layout
without downloading anything. Images are deterministic (seeded) and class-dependent: every class
has its own colour, stripe orientation and stripe frequency, plus per-image jitter and noise, so
a model (or a nearest-class-mean rule) can tell classes apart. Each function returns a
``Fabricated`` record of what it wrote, for tests to check the loaders against.
"""

from __future__ import annotations

import csv
import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The real CIFAR-100 fine label names, in label order (the meta file's 'fine_label_names'),
# kept as words rather than 100 quoted literals so they read (and check) like the original list.
CIFAR100_FINE = (  # noqa: SIM905
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain "
    "mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain "
    "plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf "
    "woman worm"
).split()
CIFAR100_COARSE = (  # noqa: SIM905
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables "
    "household_electrical_devices household_furniture insects large_carnivores "
    "large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores "
    "medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 "
    "vehicles_2"
).split()
assert len(CIFAR100_FINE) == 100 and len(CIFAR100_COARSE) == 20

# Real Places365 categories, in an order that puts nested ones ('/c/church/indoor') among the
# first few, so that even a 3-category copy has nested folders.
PLACES_POOL = (
    "/a/airfield", "/c/church/indoor", "/b/beach", "/s/swimming_pool/outdoor",
    "/a/apartment_building/outdoor", "/k/kitchen", "/c/church/outdoor", "/f/forest/broadleaf",
    "/h/highway", "/l/lake/natural", "/m/mountain", "/o/office", "/s/swimming_pool/indoor",
    "/w/waterfall", "/b/bakery/shop", "/a/airplane_cabin",
)  # fmt: skip


@dataclass(frozen=True)
class Fabricated:
    """What a ``fabricate_*`` call wrote.

    Attributes:
        root: the folder to hand to the loader as ``root`` / ``--data-root``.
        classes: train class names in label order (synsets, '/a/airfield', identities).
        test_classes: test class names in label order (differs from ``classes`` only for
            VGGFace2, whose test identities are other people).
        train, test: ``(file, label)`` per item in the order written; ``file`` is the path
            relative to the split's image folder (for CIFAR-100, the entry's filename).
    """

    root: Path
    classes: tuple[str, ...]
    test_classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]


class _Painter:
    """Class-dependent images: colour, stripe angle and frequency per class, noise per image."""

    def __init__(self, num_classes: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.colors = self.rng.integers(30, 226, (num_classes, 2, 3))
        self.angles = self.rng.uniform(0, np.pi, num_classes)
        self.freqs = self.rng.uniform(0.15, 0.6, num_classes)

    def image(self, label: int, width: int, height: int) -> np.ndarray:
        """A uint8 [height, width, 3] image of class ``label``."""
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        # Frequencies are per pixel of a 32-pixel image, so larger images show the same pattern.
        scale = 32.0 / min(width, height)
        angle = self.angles[label] + self.rng.normal(0, 0.1)
        phase = self.rng.uniform(0, 2 * np.pi)
        wave = np.sin(self.freqs[label] * scale * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        mix = (wave[..., None] + 1) / 2
        lo, hi = self.colors[label]
        pixels = lo + mix * (hi - lo) + self.rng.normal(0, 8, (height, width, 3))
        return np.clip(pixels, 0, 255).astype(np.uint8)

    def save(self, path: Path, label: int, width: int, height: int) -> None:
        """Write a class-``label`` image to ``path`` (format from the extension)."""
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.image(label, width, height)).save(path, quality=90)

    def jittered(self, size: int) -> tuple[int, int]:
        """A (width, height) around ``size``: real photos are rarely square."""
        long = size + int(self.rng.integers(0, size // 2 + 1))
        return (long, size) if self.rng.random() < 0.5 else (size, long)


def _interleaved(labels_per_class: list[int], rng: np.random.Generator) -> list[int]:
    """Labels repeated per class and shuffled, as in real files whose items are not sorted."""
    labels = np.repeat(np.arange(len(labels_per_class)), labels_per_class)
    return [int(v) for v in rng.permutation(labels)]


# --- CIFAR-100 --------------------------------------------------------------------------------


def fabricate_cifar100(
    root: str | Path,
    per_class: int = 2,
    classes: int = 100,
    *,
    test_per_class: int | None = None,
    seed: int = 0,
) -> Fabricated:
    """Write ``root/cifar-100-python/{train,test,meta}`` as the original tarball has them.

    ``train`` and ``test`` are protocol-2 pickled dicts with ``data`` (uint8 [N, 3072]: the
    red, green and blue 32x32 planes), ``fine_labels``, ``coarse_labels``, ``filenames`` and
    ``batch_label``; ``meta`` has ``fine_label_names`` and ``coarse_label_names``. Items are in
    shuffled class order; only the first ``classes`` fine labels are used. Coarse labels are
    placeholders (fine // 5), not the real superclass mapping.
    """
    if not 1 <= classes <= 100:
        raise ValueError(f"classes must be 1..100, got {classes}")
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    painter = _Painter(classes, seed)
    written = {}
    for split, n, batch_label in (
        ("train", per_class, "training batch 1 of 1"),
        ("test", per_class if test_per_class is None else test_per_class, "testing batch 1 of 1"),
    ):
        labels = _interleaved([n] * classes, painter.rng)
        images = np.stack([painter.image(c, 32, 32) for c in labels]) if labels else None
        data = (
            images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
            if images is not None
            else np.zeros((0, 3072), np.uint8)
        )
        names = [f"{CIFAR100_FINE[c]}_s_{i:06d}.png" for i, c in enumerate(labels)]
        entry = {
            "filenames": names,
            "batch_label": batch_label,
            "fine_labels": labels,
            "coarse_labels": [c // 5 for c in labels],
            "data": data,
        }
        raw = pickle.dumps(entry, protocol=2)
        # The original files were pickled by numpy 1.x, which names numpy.core, not numpy._core.
        (folder / split).write_bytes(
            raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        )
        written[split] = tuple(zip(names, labels))
    meta = {"fine_label_names": list(CIFAR100_FINE), "coarse_label_names": list(CIFAR100_COARSE)}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    names = tuple(CIFAR100_FINE)
    return Fabricated(Path(root), names, names, written["train"], written["test"])


# --- ImageNet ---------------------------------------------------------------------------------


def fabricate_imagenet(
    root: str | Path,
    synsets: int = 4,
    per_class: int = 2,
    size: int = 32,
    flat_val: bool = False,
    *,
    val_per_class: int | None = None,
    val_labels: str = "csv",
    seed: int = 0,
) -> Fabricated:
    """Write ``root/train/<synset>/<synset>_<n>.JPEG`` and ``root/val/...`` as real JPEGs.

    Synset names look like ``n01440764`` and are created in unsorted order (labels follow their
    sorted order). With ``flat_val`` all validation images lie directly in ``root/val`` as
    ``ILSVRC2012_val_<8 digits>.JPEG`` in shuffled class order, labeled by
    ``root/LOC_val_solution.csv`` (``val_labels="csv"``, Kaggle's format), ``root/val_labels.txt``
    (``"txt"``, ``<file> <synset>`` lines) or no file at all (``"none"``).
    """
    if val_labels not in ("csv", "txt", "none"):
        raise ValueError(f"val_labels must be 'csv', 'txt' or 'none', got {val_labels!r}")
    root = Path(root)
    painter = _Painter(synsets, seed)
    created = [
        f"n{v:08d}" for v in painter.rng.choice(15_000_000, synsets, replace=False) + 1_000_000
    ]
    names = sorted(created)
    train = []
    for synset in created:  # creation order differs from label order on purpose
        label = names.index(synset)
        for k in range(per_class):
            file = f"{synset}/{synset}_{1000 + 37 * k}.JPEG"
            painter.save(root / "train" / file, label, *painter.jittered(size))
            train.append((file, label))
    n_val = per_class if val_per_class is None else val_per_class
    labels = _interleaved([n_val] * synsets, painter.rng)
    test = []
    for i, label in enumerate(labels, 1):
        synset = names[label]
        stem = f"ILSVRC2012_val_{i:08d}"
        file = f"{stem}.JPEG" if flat_val else f"{synset}/{stem}.JPEG"
        painter.save(root / "val" / file, label, *painter.jittered(size))
        test.append((file, label))
    if flat_val and val_labels == "csv":
        with open(root / "LOC_val_solution.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ImageId", "PredictionString"])
            for file, label in test:
                # Real rows hold one or more "synset xmin ymin xmax ymax" boxes.
                box = f"{names[label]} 1 2 {size - 2} {size - 1}"
                writer.writerow([file.removesuffix(".JPEG"), f"{box} {box} "])
    elif flat_val and val_labels == "txt":
        lines = [f"{file} {names[label]}\n" for file, label in test]
        (root / "val_labels.txt").write_text("".join(lines))
    return Fabricated(root, tuple(names), tuple(names), tuple(train), tuple(test))


# --- Places365 --------------------------------------------------------------------------------


def places_categories(n: int) -> list[str]:
    """``n`` Places365-style category names ('/a/airfield', '/c/church/indoor'), sorted."""
    extra = [f"/z/zone_{i:03d}" for i in range(max(0, n - len(PLACES_POOL)))]
    return sorted([*PLACES_POOL, *extra][:n])


def fabricate_places365(
    root: str | Path,
    categories: int = 5,
    per_class: int = 2,
    size: int = 32,
    layout: str = "lists",
    *,
    val_per_class: int | None = None,
    seed: int = 0,
) -> Fabricated:
    """Write a Places365-Standard copy with ``categories`` classes, some nested.

    ``layout="lists"`` is torchvision's ``Places365(small=True)``: ``categories_places365.txt``
    (``/a/airfield 0``), ``places365_train_standard.txt`` (``/a/airfield/00000001.jpg 0``) with
    images under ``data_256_standard/``, and ``places365_val.txt``
    (``Places365_val_00000001.jpg 0``) with images under ``val_256/``. ``layout="folders"`` is
    ``places365_standard/{train,val}/a/airfield/*.jpg`` with no categories file. Images are
    square, as Places' "small" images are.
    """
    if layout not in ("lists", "folders"):
        raise ValueError(f"layout must be 'lists' or 'folders', got {layout!r}")
    root = Path(root)
    names = places_categories(categories)
    painter = _Painter(categories, seed)
    train, test = [], []
    for label, name in enumerate(names):
        for k in range(per_class):
            train.append((f"{name.strip('/')}/{k + 1:08d}.jpg", label))
    n_val = per_class if val_per_class is None else val_per_class
    for i, label in enumerate(_interleaved([n_val] * categories, painter.rng), 1):
        file = f"Places365_val_{i:08d}.jpg"
        test.append((file if layout == "lists" else f"{names[label].strip('/')}/{file}", label))
    if layout == "lists":
        train_dir, val_dir = root / "data_256_standard", root / "val_256"
        lines = [f"{name} {i}\n" for i, name in enumerate(names)]
        (root / "categories_places365.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "categories_places365.txt").write_text("".join(lines))
        (root / "places365_train_standard.txt").write_text(
            "".join(f"/{file} {label}\n" for file, label in train)
        )
        (root / "places365_val.txt").write_text("".join(f"{f} {label}\n" for f, label in test))
    else:
        train_dir = root / "places365_standard" / "train"
        val_dir = root / "places365_standard" / "val"
    for folder, items in ((train_dir, train), (val_dir, test)):
        for file, label in items:
            painter.save(folder / file, label, size, size)
    return Fabricated(root, tuple(names), tuple(names), tuple(train), tuple(test))


# --- VGGFace2 ---------------------------------------------------------------------------------


def fabricate_vggface2(
    root: str | Path,
    train_ids: int = 4,
    test_ids: int = 3,
    per_id: int = 2,
    size: int = 32,
    *,
    seed: int = 0,
) -> Fabricated:
    """Write ``root/{train,test}/<identity>/<nnnn>_<nn>.jpg`` plus ``train_list.txt``/``test_list.txt``.

    Identities look like ``n000002``; train and test identities are disjoint and interleave in
    sorted order (as in VGGFace2, where n000001 is a test identity and n000002 a train one).
    Images are portrait-shaped loose face crops of roughly ``size`` pixels.
    """
    root = Path(root)
    painter = _Painter(train_ids + test_ids, seed)
    numbers = painter.rng.choice(9_000, train_ids + test_ids, replace=False) + 1
    people = [f"n{v:06d}" for v in numbers]
    written: dict[str, tuple[tuple[str, int], ...]] = {}
    classes: dict[str, list[str]] = {}
    for split, ids, offset in (
        ("train", people[:train_ids], 0),
        ("test", people[train_ids:], train_ids),
    ):
        classes[split] = sorted(ids)
        items = []
        for j, person in enumerate(ids):
            label = classes[split].index(person)
            for k in range(per_id):
                file = f"{person}/{k + 1:04d}_01.jpg"
                # The painter's class is the person, so every identity looks different.
                painter.save(root / split / file, offset + j, size, size * 5 // 4)
                items.append((file, label))
        (root / f"{split}_list.txt").write_text("".join(f"{f}\n" for f, _ in items))
        written[split] = tuple(items)
    return Fabricated(
        root, tuple(classes["train"]), tuple(classes["test"]), written["train"], written["test"]
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def write_fashion(folder: Path, gz: bool = True, seed: int = 0, n: int = (12, 6)) -> dict:
    """A tiny Fashion-MNIST folder: ``n`` = (train, test) items; returns the arrays written."""
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    arrays = {}
    for split, prefix, count in (("train", "train", n[0]), ("test", "t10k", n[1])):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        arrays[split] = (images, labels)
    return arrays
