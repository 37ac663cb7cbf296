"""Hostile cache contents: every entry is checked against the slot it is loaded for, and every
file is read bounded, only if it is a regular file inside the entry (or checkpoint) folder.

Each case is crafted in ``tmp_path`` in the real on-disk layout (entries made by the cache
itself, checkpoints by the trainer), then damaged the way a swap, an edit, a planted symlink or
FIFO would. It must end as a rebuild with one warning line, or as a one-line FCTError naming
what the user must remove; never a traceback, a hang, an unbounded read, or a file followed out
of the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import entries, tiny_args, within

from fct.artifacts import Cache, Entry
from fct.errors import FCTError
from fct.train import OptimConfig, load_checkpoint, save_checkpoint, train

KEY_A = {"model": "m1", "data": {"dataset": "synthetic", "split": "test", "size": [32, 32]}}
KEY_B = {"model": "m2", "data": {"dataset": "synthetic", "split": "test", "size": [32, 32]}}


def builder(value: float, calls: list | None = None):
    """A build function whose artifact is four copies of ``value``."""

    def build(e: Entry):
        if calls is not None:
            calls.append(e.name)
        return {"w": torch.full((4,), float(value))}, {"value": value}

    return build


def put(cache: Cache, kind: str, name: str, key: dict, value: float) -> Entry:
    """A finished entry, written by the cache itself."""
    e = cache.entry(kind, name, key)
    _, _, built = cache.get_or_build(e, builder(value))
    assert built and e.path.is_dir()
    return e


def lookup(cache: Cache, e: Entry, value: float) -> tuple[torch.Tensor, bool]:
    """Look ``e`` up as a run would; a rebuild makes ``value``. Returns (tensor, built_now)."""
    tensors, meta, built = within(20, lambda: cache.get_or_build(e, builder(value)))
    assert isinstance(meta, dict)
    return tensors["w"], built


def damaged(caplog, path: Path, why: str) -> None:
    """The log has the one-line damage report of ``path``, giving ``why``."""
    lines = [x for x in caplog.text.splitlines() if f"cache entry {path} is damaged (" in x]
    assert len(lines) == 1, caplog.text
    assert why in lines[0] and lines[0].endswith("; rebuilding it"), lines[0]


def edit_manifest(e: Entry, change: Callable[[dict], object]) -> None:
    """Rewrite ``e``'s manifest with ``change`` applied (its return value replaces it if any)."""
    path = e.path / "manifest.json"
    manifest = json.loads(path.read_text())
    replaced = change(manifest)
    path.write_text(json.dumps(manifest if replaced is None else replaced))


def reseal(e: Entry) -> None:
    """Recompute the manifest's sums over the files as they are now (what a forger would do)."""

    def fix(m: dict) -> None:
        for f in ("tensors.safetensors", "meta.json"):
            data = (e.path / f).read_bytes()
            m["files"][f] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(e, fix)


def rebuilt_after(cache: Cache, e: Entry, caplog, why: str) -> None:
    """The damaged ``e`` is reported, moved aside and rebuilt, never loaded."""
    caplog.set_level("WARNING")
    w, built = lookup(cache, e, 7.0)
    assert built and torch.equal(w, torch.full((4,), 7.0))
    damaged(caplog, e.path, why)
    assert len(list((e.path.parent / ".corrupt").iterdir())) == 1
    # The rebuilt entry is sound and is now a plain hit.
    _, built = lookup(cache, e, 8.0)
    assert not built


# --- 1. an entry must be the one asked for -------------------------------------------------


def swap(a: Path, b: Path) -> None:
    """Exchange two entry folders, as a careless copy or a hostile edit would."""
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


@pytest.mark.parametrize("same_name", [True, False], ids=["same-name", "other-name"])
def test_swapped_entries_are_rebuilt_not_loaded(tmp_path, caplog, same_name):
    cache = Cache(tmp_path / "cache")
    a = put(cache, "features", "m-synthetic-test", KEY_A, 1.0)
    b = put(cache, "features", "m-synthetic-test" if same_name else "n-synthetic-test", KEY_B, 2.0)
    w, built = lookup(cache, a, 9.0)
    assert not built and torch.equal(w, torch.full((4,), 1.0))  # sound: a plain hit
    swap(a.path, b.path)

    caplog.set_level("WARNING")
    w, built = lookup(cache, a, 1.0)
    assert built and torch.equal(w, torch.full((4,), 1.0))  # rebuilt: b's features not used
    damaged(caplog, a.path, "not this folder")
    w, built = lookup(cache, b, 2.0)
    assert built and torch.equal(w, torch.full((4,), 2.0))
    damaged(caplog, b.path, "not this folder")
    assert len(list((a.path.parent / ".corrupt").iterdir())) == 2  # both kept for inspection


