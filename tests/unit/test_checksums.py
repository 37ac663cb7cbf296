"""fct.io.check_sums: the one check of a checksummed folder (cache entries, epoch checkpoints)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fct.io import check_sums


def _folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, int]]]:
    folder = tmp_path / "entry"
    folder.mkdir()
    sums = {}
    for name, data in (("a.bin", b"alpha" * 100), ("b.json", b'{"k": 1}')):
        (folder / name).write_bytes(data)
        sums[name] = (hashlib.sha256(data).hexdigest(), len(data))
    return folder, sums


def test_a_sound_folder_passes_with_and_without_sizes(tmp_path: Path) -> None:
    folder, sums = _folder(tmp_path)
    assert check_sums(folder, sums, only=("a.bin", "b.json")) is None
    assert check_sums(folder, {k: (sha, None) for k, (sha, _) in sums.items()}) is None


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: (f / "a.bin").write_bytes(b"alphA" + b"alpha" * 99), "a.bin checksum mismatch"),
        (lambda f: (f / "a.bin").write_bytes(b"alpha"), "a.bin has 5 bytes, 500 recorded"),
        (lambda f: (f / "b.json").unlink(), "b.json missing"),
        (lambda f: (f / "model.pt").write_bytes(b"x"), "unexpected file model.pt"),
        (
            lambda f: ((f / "a.bin").unlink(), (f / "a.bin").symlink_to("/dev/zero")),
            "a.bin is a symlink",
        ),
        (lambda f: ((f / "a.bin").unlink(), os.mkfifo(f / "a.bin")), "a.bin is not a regular file"),
        (lambda f: ((f / "a.bin").unlink(), (f / "a.bin").mkdir()), "a.bin is a folder"),
    ],
)
def test_every_kind_of_damage_is_named(tmp_path: Path, damage, expected: str) -> None:
    folder, sums = _folder(tmp_path)
    damage(folder)
    assert check_sums(folder, sums, only=("a.bin", "b.json")) == expected


def test_without_sizes_a_changed_length_is_still_a_checksum_mismatch(tmp_path: Path) -> None:
    folder, sums = _folder(tmp_path)
    (folder / "a.bin").write_bytes(b"alpha")
    assert check_sums(folder, {k: (sha, None) for k, (sha, _) in sums.items()}) == (
        "a.bin checksum mismatch"
    )
    (folder / "extra").write_bytes(b"")  # without ``only``, other files are not looked at
    (folder / "a.bin").write_bytes(b"alpha" * 100)
    assert check_sums(folder, {k: (sha, None) for k, (sha, _) in sums.items()}) is None
