"""The catalogue of bad inputs (docs/reliability.md): each is answered by ONE line
`error: ...` naming the fix, exit status 2, no traceback, and nothing already computed is lost.

Covered elsewhere, not repeated here: malformed suite TOML and bad suite values
(tests/unit/test_suites.py: test_toml_syntax_error_names_the_line, test_suite_validation_errors),
an unknown suite and an unknown method, a plugin that fails to import
(tests/e2e/test_runner.py: test_unknown_suite, test_unknown_method_and_plugin_errors).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
from conftest import assert_cache_verifies, entries
from fabricate import fabricate_imagenet

from fct.cli import main
from fct.scenarios import SUITES_DIR

TINY = SUITES_DIR / "tiny.toml"


def fails(capsys, argv: list[str]) -> str:
    """Run `fct ARGV` in-process; assert exit 2 and one `error:` line; return the message."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def suite_file(tmp_path: Path, replace: dict[str, str] | None = None, extra: str = "") -> Path:
    """The tiny suite with some lines replaced and TOML appended, as a file of its own."""
    text = TINY.read_text()
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "suite.toml"
    path.write_text(text + extra)
    return path


def nothing_trained(cache: Path) -> bool:
    """True when no model, transformation or embedding was written to ``cache``."""
    return not cache.exists() or not any(
        (cache / kind).exists() for kind in ("models", "transformations", "features", "partial")
    )