def test_swapped_feature_folders_of_a_real_run_are_rebuilt(clean_tiny, tmp_path, caplog):
    """Two feature entries of `fct run tiny` swapped: looked up with the keys the run used (as
    recorded in their meta.json), each is rebuilt, so no method can look compatible on the
    other model's features."""
    _, clean_cache, _ = clean_tiny
    root = tmp_path / "cache"
    shutil.copytree(clean_cache, root)
    cache = Cache(root)
    feats = [p for p in entries(root) if p.parent.name == "features"][:2]
    assert len(feats) == 2
    slots = []
    for p in feats:
        meta = json.loads((p / "meta.json").read_text())
        slots.append(cache.entry(meta["kind"], meta["name"], meta["key"]))
    assert [s.path for s in slots] == feats
    for s in slots:  # intact: loaded, not rebuilt
        tensors, _, built = cache.get_or_build(s, builder(0.0))
        assert not built and set(tensors) == {"features", "labels"}
    swap(*feats)

    caplog.set_level("WARNING")
    for s in slots:
        w, built = lookup(cache, s, 5.0)
        assert built and torch.equal(w, torch.full((4,), 5.0))
        damaged(caplog, s.path, "not this folder")


def _set_key(other: dict):
    def change(m: dict) -> None:
        m["key"] = other

    return change


def _claim_other_entry(m: dict) -> None:
    # A manifest that is internally consistent but describes another slot.
    m["key"], m["digest"] = KEY_B, Entry(Path("."), "features", "x", KEY_B).digest


def _drop_identity(m: dict) -> None:
    # What entries written before this check look like: sums only.
    for k in ("kind", "name", "key", "digest"):
        m.pop(k)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_drop_identity, "manifest records no key (an entry from an older version)"),
        (_set_key(KEY_B), "manifest's key does not hash to its digest"),
        (_set_key([1, 2]), "manifest's key is not a JSON object"),
        (_claim_other_entry, "not this folder"),
        (lambda m: m.update(kind=7), "kind, name or digest is missing or not a string"),
        (lambda m: m.update(kind="models"), "not this folder"),
        (lambda m: m.update(format=2), "manifest format 2, expected 1"),
    ],
    ids=[
        "old-entry-without-key",
        "edited-key",
        "key-a-list",
        "other-slot",
        "kind-an-int",
        "other-kind",
        "other-format",
    ],
)
def test_manifest_that_does_not_name_this_slot_is_rebuilt(tmp_path, caplog, change, why):
    cache = Cache(tmp_path / "cache")
    e = put(cache, "features", "x", KEY_A, 1.0)
    edit_manifest(e, change)
    rebuilt_after(cache, e, caplog, why)


def test_entry_copied_into_another_kind_is_rebuilt(tmp_path, caplog):
    """Same name and key under models/: the same digest, but the manifest says features."""
    cache = Cache(tmp_path / "cache")
    feats = put(cache, "features", "x", KEY_A, 1.0)
    model = cache.entry("models", "x", KEY_A)
    model.path.parent.mkdir(parents=True)
    shutil.copytree(feats.path, model.path)
    rebuilt_after(cache, model, caplog, "not this folder")


def test_a_key_that_does_not_survive_json_is_refused_up_front(tmp_path):
    with pytest.raises(FCTError, match=r"cache key of models/m does not survive a JSON round"):
        Cache(tmp_path).entry("models", "m", {"classes": {2: "a", 10: "b"}})


# --- 2. bounded reads: manifests, entry files, the move-aside folder, locks ---------------


def _manifest_replaced(make: Callable[[Path], None]):
    def change(e: Entry) -> None:
        m = e.path / "manifest.json"
        m.unlink()
        make(m)

    return change


