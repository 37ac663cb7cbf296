"""The catalogue of bad inputs (docs/reliability.md): each is answered by ONE line
`error: ...` naming the fix, exit status 2, no traceback, and nothing already computed is lost.

Covered elsewhere, not repeated here: malformed suite TOML and bad suite values
(tests/test_suites.py: test_toml_syntax_error_names_the_line, test_suite_validation_errors),
an unknown suite and an unknown method, a plugin that fails to import
(tests/test_runner.py: test_unknown_suite, test_unknown_method_and_plugin_errors).
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

TINY = Path(__file__).resolve().parent.parent / "suites" / "tiny.toml"


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
    assert nothing_trained(cache)


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
    suite = suite_file(tmp_path, extra="new = { embedding_dim = 64 }\n")
    cache = tmp_path / "cache"
    msg = fails(capsys, ["run", str(suite), "--out", str(tmp_path / "o"), "--cache", str(cache)])
    assert msg == (
        "error: scenario 'half-classes', method bct: BCT needs equal old and new embedding sizes "
        "(old 32, new 64); use fct or fct_side for cross-dimension scenarios"
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
    assert "error: loss became" in msg and "while training h-test_resnet-synthetic-all-ce-32" in msg
    assert "lower the learning rate (now lr = 1000000000.0) in the suite file and rerun" in msg
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