def test_missing_data_root(tmp_path, capsys, monkeypatch):
    import fct.data.base
    import fct.data.fashion_mnist

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FCT_DATA", str(empty))
    # Machine-independent: the Debian package and the download cache are searched too.
    monkeypatch.setattr(fct.data.fashion_mnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(fct.data.base, "DOWNLOAD_DIR", tmp_path / "no-download")
    cache = tmp_path / "cache"
    msg = fails(capsys, ["run", "quickstart", "--out", str(tmp_path / "o"), "--cache", str(cache)])
    assert msg.startswith(
        "error: scenario 'fmnist-half' [old]: Fashion-MNIST not found; looked in:"
    )
    assert str(empty) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and "--download" in msg
    assert "FCT_NO_DOWNLOAD is set" in msg  # tests/conftest.py: tests never download
    assert nothing_trained(cache)


# What torchvision's MNIST.download raises when no mirror answers (torchvision 0.29).
OFFLINE = (
    "Error downloading train-images-idx3-ubyte.gz:\n"
    "Tried http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/, got:\n"
    "<urlopen error [Errno -2] Name or service not known>\n"
)


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    """No copy of Fashion-MNIST anywhere, the automatic download on, and torchvision's
    FashionMNIST replaced by a stand-in that records its calls (and by default fails as
    torchvision does offline). Yields the list of calls; ``calls.fetch`` makes it succeed."""
    import torchvision.datasets

    import fct.data.fashion_mnist as fmnist

    monkeypatch.delenv("FCT_NO_DOWNLOAD")
    monkeypatch.delenv("FCT_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the download cache: ~/.cache/fct/data
    monkeypatch.setattr(fmnist, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(fmnist, "_FAILED", {})

    class Calls(list):
        fetch = False

    calls = Calls()

    def fashion_mnist(root, train=True, download=False):
        calls.append((root, train, download))
        if not calls.fetch:
            raise RuntimeError(OFFLINE)
        from fabricate import write_fashion

        write_fashion(Path(root) / "FashionMNIST" / "raw")  # where torchvision puts them

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fashion_mnist)
    return calls


@pytest.mark.parametrize("where", ["--data-root", "$FCT_DATA", "cache"])
def test_missing_fashion_mnist_is_downloaded_first(where, tmp_path, capsys, monkeypatch,
                                                   no_fashion_mnist):  # fmt: skip
    """Without --download, a missing Fashion-MNIST is fetched by torchvision into the data
    root (--data-root, else $FCT_DATA, else ~/.cache/fct/data); offline, the run stops with
    one line naming the apt package, --data-root and the download's error, before training,
    after one attempt (not one per split), leaving no empty folder behind."""
    target = {"--data-root": tmp_path / "root", "$FCT_DATA": tmp_path / "shared",
              "cache": tmp_path / "home" / ".cache" / "fct" / "data"}[where]  # fmt: skip
    argv = ["run", "quickstart", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    if where == "--data-root":
        argv += ["--data-root", str(target)]
    elif where == "$FCT_DATA":
        monkeypatch.setenv("FCT_DATA", str(target))
    msg = fails(capsys, argv)
    assert no_fashion_mnist == [(str(target), True, True)]
    assert msg.startswith(
        f"error: scenario 'fmnist-half' [old]: downloading Fashion-MNIST into {target} failed "
        "(Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name or "
        "service not known>); get it with `apt-get install dataset-fashion-mnist`, or pass "
        "--data-root DIR with the four IDX files"
    )
    assert str(tmp_path / "no-debian") in msg  # and where it looked
    assert not target.exists() and not (tmp_path / "home" / ".cache").exists()
    assert nothing_trained(tmp_path / "c")


def test_a_failed_download_is_not_retried_for_the_next_split(no_fashion_mnist, tmp_path):
    from fct.data import load_dataset
    from fct.errors import FCTError

    for split in ("train", "test", "train"):
        with pytest.raises(FCTError, match="Name or service not known") as err:
            load_dataset("fashion_mnist", split, tmp_path / "root")
        assert "\n" not in str(err.value)
    assert len(no_fashion_mnist) == 1  # one wait on the network per process, not one per split


def test_downloaded_fashion_mnist_is_used_and_found_next_time(no_fashion_mnist, tmp_path):
    from fct.data import load_dataset

    no_fashion_mnist.fetch = True
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    cache = tmp_path / "home" / ".cache" / "fct" / "data"
    assert no_fashion_mnist == [(str(cache), True, True)]  # once: the test split was there
    assert (len(train), len(test), train.num_classes) == (12, 6, 10)
    assert (cache / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_fct_no_download_turns_the_attempt_off(no_fashion_mnist, monkeypatch, tmp_path):
    """FCT_NO_DOWNLOAD=1 (as every test runs): no attempt, the not-found line; --download
    still downloads."""
    from fct.data import load_dataset
    from fct.errors import FCTError

    monkeypatch.setenv("FCT_NO_DOWNLOAD", "1")
    with pytest.raises(FCTError, match="Fashion-MNIST not found; looked in") as err:
        load_dataset("fashion_mnist", "train", tmp_path / "root")
    assert "or --download (the automatic download is off: FCT_NO_DOWNLOAD is set)" in str(err.value)
    assert no_fashion_mnist == []
    with pytest.raises(FCTError, match="downloading Fashion-MNIST into .*/root failed"):
        load_dataset("fashion_mnist", "train", tmp_path / "root", download=True)
    assert no_fashion_mnist == [(str(tmp_path / "root"), True, True)]


def test_dataset_folder_with_the_wrong_layout(tmp_path, capsys):
    made = fabricate_imagenet(tmp_path / "data" / "imagenet", synsets=2, per_class=1, size=16)
    train = made.root / "train"
    for folder in [p for p in train.iterdir() if p.is_dir()]:  # flatten: no class folders
        for image in folder.iterdir():
            image.rename(train / image.name)
        folder.rmdir()
    cache = tmp_path / "cache"
    msg = fails(
        capsys,
        ["run", "imagenet", "--smoke", "--scenarios", "imagenet-half", "--data-root",
         str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--cache", str(cache)],
    )  # fmt: skip
    assert "imagenet-half' [old]: imagenet:" in msg
    assert f"{train} holds images but no class subfolders" in msg
    assert "expected ROOT/train/<synset>/*.JPEG" in msg
    assert nothing_trained(cache)


@pytest.mark.parametrize(
    "replace, argv, needle",
    [
        ({}, ["--scenarios", "half-clases"], "did you mean 'half-classes'"),
        ({'dataset = "synthetic"\narch': 'dataset = "synthetik"\narch'}, [],
         "unknown dataset 'synthetik' (did you mean 'synthetic'?)"),
        ({'arch = "test_resnet"': 'arch = "test_resnett"'}, [],
         "unknown timm architecture 'test_resnett' (did you mean 'test_resnet'?)"),
        ({}, ["--methods", "fct,fastfil"], "unknown method 'fastfil'"),
        ({}, ["--seeds", "0,one"], "--seeds takes distinct non-negative integers"),
        ({}, ["--device", "tpu"], "unknown device 'tpu'"),
    ],
)  # fmt: skip
def test_unknown_names(replace, argv, needle, tmp_path, capsys):
    suite = suite_file(tmp_path, replace)
    cache = tmp_path / "cache"
    argv = ["run", str(suite), "--out", str(tmp_path / "o"), "--cache", str(cache), *argv]
    assert needle in fails(capsys, argv)
    assert nothing_trained(cache)


def test_class_subset_larger_than_the_dataset(tmp_path, capsys):
    suite = suite_file(tmp_path, {"classes = [0, 10]": "classes = [0, 30]"})
    cache = tmp_path / "cache"
    msg = fails(capsys, ["run", str(suite), "--out", str(tmp_path / "o"), "--cache", str(cache)])
    assert msg == (
        "error: scenario 'half-classes' [old]: class subset 0..29 is larger than dataset "
        "synthetic with 20 classes; use a range within 0..19"
    )
    assert nothing_trained(cache)


def test_embedding_sizes_bct_cannot_handle(tmp_path, capsys):
    """A refused (scenario, method) pair is named before anything trains; the other pairs
    would still run (tests/e2e/test_runner.py), so only the refused one is selected here."""
    suite = suite_file(tmp_path, extra="new = { embedding_dim = 64 }\n")
    cache, out = tmp_path / "cache", tmp_path / "o"
    argv = ["run", str(suite), "--out", str(out), "--cache", str(cache), "--methods", "bct"]
    msg = fails(capsys, argv)
    assert "1 of 1 (scenario, method) pairs did not run" in msg and "half-classes/bct" in msg
    assert (
        "refused before training: BCT needs equal old and new embedding sizes (old 32, new 64); "
        "use fct or fct_side for cross-dimension scenarios" in msg
    )
    assert nothing_trained(cache)  # refused before the first training, not after


@pytest.fixture
def trained_cache(clean_tiny, tmp_path) -> Path:
    """A copy of the clean run's cache without its transformations (they train in ~1 s)."""
    cache = tmp_path / "cache"
    shutil.copytree(clean_tiny[1], cache)
    shutil.rmtree(cache / "transformations")
    return cache


def test_loss_turning_nan(tmp_path, capsys, trained_cache, one_thread):
    suite = suite_file(tmp_path, {"lr = 2e-3": "lr = 1e9"})  # the transformation's lr
    out, before = tmp_path / "o", entries(trained_cache)
    msg = fails(capsys, ["run", str(suite), "--out", str(out), "--cache", str(trained_cache)])
    # Both methods that train h fail; the summary names each with its reason (the log line
    # before it has the whole reason, ending "in the suite file and rerun").
    assert "2 of 4 (scenario, method) pairs did not run" in msg and "half-classes/fct" in msg
    assert (
        "loss became inf at epoch 1, step 2 while training h-test_resnet-synthetic-all-ce-32;"
        in msg
    )
    assert "lower the learning rate (now lr = 1000000000.0)" in msg
    # The records finished before the failure stay; so does every finished cache entry.
    assert sorted(p.name for p in (out / "runs" / "half-classes").iterdir()) == [
        "bct.json",
        "independent.json",
    ]
    assert set(before) <= set(entries(trained_cache))
    assert_cache_verifies(trained_cache)


@pytest.mark.parametrize("where", ["checkpoint", "record"])
def test_no_space_left_while_writing(
    where, tmp_path, capsys, monkeypatch, trained_cache, one_thread
):
    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "checkpoint":  # the transformation's first epoch checkpoint

        def save(*args, **kwargs):
            raise disk_full

        monkeypatch.setattr(safetensors.torch, "save", save)
    else:  # the second run record (bct.json), renamed into place by fct.io
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith("bct.json"):
                raise disk_full
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    out, before = tmp_path / "o", entries(trained_cache)
    methods = "independent,fct" if where == "checkpoint" else "independent,bct"
    argv = ["run", "tiny", "--out", str(out), "--cache", str(trained_cache), "--methods", methods]
    msg = fails(capsys, argv)
    if where == "checkpoint":  # a failed pair: named in the summary, the suite went on
        assert "no space left on device while checkpointing to " in msg
        assert "half-classes/fct" in msg
    else:  # a record that cannot be written stops the run
        assert "no space left on device while" in msg and "free disk space and rerun" in msg
    monkeypatch.undo()
    runs = out / "runs" / "half-classes"
    # The record finished first stays, and no temp file is left behind.
    assert [p.name for p in runs.iterdir()] == ["independent.json"]
    assert set(before) <= set(entries(trained_cache))
    assert_cache_verifies(trained_cache)


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_unwritable_folders(option, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = {"--out": str(tmp_path / "o"), "--cache": str(tmp_path / "cache")}
    argv[option] = str(blocker / "sub")  # a path under a regular file: works even as root
    msg = fails(capsys, ["run", "tiny", *[x for kv in argv.items() for x in kv]])
    assert str(blocker / "sub") in msg and "Not a directory" in msg
    assert ("choose another --out" if option == "--out" else "--cache or FCT_CACHE") in msg
    assert nothing_trained(tmp_path / "cache")


def test_environment_errors_escaping_the_checks_still_get_one_line(tmp_path, capsys, monkeypatch):
    """The CLI's net under the checks: a full disk or a permission error raised anywhere (a lock
    file, a library) is one line naming the path; any other OSError keeps its traceback."""
    import fct.runner

    def raise_(error):
        def run_suite(*args, **kwargs):
            raise error

        return run_suite

    argv = ["run", "tiny", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    lock = str(tmp_path / "c" / "locks" / "x.lock")
    monkeypatch.setattr(fct.runner, "run_suite", raise_(OSError(errno.ENOSPC, "full", lock)))
    msg = fails(capsys, argv)
    assert msg == (
        f"error: no space left on device ({lock}); free disk space and rerun the same command: "
        "finished work is kept"
    )
    monkeypatch.setattr(fct.runner, "run_suite", raise_(PermissionError(errno.EACCES, "no", lock)))
    assert f"no ({lock}); check that path" in fails(capsys, argv)
    monkeypatch.setattr(fct.runner, "run_suite", raise_(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        main(argv)


def test_a_reader_that_leaves_the_pipe_gets_no_traceback(capsys, monkeypatch):
    """`fct list methods | head -1`: writing to the closed pipe ends quietly with status 141
    (as a tool killed by SIGPIPE), not with a BrokenPipeError traceback."""
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list", "methods"]) == 141
    assert capsys.readouterr().err == ""