def _manifest_files(value):
    def change(e: Entry) -> None:
        edit_manifest(e, lambda m: m.update(files=value))

    return change


def _manifest_file_entry(update):
    def change(e: Entry) -> None:
        edit_manifest(e, lambda m: update(m["files"]))

    return change


def _folder(m: Path) -> None:
    m.mkdir()
    (m / "manifest.json").write_text("{}")


HOSTILE_MANIFESTS = {
    "symlink-to-dev-zero": (
        _manifest_replaced(lambda m: m.symlink_to("/dev/zero")),
        "manifest.json is a symlink",
    ),
    "fifo": (_manifest_replaced(os.mkfifo), "manifest.json is not a regular file"),
    "folder": (_manifest_replaced(_folder), "manifest.json is a folder"),
    "a-list": (_manifest_replaced(lambda m: m.write_text("[]")), "manifest is not a JSON object"),
    "nested-200000-deep": (
        _manifest_replaced(lambda m: m.write_text("[" * 200_000)),
        "unreadable manifest",
    ),
    "files-an-int": (_manifest_files(5), "manifest has no file list"),
    "files-a-list": (_manifest_files(["tensors.safetensors"]), "manifest has no file list"),
    "files-null": (_manifest_files(None), "manifest has no file list"),
    "file-entry-a-string": (
        _manifest_file_entry(lambda f: f.update({"tensors.safetensors": "abc"})),
        "tensors.safetensors missing from the manifest",
    ),
    "bytes-a-string": (
        _manifest_file_entry(lambda f: f["meta.json"].update(bytes="12")),
        "manifest entry of meta.json is malformed",
    ),
    "bytes-true": (
        _manifest_file_entry(lambda f: f["meta.json"].update(bytes=True)),
        "manifest entry of meta.json is malformed",
    ),
    "sha256-an-int": (
        _manifest_file_entry(lambda f: f["tensors.safetensors"].update(sha256=12)),
        "manifest entry of tensors.safetensors is malformed",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
def test_hostile_manifest_is_rebuilt(tmp_path, caplog, case):
    damage, why = HOSTILE_MANIFESTS[case]
    cache = Cache(tmp_path / "cache")
    e = put(cache, "models", "m", KEY_A, 1.0)
    damage(e)
    rebuilt_after(cache, e, caplog, why)


@pytest.mark.parametrize("name", ["tensors.safetensors", "meta.json"])
def test_entry_file_symlinked_out_of_the_cache_is_not_followed(tmp_path, caplog, name):
    """A listed file replaced by a symlink to an identical copy outside the cache (so size and
    sha256 match when followed) is damage: the link is never followed, the target untouched."""
    cache = Cache(tmp_path / "cache")
    e = put(cache, "models", "m", KEY_A, 1.0)
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.copy(e.path / name, outside)
    data = outside.read_bytes()
    (e.path / name).unlink()
    (e.path / name).symlink_to(outside)
    rebuilt_after(cache, e, caplog, f"{name} is a symlink")
    assert outside.read_bytes() == data


def test_entry_folder_that_is_a_symlink_out_of_the_cache_is_not_followed(tmp_path, caplog):
    cache = Cache(tmp_path / "cache")
    e = put(cache, "models", "m", KEY_A, 1.0)
    outside = tmp_path / "elsewhere"
    shutil.move(e.path, outside)
    e.path.symlink_to(outside, target_is_directory=True)
    rebuilt_after(cache, e, caplog, "the entry is a symlink, not a folder")
    assert sorted(p.name for p in outside.iterdir()) == [
        "manifest.json",
        "meta.json",
        "tensors.safetensors",
    ]


def test_entry_that_is_a_file_is_rebuilt(tmp_path, caplog):
    cache = Cache(tmp_path / "cache")
    e = cache.entry("models", "m", KEY_A)
    e.path.parent.mkdir(parents=True)
    e.path.write_text("not an entry")
    rebuilt_after(cache, e, caplog, "the entry is not a folder")


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("meta.json", b"[]", "meta.json is not a JSON object"),
        ("tensors.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00not safe", "unloadable"),
    ],
    ids=["meta-a-list", "tensors-not-safetensors"],
)
def test_resealed_files_of_the_wrong_shape_are_rebuilt(tmp_path, caplog, name, content, why):
    """Sums that match (a forged manifest) do not make a file usable: a meta.json that is not
    an object, or tensors that safetensors cannot read, are damage too."""
    cache = Cache(tmp_path / "cache")
    e = put(cache, "models", "m", KEY_A, 1.0)
    (e.path / name).write_bytes(content)
    reseal(e)
    rebuilt_after(cache, e, caplog, why)


