"""The paper datasets (CIFAR-100, ImageNet, Places365, VGGFace2) on fabricated on-disk copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import (
    CIFAR100_FINE,
    fabricate_cifar100,
    fabricate_imagenet,
    fabricate_places365,
    fabricate_vggface2,
)

import fct.data.base as data_base
from fct.data import DATASETS, ImageListSource, load_dataset
from fct.data.folders import IMAGE_SIZE
from fct.errors import FCTError

PAPER = ("cifar100", "imagenet", "places365", "vggface2")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Keep every test away from the machine's data: no $FCT_DATA, no download cache."""
    monkeypatch.delenv("FCT_DATA", raising=False)
    monkeypatch.setattr(data_base, "DOWNLOAD_DIR", tmp_path / "no-cache")


def labels_by_file(source, root: Path) -> dict[str, int]:
    """Item file (relative to ``root``) -> label, for a folder-backed source."""
    return {
        source.path(i).relative_to(root).as_posix(): int(source.labels[i])
        for i in range(len(source))
    }


def nearest_mean_accuracy(train, test, size: int = 8) -> float:
    """Accuracy of a nearest-class-mean rule on downsampled pixels: are classes learnable?"""

    def features(src):
        x = torch.stack([src[i][0] for i in range(len(src))]).float()
        return torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1)

    xtr, xte = features(train), features(test)
    present = np.unique(train.labels)
    means = torch.stack([xtr[torch.from_numpy(train.labels == c)].mean(0) for c in present])
    pred = present[torch.cdist(xte, means).argmin(1).numpy()]
    return float((pred == test.labels).mean())


def test_registered():
    assert set(PAPER) <= set(DATASETS.names())


# --- CIFAR-100 --------------------------------------------------------------------------------


def test_cifar100_fabricated(tmp_path):
    fab = fabricate_cifar100(tmp_path, per_class=3, classes=10, test_per_class=2)
    train = load_dataset("cifar100", "train", tmp_path)
    test = load_dataset("cifar100", "test", tmp_path)
    assert (len(train), len(test), train.num_classes) == (30, 20, 100)
    assert train.labels.tolist() == [label for _, label in fab.train]
    assert np.array_equal(np.bincount(train.labels, minlength=100)[:11], [3] * 10 + [0])
    assert train.class_names == tuple(CIFAR100_FINE) and train.class_names[0] == "apple"
    assert train.images.shape == (30, 3, 32, 32)
    old = load_dataset("cifar100", "train", tmp_path, classes=(0, 5))
    assert sorted(set(old.labels.tolist())) == [0, 1, 2, 3, 4]  # "first K" = fine labels 0..K-1
    assert nearest_mean_accuracy(train, test) > 0.5


def test_cifar100_pickles_match_torchvision(tmp_path, monkeypatch):
    """torchvision's own CIFAR100 reads the fabricated files to the same arrays."""
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks the real files' md5 sums, which a fabricated copy cannot match.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    fabricate_cifar100(tmp_path, per_class=1)
    ours = load_dataset("cifar100", "test", tmp_path)
    theirs = tv_cifar.CIFAR100(str(tmp_path), train=False, download=False)
    assert theirs.targets == ours.labels.tolist()
    assert np.array_equal(theirs.data, ours.images.permute(0, 2, 3, 1).numpy())
    assert theirs.classes == list(ours.class_names)


# --- ImageNet ---------------------------------------------------------------------------------


