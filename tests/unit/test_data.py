"""Tests for fct.data: dataset files, class subsets, synthetic data, folders, loaders, augment."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import write_fashion, write_idx

import fct.data.base as data_base
import fct.data.fashion_mnist as fmnist
from fct.data import (
    DATASETS,
    ImageFolderSource,
    ImageSource,
    find_fashion_mnist,
    load_dataset,
    make_loader,
    make_synthetic,
    subset_classes,
)
from fct.data.augment import (
    color_jitter,
    crop_padding,
    random_grayscale,
    random_resized_crop,
    simclr_views,
    supervised_augment,
)
from fct.data.cifar import load_cifar100
from fct.data.fashion_mnist import read_idx
from fct.errors import FCTError

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test away from the machine's data: no $FCT_DATA, Debian path or cache."""
    monkeypatch.delenv("FCT_DATA", raising=False)
    monkeypatch.setattr(fmnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(data_base, "DOWNLOAD_DIR", tmp_path / "no-cache")


# --- Fashion-MNIST --------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path, gz):
    arrays = write_fashion(tmp_path / "fm", gz=gz)
    for split in ("train", "test"):
        src = load_dataset("fashion_mnist", split, root=tmp_path / "fm")
        images, labels = arrays[split]
        assert (src.channels, src.image_size, src.num_classes) == (1, 28, 10)
        assert src.images.shape == (len(labels), 1, 28, 28) and src.images.dtype == torch.uint8
        assert np.array_equal(src.images[:, 0].numpy(), images)
        assert src.labels.dtype == np.int64 and np.array_equal(src.labels, labels)
        image, label = src[3]
        assert torch.equal(image[0], torch.from_numpy(images[3])) and label == labels[3]


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    root, env = tmp_path / "root", tmp_path / "env"
    debian, cache = tmp_path / "debian", tmp_path / "cache"
    monkeypatch.setattr(fmnist, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setattr(data_base, "DOWNLOAD_DIR", cache)
    for folder in (root, env / "FashionMNIST" / "raw", debian, cache / "FashionMNIST" / "raw"):
        write_fashion(folder)
    monkeypatch.setenv("FCT_DATA", str(env))
    assert find_fashion_mnist(root) == root
    assert find_fashion_mnist(tmp_path / "empty") == env / "FashionMNIST" / "raw"
    monkeypatch.delenv("FCT_DATA")
    assert find_fashion_mnist() == debian
    (debian / "t10k-labels-idx1-ubyte.gz").unlink()  # an incomplete folder is passed over
    assert find_fashion_mnist() == cache / "FashionMNIST" / "raw"
    write_fashion(tmp_path / "tv" / "FashionMNIST" / "raw")  # torchvision's layout under root
    assert find_fashion_mnist(tmp_path / "tv") == tmp_path / "tv" / "FashionMNIST" / "raw"
    monkeypatch.setenv("FCT_DATA", str(tmp_path / "own"))
    write_fashion(tmp_path / "own" / "fashion_mnist")
    assert find_fashion_mnist() == tmp_path / "own" / "fashion_mnist"


def test_fashion_mnist_missing_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("FCT_DATA", str(tmp_path / "env"))
    write_fashion(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FCTError) as err:
        load_dataset("fashion_mnist", "train", root=tmp_path / "partial")
    msg = str(err.value)
    for place in (
        tmp_path / "partial",
        tmp_path / "partial" / "FashionMNIST" / "raw",
        tmp_path / "env",
        tmp_path / "env" / "fashion_mnist",
        tmp_path / "no-debian",
        tmp_path / "no-cache" / "FashionMNIST" / "raw",
    ):
        assert str(place) in msg
    assert "lacks t10k-images-idx3-ubyte" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and "--download" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_idx_names_the_file(tmp_path, gz):
    write_fashion(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(FCTError, match="train-images-idx3-ubyte") as err:
        load_dataset("fashion_mnist", "train", root=tmp_path)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_idx_wrong_magic(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    assert read_idx(tmp_path / "labels", 1).tolist() == [0, 0, 0, 0]
    with pytest.raises(FCTError, match="not a 3-D uint8 IDX file"):
        read_idx(tmp_path / "labels", 3)
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(FCTError, match="truncated"):
        read_idx(tmp_path / "tiny", 1)


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist():
    train = load_dataset("fashion_mnist", "train", root=REAL_FASHION_MNIST)
    test = load_dataset("fashion_mnist", "test", root=REAL_FASHION_MNIST)
    assert (len(train), len(test), train.num_classes) == (60000, 10000, 10)
    assert train.images.shape == (60000, 1, 28, 28)
    assert np.array_equal(np.bincount(train.labels), np.full(10, 6000))
    assert np.array_equal(np.bincount(test.labels), np.full(10, 1000))


# --- CIFAR-100 ------------------------------------------------------------------------------


def write_cifar(root: Path, n: int = 10, bytes_keys: bool = False, py2_module: bool = False):
    """A fabricated cifar-100-python folder in the real format (protocol-2 pickled dicts)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test"):
        entry = {
            "batch_label": f"{split} batch",
            "filenames": [f"img_{i}.png" for i in range(n)],
            "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            "coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        if bytes_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        raw = pickle.dumps(entry, protocol=2)
        if py2_module:  # the original files were written by numpy 1.x: numpy.core
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / split).write_bytes(raw)
        written[split] = entry
    names = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(names, protocol=2))
    return written


@pytest.mark.parametrize("bytes_keys,py2_module", [(False, False), (True, False), (False, True)])
def test_cifar100_fabricated(tmp_path, bytes_keys, py2_module):
    written = write_cifar(tmp_path, bytes_keys=bytes_keys, py2_module=py2_module)
    for split in ("train", "test"):
        src = load_dataset("cifar100", split, root=tmp_path)
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in written[split].items()}
        assert (src.channels, src.image_size, src.num_classes) == (3, 32, 100)
        assert np.array_equal(src.labels, entry["fine_labels"])
        # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue values.
        assert np.array_equal(src.images[4].numpy(), entry["data"][4].reshape(3, 32, 32))
        assert src.class_names[7] == "class7"


def test_cifar100_refuses_code_in_pickles(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps({"data": Exploit()}))
    with pytest.raises(FCTError, match=r"refusing to load global (posix|os)\.system"):
        load_dataset("cifar100", "train", root=tmp_path)
    assert not marker.exists()


def test_cifar100_missing_names_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("FCT_DATA", str(tmp_path / "env"))
    with pytest.raises(FCTError) as err:
        load_cifar100("train", str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in msg
    assert str(tmp_path / "env" / "cifar-100-python") in msg
    assert "{train,test,meta}" in msg and "--download" in msg


def test_cifar100_truncated_pickle(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FCTError, match="cifar-100-python/test"):
        load_dataset("cifar100", "test", root=tmp_path)


# --- registry, class subsets ------------------------------------------------------------------


def test_registry_names_and_errors():
    assert {"fashion_mnist", "cifar100", "synthetic"} <= set(DATASETS.names())
    with pytest.raises(FCTError, match="did you mean 'cifar100'"):
        load_dataset("cifar10O", "train")
    with pytest.raises(FCTError, match="unknown split 'val'"):
        load_dataset("synthetic", "val")


def test_class_subset_keeps_labels_and_first_items():
    full = load_dataset("synthetic", "train")
    sub = load_dataset("synthetic", "train", classes=(5, 8), max_per_class=3)
    assert sub.labels.tolist() == [5, 5, 5, 6, 6, 6, 7, 7, 7]  # original ids, not 0..2
    assert sub.num_classes == full.num_classes == 20
    first = [int(np.flatnonzero(full.labels == c)[0]) for c in (5, 6, 7)]
    assert torch.equal(sub.images[0], full.images[first[0]])
    assert torch.equal(sub.images[3], full.images[first[1]])
    assert len(load_dataset("synthetic", "test", classes=(0, 20))) == 20 * 16


def test_max_per_class_in_index_order():
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 3])
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 4, 4).contiguous()
    src = ImageSource("toy", labels, 4, 1, 4, (0.5,), (0.5,), images=images)
    sub = subset_classes(src, (0, 3), max_per_class=1)
    assert sub.labels.tolist() == [2, 0, 1] and sub.images[:, 0, 0, 0].tolist() == [0, 1, 3]
    sub2 = subset_classes(src, None, max_per_class=2)
    assert sub2.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert subset_classes(src) is src
    assert src.subset(labels == 2).images[:, 0, 0, 0].tolist() == [0, 2, 5]  # a boolean mask


def test_class_range_errors():
    with pytest.raises(FCTError, match=r"class subset 0\.\.149 is larger than dataset synthetic"):
        load_dataset("synthetic", "train", classes=(0, 150))
    with pytest.raises(FCTError, match="with 20 classes"):
        load_dataset("synthetic", "train", classes=(10, 21))
    with pytest.raises(FCTError, match="empty"):
        load_dataset("synthetic", "train", classes=(3, 3))
    with pytest.raises(FCTError, match="max_per_class"):
        load_dataset("synthetic", "train", max_per_class=0)


# --- synthetic --------------------------------------------------------------------------------


def test_synthetic_deterministic_and_split_specific():
    a = make_synthetic(num_classes=5, per_class=8, image_size=12, channels=3, seed=3)
    b = make_synthetic(num_classes=5, per_class=8, image_size=12, channels=3, seed=3)
    assert a.images.shape == (40, 3, 12, 12) and a.labels.tolist() == sorted(a.labels.tolist())
    assert torch.equal(a.images, b.images)
    test = make_synthetic(
        num_classes=5, per_class=8, image_size=12, channels=3, seed=3, split="test"
    )
    other = make_synthetic(num_classes=5, per_class=8, image_size=12, channels=3, seed=4)
    assert not torch.equal(a.images, test.images) and not torch.equal(a.images, other.images)
    assert a.images.float().std() > 20  # not a flat image
    default = load_dataset("synthetic", "train")
    assert (len(default), default.num_classes, default.channels, default.image_size) == (
        1280,
        20,
        1,
        16,
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_is_learnable(channels):
    """Nearest class mean on raw pixels, fit on train, must beat chance (5%) on test by far."""
    train = make_synthetic(channels=channels, split="train")
    test = make_synthetic(channels=channels, per_class=16, split="test")
    x = train.images.float().flatten(1)
    means = torch.stack([x[torch.from_numpy(train.labels == c)].mean(0) for c in range(20)])
    pred = torch.cdist(test.images.float().flatten(1), means).argmin(1).numpy()
    assert (pred == test.labels).mean() > 0.25


# --- image folders ----------------------------------------------------------------------------


def write_folder(root: Path) -> dict[str, list[tuple[int, int, int]]]:
    """A tree of tiny solid-colour JPEGs under synset-like names created out of order."""
    from PIL import Image

    colors = {
        "n02000000": [(200, 30, 30), (190, 40, 20)],
        "n01000000": [(30, 200, 30)],
        "n10000000": [(30, 30, 200), (20, 20, 220), (40, 30, 210)],
    }
    sizes = [(24, 16), (16, 30), (20, 20)]
    for synset, cols in colors.items():
        (root / synset).mkdir(parents=True)
        for i, col in enumerate(cols):
            Image.new("RGB", sizes[i], col).save(root / synset / f"{synset}_{i}.JPEG")
    Image.new("L", (18, 18), 128).save(root / "n01000000" / "gray.png")  # converted to RGB
    (root / "n01000000" / "README.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return colors


def test_image_folder_source(tmp_path):
    colors = write_folder(tmp_path / "train")
    src = ImageFolderSource(tmp_path / "train", "toy", image_size=8)
    assert src.class_names == ("n01000000", "n02000000", "n10000000")
    assert src.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert (src.num_classes, src.channels, src.images) == (3, 3, None)
    for i in range(len(src)):
        image, label = src[i]
        assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
        assert label == src.labels[i]
    image, _ = src[2]  # n02000000_0: solid red
    assert np.allclose(image[:, 4, 4].numpy(), colors["n02000000"][0], atol=12)
    assert src.path(0).name == "gray.png"  # files sort by name within a class
    assert torch.equal(src[0][0][:, 4, 4], torch.tensor([128, 128, 128], dtype=torch.uint8))
    sub = src.subset([6, 2])
    assert sub.labels.tolist() == [2, 1] and torch.equal(sub[1][0], src[2][0])
    assert len(subset_classes(src, (1, 3), max_per_class=1)) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(FCTError, match="does not exist.*expected"):
        ImageFolderSource(tmp_path / "missing", "x")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.JPEG").write_bytes(b"")
    with pytest.raises(FCTError, match="no class subfolders"):
        ImageFolderSource(tmp_path / "flat", "x")
    (tmp_path / "noimg" / "n01").mkdir(parents=True)
    with pytest.raises(FCTError, match="no images"):
        ImageFolderSource(tmp_path / "noimg", "x")
    (tmp_path / "noimg" / "n01" / "bad.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(FCTError, match="cannot decode image .*bad.JPEG"):
        ImageFolderSource(tmp_path / "noimg", "x")[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_loader(tmp_path, num_workers):
    write_folder(tmp_path)
    src = ImageFolderSource(tmp_path, "toy", image_size=8)

    def batches(epoch):
        loader = make_loader(
            src, 3, shuffle=True, seed=1, epoch=epoch, augment="supervised", num_workers=num_workers
        )
        assert len(loader) == 3
        return [(x.clone(), y.clone()) for x, y in loader]

    first, again = batches(0), batches(0)
    assert [x.shape for x, _ in first] == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(src.labels.tolist())


# --- loader -----------------------------------------------------------------------------------


def small_source(channels: int = 1) -> ImageSource:
    return make_synthetic(num_classes=4, per_class=10, image_size=12, channels=channels)


def collect(loader) -> list:
    return [(x, y) for x, y in loader]


def test_small_folder_splits_are_decoded_in_process():
    """No DataLoader workers for an in-memory source or a folder split of at most
    INLINE_DECODE_MAX images (forking them costs more than the decoding); 2 or more above."""
    from types import SimpleNamespace

    from fct.session import INLINE_DECODE_MAX, loader_workers

    class Folder(SimpleNamespace):
        def __len__(self) -> int:
            return self.n

    assert loader_workers(Folder(images=None, n=INLINE_DECODE_MAX)) == 0
    assert loader_workers(Folder(images=torch.zeros(1), n=10**6)) == 0
    assert 2 <= loader_workers(Folder(images=None, n=INLINE_DECODE_MAX + 1)) <= 8
    assert loader_workers(Folder(images=None, n=INLINE_DECODE_MAX + 1)) == loader_workers()


def test_loader_shapes_len_and_normalisation():
    src = small_source()
    loader = make_loader(src, 16, shuffle=False, seed=0)
    assert len(loader) == 3 and len(make_loader(src, 16, shuffle=True, seed=0, drop_last=True)) == 2
    batches = collect(loader)
    assert [x.shape[0] for x, _ in batches] == [16, 16, 8]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(src.labels))
    restored = x * src.std[0] + src.mean[0]
    assert torch.allclose(restored, src.images.float() / 255, atol=1e-6)
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 2.0  # roughly standardised


def test_loader_shuffle_deterministic_per_seed_and_epoch():
    src = small_source()

    def labels(seed, epoch, drop_last=False):
        loader = make_loader(src, 16, shuffle=True, seed=seed, epoch=epoch, drop_last=drop_last)
        return torch.cat([y for _, y in loader])

    a = labels(0, 0)
    assert torch.equal(a, labels(0, 0))
    assert sorted(a.tolist()) == sorted(src.labels.tolist())  # every item exactly once
    assert not torch.equal(a, labels(0, 1)) and not torch.equal(a, labels(1, 0))
    assert len(labels(0, 0, drop_last=True)) == 32
    loader = make_loader(src, 16, shuffle=True, seed=0)
    loader.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in loader]), labels(0, 1))


@pytest.mark.parametrize("channels", [1, 3])
def test_loader_augmentation_deterministic(channels):
    src = small_source(channels)
    plain = collect(make_loader(src, 8, shuffle=True, seed=2))
    sup = collect(make_loader(src, 8, shuffle=True, seed=2, augment="supervised"))
    sup_again = collect(make_loader(src, 8, shuffle=True, seed=2, augment="supervised"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sup, sup_again))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(sup, plain))  # same order as without
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(sup, plain))
    (v1, v2), y = next(iter(make_loader(src, 8, shuffle=True, seed=2, augment="simclr")))
    (w1, w2), _ = next(iter(make_loader(src, 8, shuffle=True, seed=2, augment="simclr")))
    assert v1.shape == v2.shape == (8, channels, 12, 12) and y.shape == (8,)
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)


def test_make_loader_rejects_bad_arguments():
    with pytest.raises(FCTError, match="did you mean 'simclr'"):
        make_loader(small_source(), 4, shuffle=False, seed=0, augment="simclar")
    with pytest.raises(FCTError, match="batch size"):
        make_loader(small_source(), 0, shuffle=False, seed=0)


# --- augment --------------------------------------------------------------------------------


def test_supervised_augment_is_padded_crop_or_flip():
    """Oracle: every output equals some crop (or its mirror) of the reflect-padded input."""
    x = torch.rand(16, 3, 16, 16)
    out = supervised_augment(x, torch.Generator().manual_seed(0))
    pad = crop_padding(16)
    assert pad == 2 and crop_padding(32) == 4
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    flipped = 0
    for i in range(len(x)):
        crops = [
            padded[i, :, top : top + 16, left : left + 16]
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
        ]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or mirrored
        flipped += mirrored
    assert 0 < flipped < len(x)  # flips happen, but not always
    assert not torch.equal(out, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_deterministic_in_range(channels):
    x = torch.rand(5, channels, 16, 16)
    for fn in (supervised_augment, lambda v, g: torch.cat(simclr_views(v, g))):
        a = fn(x, torch.Generator().manual_seed(7))
        b = fn(x, torch.Generator().manual_seed(7))
        c = fn(x, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.shape[1:] == x.shape[1:] and a.min() >= 0 and a.max() <= 1


def test_resized_crop_full_scale_is_identity_or_flip():
    x = torch.rand(8, 3, 10, 10)
    out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    for i in range(len(x)):
        assert torch.allclose(out[i], x[i], atol=1e-5) or torch.allclose(
            out[i], x[i].flip(-1), atol=1e-5
        )


def test_color_jitter_and_grayscale():
    x = torch.rand(4, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(color_jitter(x, gen, p=0.0), x)
    jittered = color_jitter(x, gen, p=1.0)
    assert not torch.allclose(jittered, x) and jittered.min() >= 0 and jittered.max() <= 1
    gray = random_grayscale(x, gen, p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    one = torch.rand(4, 1, 8, 8)
    assert torch.equal(random_grayscale(one, gen, p=1.0), one)
    with pytest.raises(ValueError):
        supervised_augment(torch.rand(2, 2, 8, 8), gen)