@pytest.mark.parametrize("what", ["file", "symlink-out"])
def test_move_aside_target_that_is_not_a_folder(tmp_path, caplog, what):
    """``KIND/.corrupt`` as a file, or as a symlink to a folder outside the cache: the damaged
    entry is still set aside inside the cache (never moved out of it) and rebuilt."""
    cache = Cache(tmp_path / "cache")
    e = put(cache, "models", "m", KEY_A, 1.0)
    (e.path / "tensors.safetensors").write_bytes(b"garbage")
    graveyard = e.path.parent / ".corrupt"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if what == "file":
        graveyard.write_text("not a folder")
    else:
        graveyard.symlink_to(outside, target_is_directory=True)
    rebuilt_after(cache, e, caplog, "tensors.safetensors has 7 bytes")
    assert graveyard.is_dir() and not graveyard.is_symlink()
    assert list(outside.iterdir()) == []


def _lock_path(cache: Cache, e: Entry) -> Path:
    return cache.root / "locks" / f"{e.digest}.lock"


def test_lock_path_that_is_a_folder_is_named_in_one_line(tmp_path):
    cache = Cache(tmp_path / "cache")
    e = put(cache, "models", "m", KEY_A, 1.0)
    lock = _lock_path(cache, e)
    lock.unlink()
    lock.mkdir()
    with pytest.raises(FCTError) as err:
        lookup(cache, e, 2.0)
    msg = str(err.value)
    assert f"cache lock {lock} is a folder" in msg and "remove it" in msg and "\n" not in msg
    assert (e.path / "manifest.json").is_file()  # the finished entry is kept


@pytest.mark.parametrize("what", ["symlink-out", "fifo", "locks-a-file"])
def test_other_unusable_lock_paths_are_named_in_one_line(tmp_path, what):
    cache = Cache(tmp_path / "cache")
    e = cache.entry("models", "m", KEY_A)
    lock = _lock_path(cache, e)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("keep me")
    if what == "locks-a-file":
        lock.parent.write_text("not a folder")
        named = lock.parent
    else:
        lock.parent.mkdir()
        if what == "fifo":
            os.mkfifo(lock)
        else:
            lock.symlink_to(outside)
        named = lock
    with pytest.raises(FCTError) as err:
        lookup(cache, e, 1.0)
    assert str(named) in str(err.value) and "\n" not in str(err.value)
    assert outside.read_text() == "keep me"
    assert not e.path.exists()