def test_imagenet_folders(tmp_path):
    fab = fabricate_imagenet(tmp_path, synsets=4, per_class=3, val_per_class=2)
    train = load_dataset("imagenet", "train", tmp_path)
    test = load_dataset("imagenet", "test", tmp_path)
    assert train.class_names == test.class_names == fab.classes
    assert list(fab.classes) == sorted(fab.classes)  # labels follow sorted synsets ...
    created = [file.split("/")[0] for file, _ in fab.train][::3]
    assert created != sorted(created)  # ... although they were created in another order
    assert (len(train), len(test), train.num_classes, train.image_size) == (12, 8, 4, 224)
    assert labels_by_file(train, tmp_path / "train") == dict(fab.train)
    assert labels_by_file(test, tmp_path / "val") == dict(fab.test)
    image, _ = train[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8
    assert nearest_mean_accuracy(train, test) > 0.5


def test_imagenet_class_subset_and_cap(tmp_path):
    fab = fabricate_imagenet(tmp_path, synsets=5, per_class=3)
    old = load_dataset("imagenet", "train", tmp_path, classes=(0, 2), max_per_class=2)
    assert {old.class_names[label] for label in old.labels} == set(fab.classes[:2])
    assert np.bincount(old.labels).tolist() == [2, 2]


@pytest.mark.parametrize("val_labels", ["csv", "txt"])
def test_imagenet_flat_val(tmp_path, val_labels):
    fab = fabricate_imagenet(tmp_path, synsets=3, per_class=2, flat_val=True, val_labels=val_labels)
    test = load_dataset("imagenet", "test", tmp_path)
    assert isinstance(test, ImageListSource)
    assert test.class_names == fab.classes
    assert labels_by_file(test, tmp_path / "val") == dict(fab.test)
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]
    sub = test.subset([3, 0])  # file-listed sources subset and resize like folder ones
    assert sub.labels.tolist() == [test.labels[3], test.labels[0]]
    assert torch.equal(sub[1][0], test[0][0])
    small = sub.resized(40)
    assert small[0][0].shape == (3, 40, 40) and sub[0][0].shape == (3, 224, 224)


def test_imagenet_flat_val_without_train_uses_label_file_synsets(tmp_path):
    fab = fabricate_imagenet(tmp_path, synsets=3, per_class=1, flat_val=True)
    shutil.rmtree(tmp_path / "train")
    test = load_dataset("imagenet", "test", tmp_path)
    assert test.class_names == fab.classes
    assert labels_by_file(test, tmp_path / "val") == dict(fab.test)