@pytest.mark.slow  # end to end: a whole `fct` command
def test_lock_folder_through_the_cli(clean_tiny, tmp_path, capsys):
    """`fct run` answers a folder in place of a lock with `error: ...`, exit status 2."""
    from fct.cli import main

    _, clean_cache, _ = clean_tiny
    # The first artifact `fct run tiny` builds (see test_concurrency.py).
    (first,) = [
        p
        for p in entries(clean_cache)
        if p.name.rsplit("-", 1)[0] == "test_resnet-synthetic-all-ce-32"
    ]
    cache = tmp_path / "cache"
    lock = cache / "locks" / f"{first.name.rsplit('-', 1)[1]}.lock"
    lock.mkdir(parents=True)
    assert main(tiny_args(tmp_path / "out", cache)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cache lock ") and "is a folder" in err[-1], err
    assert "Traceback" not in "\n".join(err)


# --- 2b. epoch checkpoints: state.json of the wrong shape, files out of the folder ---------


def _tiny_training():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return model, opt


def _set_state(change: Callable[[dict], object]):
    def damage(ckpt: Path, tmp_path: Path) -> Path:
        state = json.loads((ckpt / "state.json").read_text())
        replaced = change(state)
        (ckpt / "state.json").write_text(json.dumps(state if replaced is None else replaced))
        return ckpt

    return damage


def _epoch_beyond_the_training(ckpt: Path, tmp_path: Path) -> Path:
    # Epoch 7 of a 3-epoch training, in its own folder: consistent, but not this training's.
    _set_state(lambda s: s.update(epoch=7))(ckpt, tmp_path)
    return ckpt.rename(ckpt.with_name("epoch-0007"))


def _state_replaced(make: Callable[[Path], None]):
    def damage(ckpt: Path, tmp_path: Path) -> Path:
        (ckpt / "state.json").unlink()
        make(ckpt / "state.json")
        return ckpt

    return damage


def _model_file_symlinked_out(ckpt: Path, tmp_path: Path) -> Path:
    # An identical copy outside: its sum matches when followed.
    outside = tmp_path / "model.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    return ckpt


HOSTILE_STATES = {
    "empty-list": _set_state(lambda s: []),
    "epoch-a-string": _set_state(lambda s: s.update(epoch="1")),
    "epoch-true": _set_state(lambda s: s.update(epoch=True)),
    "epoch-mismatching-its-folder": _set_state(lambda s: s.update(epoch=2)),
    "epoch-beyond-the-training": _epoch_beyond_the_training,
    "optim-null": _set_state(lambda s: s.update(optim=None)),
    "scalars-a-list": _set_state(lambda s: s["optim"].update(scalars=[1])),
    "param-groups-of-ints": _set_state(lambda s: s["optim"].update(param_groups=[1])),
    "state-a-fifo": _state_replaced(os.mkfifo),
    "state-a-symlink-to-dev-zero": _state_replaced(lambda p: p.symlink_to("/dev/zero")),
    "model-symlinked-out": _model_file_symlinked_out,
}


@pytest.mark.parametrize("case", list(HOSTILE_STATES))
def test_hostile_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, case):
    model, opt = _tiny_training()
    folder = tmp_path / "partial"
    save_checkpoint(folder, 1, model, opt, {"loss": 0.5})
    ckpt = HOSTILE_STATES[case](folder / "epoch-0001", tmp_path)

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    start = {k: v.clone() for k, v in fresh.state_dict().items()}
    caplog.set_level("WARNING")
    assert within(20, lambda: load_checkpoint(folder, fresh, fresh_opt, max_epoch=3)) == 0
    assert f"checkpoint {ckpt} is damaged or unreadable" in caplog.text
    for k, v in fresh.state_dict().items():  # a fresh start: nothing half-restored
        assert torch.equal(v, start[k]), k
    assert fresh_opt.state_dict()["state"] == {}


@pytest.mark.parametrize("case", ["empty-list", "epoch-folder-a-file"])
def test_training_over_a_hostile_checkpoint_starts_over_cleanly(tmp_path, caplog, case):
    """train() itself: the damaged partial checkpoint is skipped, training starts over, ends
    with the weights of an uninterrupted run and leaves a sound checkpoint behind (of epoch 2:
    the last epoch of three writes none, its model is saved by the caller)."""
    cfg = OptimConfig("sgd", 0.05, 0.9, 0.0, epochs=3, warmup_epochs=0.0)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.randn(16, 3)

    def run(checkpoint_dir):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        result = train(
            model,
            lambda batch, net: torch.nn.functional.mse_loss(net(batch[0]), batch[1]),
            lambda epoch: [(x, y)],
            1,
            cfg,
            device=torch.device("cpu"),
            seed=0,
            desc="t",
            checkpoint_dir=checkpoint_dir,
        )
        return model, result

    ref, _ = run(None)
    folder = tmp_path / "partial"
    if case == "empty-list":
        model, opt = _tiny_training()
        save_checkpoint(folder, 1, model, opt, {"loss": 0.5})
        HOSTILE_STATES["empty-list"](folder / "epoch-0001", tmp_path)
    else:  # a file where epoch 2's checkpoint folder goes
        folder.mkdir()
        (folder / "epoch-0002").write_text("not a checkpoint")
    caplog.set_level("WARNING")
    model, result = run(folder)
    assert result.resumed_from == 0
    assert "is damaged or unreadable" in caplog.text
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert [p.name for p in folder.iterdir()] == ["epoch-0002"]
    assert (folder / "epoch-0002" / "state.json").is_file()