def test_imagenet_kaggle_layout(tmp_path):
    """Kaggle: ROOT/ILSVRC/Data/CLS-LOC/{train,val} and ROOT/LOC_val_solution.csv."""
    fab = fabricate_imagenet(tmp_path / "src", synsets=3, per_class=1, flat_val=True)
    kaggle = tmp_path / "data" / "imagenet"
    (kaggle / "ILSVRC" / "Data").mkdir(parents=True)
    shutil.move(tmp_path / "src", kaggle / "ILSVRC" / "Data" / "CLS-LOC")
    shutil.move(kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_val_solution.csv", kaggle)
    test = load_dataset("imagenet", "test", tmp_path / "data")  # --data-root holds imagenet/
    assert labels_by_file(test, kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "val") == dict(fab.test)


def test_imagenet_flat_val_errors(tmp_path):
    fab = fabricate_imagenet(tmp_path, synsets=2, per_class=1, flat_val=True, val_labels="none")
    with pytest.raises(FCTError) as err:
        load_dataset("imagenet", "test", tmp_path)
    message = str(err.value)
    for needle in ("LOC_val_solution.csv", "val_labels.txt", "valprep.sh", "torchvision"):
        assert needle in message
    first = fab.classes[fab.test[0][1]]
    (tmp_path / "val_labels.txt").write_text(f"ILSVRC2012_val_00000001.JPEG {first}\n")
    with pytest.raises(FCTError, match="ILSVRC2012_val_00000002.JPEG has no entry"):
        load_dataset("imagenet", "test", tmp_path)
    (tmp_path / "val_labels.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG n09999999\nILSVRC2012_val_00000002.JPEG n09999999\n"
    )
    with pytest.raises(FCTError, match="synset n09999999, which is not a class folder"):
        load_dataset("imagenet", "test", tmp_path)
    (tmp_path / "val_labels.txt").unlink()
    (tmp_path / "LOC_val_solution.csv").write_text("id,label\nx,n01\n")
    with pytest.raises(FCTError, match="ImageId,PredictionString"):
        load_dataset("imagenet", "test", tmp_path)


def test_imagenet_wrong_layout(tmp_path):
    fabricate_imagenet(tmp_path, synsets=2, per_class=2)
    for file in (tmp_path / "train").glob("*/*.JPEG"):  # flatten train/: no class folders
        file.rename(tmp_path / "train" / file.name)
    for folder in (tmp_path / "train").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(
        FCTError,
        match=r"holds images but no class subfolders; expected ROOT/train/<synset>/\*\.JPEG",
    ):
        load_dataset("imagenet", "train", tmp_path)


def test_imagenet_val_synsets_must_match_train(tmp_path):
    fabricate_imagenet(tmp_path, synsets=2, per_class=1)
    (tmp_path / "val" / "n00000001").mkdir()
    with pytest.raises(FCTError, match="class folders that .*train lacks"):
        load_dataset("imagenet", "test", tmp_path)


def test_imagenet_search_order(tmp_path, monkeypatch):
    env = fabricate_imagenet(tmp_path / "env" / "imagenet", synsets=2, per_class=1)
    monkeypatch.setenv("FCT_DATA", str(tmp_path / "env"))
    assert load_dataset("imagenet", "train", None).class_names == env.classes
    given = fabricate_imagenet(tmp_path / "given", synsets=3, per_class=1, seed=1)
    assert load_dataset("imagenet", "train", tmp_path / "given").class_names == given.classes


# --- Places365 --------------------------------------------------------------------------------


def test_places365_file_lists(tmp_path):
    fab = fabricate_places365(tmp_path, categories=5, per_class=2, val_per_class=3)
    train = load_dataset("places365", "train", tmp_path)
    test = load_dataset("places365", "test", tmp_path)
    assert train.class_names == test.class_names == fab.classes
    assert "/c/church/indoor" in fab.classes  # nested categories
    assert (len(train), len(test), train.num_classes, train.image_size) == (10, 15, 5, 224)
    assert labels_by_file(train, tmp_path / "data_256_standard") == dict(fab.train)
    assert labels_by_file(test, tmp_path / "val_256") == dict(fab.test)
    assert nearest_mean_accuracy(train, test) > 0.5


def test_places365_categories_file_order(tmp_path):
    """The label of an image is the file list's index, in categories_places365.txt's order."""
    fabricate_places365(tmp_path, categories=3, per_class=1)
    lines = (tmp_path / "categories_places365.txt").read_text().splitlines()
    names = [line.split()[0] for line in lines]
    (tmp_path / "categories_places365.txt").write_text(
        "".join(f"{n} {i}\n" for i, n in reversed(list(enumerate(names))))
    )
    assert load_dataset("places365", "train", tmp_path).class_names == tuple(names)


def test_places365_nested_folders(tmp_path):
    fab = fabricate_places365(tmp_path, categories=7, per_class=2, layout="folders")
    train = load_dataset("places365", "train", tmp_path)
    test = load_dataset("places365", "test", tmp_path)
    expected = tuple(name.strip("/") for name in fab.classes)
    assert train.class_names == test.class_names == expected
    assert "c/church/indoor" in expected and "c/church/outdoor" in expected
    trees = tmp_path / "places365_standard"
    assert labels_by_file(train, trees / "train") == dict(fab.train)
    assert labels_by_file(test, trees / "val") == dict(fab.test)


def test_places365_folders_follow_categories_file(tmp_path):
    """A categories file beside flattened folders ('church-indoor') gives the official order."""
    fab = fabricate_places365(tmp_path, categories=4, per_class=1, layout="folders")
    trees = tmp_path / "places365_standard"
    for split in ("train", "val"):
        for name in fab.classes:
            nested = trees / split / name.strip("/")
            flat = trees / split / "-".join(name.strip("/").split("/")[1:])
            shutil.move(nested, flat)
        for letter in (trees / split).iterdir():
            if len(letter.name) == 1:
                shutil.rmtree(letter)
    ordered = list(reversed(fab.classes))  # a custom index order, to see that it is used
    (trees / "categories_places365.txt").write_text(
        "".join(f"{n} {i}\n" for i, n in enumerate(ordered))
    )
    train = load_dataset("places365", "train", tmp_path)
    assert train.class_names == tuple("-".join(n.split("/")[2:]) for n in ordered)


def test_places365_errors(tmp_path):
    fabricate_places365(tmp_path, categories=2, per_class=1)
    shutil.rmtree(tmp_path / "val_256")
    with pytest.raises(FCTError, match="val_256.*does not exist; unpack"):
        load_dataset("places365", "test", tmp_path)
    (tmp_path / "places365_train_standard.txt").write_text("/a/airfield/1.jpg 7\n")
    with pytest.raises(FCTError, match="index 7 is beyond the 2 categories"):
        load_dataset("places365", "train", tmp_path)
    flat = tmp_path / "flat" / "places365_standard" / "train"
    flat.mkdir(parents=True)
    shutil.copy(next((tmp_path / "data_256_standard").rglob("*.jpg")), flat / "x.jpg")
    with pytest.raises(FCTError, match="holds images but no category subfolders; expected"):
        load_dataset("places365", "train", tmp_path / "flat")


# --- VGGFace2 ---------------------------------------------------------------------------------


def test_vggface2(tmp_path):
    fab = fabricate_vggface2(tmp_path, train_ids=5, test_ids=3, per_id=2)
    train = load_dataset("vggface2", "train", tmp_path)
    test = load_dataset("vggface2", "test", tmp_path)
    assert not set(train.class_names) & set(test.class_names)  # disjoint identities
    assert (train.class_names, test.class_names) == (fab.classes, fab.test_classes)
    assert (train.num_classes, test.num_classes) == (5, 3)
    assert test.labels.tolist() == sorted(test.labels.tolist())  # folder order = sorted ids
    assert sorted(set(test.labels.tolist())) == [0, 1, 2]  # the test split's own id space
    assert labels_by_file(train, tmp_path / "train") == dict(fab.train)
    assert labels_by_file(test, tmp_path / "test") == dict(fab.test)
    image, _ = test[0]
    assert image.shape == (3, 112, 112) == (3, IMAGE_SIZE["vggface2"], IMAGE_SIZE["vggface2"])


def test_vggface2_missing_split(tmp_path):
    fabricate_vggface2(tmp_path, train_ids=2, test_ids=1, per_id=1)
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(FCTError, match=r"test does not exist; expected ROOT/train/<identity>"):
        load_dataset("vggface2", "test", tmp_path)


# --- missing data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,layout",
    [
        ("imagenet", "expected ROOT/train/<synset>/*.JPEG and ROOT/val/<synset>/*.JPEG"),
        ("places365", "expected ROOT/places365_standard/{train,val}/<category>/*.jpg"),
        ("vggface2", "expected ROOT/train/<identity>/*.jpg and ROOT/test/<identity>/*.jpg"),
    ],
)
@pytest.mark.parametrize("with_env", [False, True])
def test_missing_data_message(tmp_path, monkeypatch, name, layout, with_env):
    if with_env:
        monkeypatch.setenv("FCT_DATA", str(tmp_path / "shared"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FCTError) as err:
        load_dataset(name, "train", empty, download=True)
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert message.startswith(f"{name} not found in {empty / name}, {empty}, $FCT_DATA/{name}")
    assert layout in message and "--data-root" in message
    assert "cannot be downloaded" in message
    assert ("is not set" in message) != with_env


@pytest.mark.parametrize(
    "name, cls, label",
    [("cifar100", "CIFAR100", "CIFAR-100"), ("fashion_mnist", "FashionMNIST", "Fashion-MNIST")],
)
def test_failed_download_is_one_line(tmp_path, monkeypatch, name, cls, label):
    """--download through torchvision that fails (here: a stand-in that raises, no network)
    is one FCTError naming the folder, with the layout hint."""
    import torchvision.datasets

    def offline(root, train, download):
        assert download and train
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, cls, offline)
    monkeypatch.delenv("FCT_DATA", raising=False)
    monkeypatch.setattr("fct.data.base.DOWNLOAD_DIR", tmp_path / "dl")
    # This machine has Debian's Fashion-MNIST: hide it so the loader has to download.
    monkeypatch.setattr("fct.data.fashion_mnist.DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FCTError) as err:
        load_dataset(name, "train", empty, download=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"downloading {label} into {empty} failed (Network is unreachable)")
