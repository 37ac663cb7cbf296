"""fct.transform and fct.transform_models: a gallery on disk through h equals h in memory, resumes
from its records, and refuses bad input in one line before writing anything. The adapters' maps
(linear, residual MLP) saved to a file or fitted into the cache load to the same rows as the
fitted module; a query-side map is refused on a gallery and applied with ``queries``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from galleries import adapter_maps, gallery, in_memory, make_h

from fct.errors import FCTError
from fct.transform import STATE, assign, transform_gallery
from fct.transform_models import (
    load_artifact,
    save_adapter,
    save_cached,
    save_transformation,
)


@pytest.fixture
def h_file(tmp_path):
    h = make_h()
    return h, save_transformation(h, tmp_path / "h.safetensors")


def test_output_equals_h_in_memory(tmp_path, h_file):
    h, path = h_file
    arrays = gallery(tmp_path / "in", [200, 1, 0, 130])
    summary = transform_gallery(
        load_artifact(str(path)), tmp_path / "in", tmp_path / "out", batch=64
    )
    assert (summary.shards, summary.skipped, summary.rows) == (4, 0, 331)
    for i, x in enumerate(arrays):
        got = np.load(tmp_path / "out" / f"part{i:02d}.npy")
        assert got.dtype == np.float32 and got.shape == (len(x), 8)
        np.testing.assert_array_equal(got, in_memory(h, x))  # the same kernels, bit for bit
        with torch.no_grad():  # and h itself, unfolded, up to float rounding
            ref = h(torch.from_numpy(x)).numpy() if len(x) > 1 else got
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_float16_shards_give_float16_output(tmp_path, h_file):
    h, path = h_file
    (x,) = gallery(tmp_path / "in", [70], dtype=np.float16)
    transform_gallery(load_artifact(str(path)), tmp_path / "in", tmp_path / "out", batch=32)
    got = np.load(tmp_path / "out" / "part00.npy")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, in_memory(h, x, batch=32).astype(np.float16))


def test_side_information_shards(tmp_path):
    h = make_h(d_side=4)
    path = save_transformation(h, tmp_path / "h.safetensors")
    xs = gallery(tmp_path / "in", [50, 20])
    sides = gallery(tmp_path / "side", [50, 20], width=4, seed=1)
    mapper = load_artifact(str(path))
    assert (mapper.d_in, mapper.d_side, mapper.d_out) == (16, 4, 8)
    with pytest.raises(FCTError, match="pass --side DIR"):
        transform_gallery(mapper, tmp_path / "in", tmp_path / "out")
    transform_gallery(mapper, tmp_path / "in", tmp_path / "out", tmp_path / "side", batch=16)
    for i, (x, s) in enumerate(zip(xs, sides, strict=True)):
        got = np.load(tmp_path / "out" / f"part{i:02d}.npy")
        np.testing.assert_array_equal(got, in_memory(h, x, s, batch=16))


def test_assign_is_deterministic_and_balanced():
    # Hand-worked: by size 1 (50) -> rank 0, 2 (30) -> rank 1, 3 (30) -> rank 1 (30 < 50),
    # 0 (10) -> rank 0 (50 < 60).
    assert assign([10, 50, 30, 30], 2) == [[0, 1], [2, 3]]
    assert assign([5, 5, 5], 1) == [[0, 1, 2]]
    assert assign([1], 3) == [[0], [], []]
    rows = [int(r) for r in np.random.default_rng(0).integers(0, 1000, 37)]
    split = assign(rows, 4)
    assert sorted(i for part in split for i in part) == list(range(37))
    loads = [sum(rows[i] for i in part) for part in split]
    assert max(loads) - min(loads) <= max(rows)


def test_rerun_skips_finished_shards_and_redoes_changed_ones(tmp_path, h_file):
    _, path = h_file
    gallery(tmp_path / "in", [40, 40])
    mapper = load_artifact(str(path))
    transform_gallery(mapper, tmp_path / "in", tmp_path / "out")
    before = (tmp_path / "out" / "part00.npy").read_bytes()
    again = transform_gallery(mapper, tmp_path / "in", tmp_path / "out")
    assert (again.shards, again.skipped) == (0, 2)
    # A damaged output is redone, and comes back the same.
    (tmp_path / "out" / "part00.npy").write_bytes(before[:-4])
    # A rewritten input is redone too (its size or mtime changed).
    np.save(tmp_path / "in" / "part01.npy", np.ones((3, 16), np.float32))
    third = transform_gallery(mapper, tmp_path / "in", tmp_path / "out")
    assert (third.shards, third.skipped, third.rows) == (2, 0, 43)
    assert (tmp_path / "out" / "part00.npy").read_bytes() == before
    assert np.load(tmp_path / "out" / "part01.npy").shape == (3, 8)
    record = json.loads((tmp_path / "out" / STATE / "shards" / "part01.json").read_text())
    assert record["output"]["rows"] == 3 and record["source"]["input"]["bytes"] == os.path.getsize(
        tmp_path / "in" / "part01.npy"
    )


def test_other_weights_are_refused_in_the_same_folder(tmp_path, h_file):
    _, path = h_file
    gallery(tmp_path / "in", [10])
    transform_gallery(load_artifact(str(path)), tmp_path / "in", tmp_path / "out")
    other = save_transformation(make_h(seed=1), tmp_path / "other.safetensors")
    with pytest.raises(FCTError, match="other weights"):
        transform_gallery(load_artifact(str(other)), tmp_path / "in", tmp_path / "out")


# --- bad input: one line, nothing written ------------------------------------------------------


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not [p for p in out.rglob("*.npy")]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: None, "does not exist"),
        (lambda d: gallery(d, [5], width=15), "15 values but the model's gallery input is 16"),
        (lambda d: (gallery(d, [5]), (d / "notes.txt").write_text("x")), "is not a .npy shard"),
        (lambda d: (d.mkdir(), (d / "bad.npy").write_bytes(b"not numpy")), "not a readable .npy"),
        (lambda d: (d.mkdir(), np.save(d / "x.npy", np.zeros((3, 16), np.int64))), "int64"),
        (lambda d: (d.mkdir(), np.save(d / "x.npy", np.zeros(16, np.float32))), "2-D"),
        (lambda d: d.mkdir(), "holds no .npy shard"),
    ],
    ids=["missing", "width", "not-npy", "garbage", "dtype", "1-d", "empty"],
)
def test_bad_gallery_is_refused_before_writing(tmp_path, h_file, make, match):
    _, path = h_file
    make(tmp_path / "in")
    with pytest.raises(FCTError, match=match) as err:
        transform_gallery(load_artifact(str(path)), tmp_path / "in", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert _nothing_written(tmp_path / "out")


def test_nan_row_names_shard_and_row_and_keeps_finished_shards(tmp_path, h_file):
    _, path = h_file
    arrays = gallery(tmp_path / "in", [30, 30])
    arrays[1][17, 3] = np.nan
    np.save(tmp_path / "in" / "part01.npy", arrays[1])
    with pytest.raises(FCTError, match=r"part01.npy row 17 holds NaN"):
        transform_gallery(load_artifact(str(path)), tmp_path / "in", tmp_path / "out", batch=8)
    assert (tmp_path / "out" / "part00.npy").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [STATE, "part00.npy"]


def test_a_failed_write_on_the_writer_thread_keeps_finished_shards(tmp_path, h_file, monkeypatch):
    """A full disk in the middle of a shard (raised on the writer thread): one line naming the
    file and the fix, the finished shard kept, no partial or temp file left, and a rerun writes
    the bytes of an undisturbed run."""
    import builtins
    import errno

    _, path = h_file
    gallery(tmp_path / "in", [30, 30])
    clean = tmp_path / "clean"
    transform_gallery(load_artifact(str(path)), tmp_path / "in", clean, batch=8)

    class Full:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by its caller)
        return Full(fh) if "part01" in str(file) and "w" in mode else fh

    monkeypatch.setattr("fct.transform.open", fake_open, raising=False)
    out = tmp_path / "out"
    with pytest.raises(FCTError, match=r"no space left on device while writing .*part01\.npy"):
        transform_gallery(load_artifact(str(path)), tmp_path / "in", out, batch=8)
    assert sorted(p.name for p in out.iterdir()) == [STATE, "part00.npy"]
    monkeypatch.undo()
    summary = transform_gallery(load_artifact(str(path)), tmp_path / "in", out, batch=8)
    assert (summary.shards, summary.skipped) == (1, 1)
    for name in ("part00.npy", "part01.npy"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()


def test_output_inside_input_is_refused(tmp_path, h_file):
    _, path = h_file
    gallery(tmp_path / "in", [5])
    for out in (tmp_path / "in" / "out", tmp_path / "in"):
        with pytest.raises(FCTError, match="inside the --in folder"):
            transform_gallery(load_artifact(str(path)), tmp_path / "in", out)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["part00.npy"]


def test_side_shards_must_match(tmp_path):
    path = save_transformation(make_h(d_side=4), tmp_path / "h.safetensors")
    mapper = load_artifact(str(path))
    gallery(tmp_path / "in", [10, 10])
    gallery(tmp_path / "side", [10, 9], width=4)
    with pytest.raises(FCTError, match="has 9 rows but .* has 10"):
        transform_gallery(mapper, tmp_path / "in", tmp_path / "out", tmp_path / "side")
    (tmp_path / "side" / "part01.npy").unlink()
    with pytest.raises(FCTError, match="no side-information shard"):
        transform_gallery(mapper, tmp_path / "in", tmp_path / "out", tmp_path / "side")
    assert _nothing_written(tmp_path / "out")


# --- artifacts --------------------------------------------------------------------------------


def test_unknown_and_uninterpretable_artifacts(tmp_path):
    with pytest.raises(FCTError, match="unknown artifact 'nope'"):
        load_artifact("nope", tmp_path / "cache")
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(make_h().state_dict(), str(bare))
    with pytest.raises(FCTError, match="does not say what it holds"):
        load_artifact(str(bare))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(FCTError, match="not a readable safetensors file"):
        load_artifact(str(tmp_path / "junk.safetensors"))
    # A sidecar JSON describes a bare file; a wrong description is one line.
    (tmp_path / "bare.json").write_text(
        json.dumps(
            {
                "kind": "transformation",
                "config": {"d_old": 16, "d_new": 8, "d_side": 0, "hidden": 32},
            }
        )
    )
    assert load_artifact(str(bare)).d_out == 8
    (tmp_path / "bare.json").write_text(
        json.dumps(
            {
                "kind": "transformation",
                "config": {"d_old": 16, "d_new": 9, "d_side": 0, "hidden": 32},
            }
        )
    )
    with pytest.raises(FCTError, match="not an FCT transformation"):
        load_artifact(str(bare))
    (tmp_path / "bare.json").write_text(json.dumps({"kind": "pca", "config": {}}))
    with pytest.raises(FCTError, match="unknown artifact kind 'pca'"):
        load_artifact(str(bare))


def test_cache_entries_are_listed_and_loaded(tmp_path):
    from fct.artifacts import Cache
    from fct.transform_models import cached_transformations

    h = make_h()
    cache = Cache(tmp_path / "cache")
    entry = cache.entry("transformations", "h-new", {"h": {"hidden": 32}, "side": None, "seed": 0})
    entry.save(h.state_dict(), {"train_seconds": 1.5})
    listed = cached_transformations(tmp_path / "cache")
    assert listed == [(entry.path.name, "h 16->8, hidden 32, trained 2 s")]
    mapper = load_artifact(entry.path.name, tmp_path / "cache")
    (x,) = gallery(tmp_path / "in", [25])
    transform_gallery(mapper, tmp_path / "in", tmp_path / "out")
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "part00.npy"), in_memory(h, x, batch=4096)
    )
    # A damaged entry is not listed and not loaded.
    (entry.path / "tensors.safetensors").write_bytes(b"x")
    assert cached_transformations(tmp_path / "cache") == []
    with pytest.raises(FCTError, match="unknown artifact"):
        load_artifact(entry.path.name, tmp_path / "cache")


# --- the adapters' maps -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(adapter_maps()))
def test_adapter_maps_saved_and_loaded_give_the_fitted_rows(tmp_path, name):
    module, kind = adapter_maps()[name]
    d_in, d_out = module.config()["d_in"], module.config()["d_out"]
    path = save_adapter(module, tmp_path / "m.safetensors", "gallery", name)
    mapper = load_artifact(str(path))
    assert (mapper.kind, mapper.d_in, mapper.d_side, mapper.d_out) == (kind, d_in, 0, d_out)
    assert mapper.direction == "gallery"
    x = torch.randn(57, d_in)
    with torch.no_grad():
        want = module(x)
    assert torch.equal(mapper(x), want)
    # Through fct transform: shards of 40 and 17 rows, one batch each.
    xs = gallery(tmp_path / "in", [40, 17], width=d_in)
    transform_gallery(mapper, tmp_path / "in", tmp_path / "out")
    for i, a in enumerate(xs):
        got = np.load(tmp_path / "out" / f"part{i:02d}.npy")
        with torch.no_grad():
            ref = module(torch.from_numpy(a)).numpy()
        np.testing.assert_array_equal(got, ref)


def test_query_side_maps_are_refused_on_a_gallery_and_applied_with_queries(tmp_path):
    module, _ = adapter_maps()["affine"]
    query = load_artifact(str(save_adapter(module, tmp_path / "q.safetensors", "query", "aff")))
    (x,) = gallery(tmp_path / "in", [30])
    with pytest.raises(
        FCTError, match='maps new queries into the old space.*direction = "gallery"'
    ):
        transform_gallery(query, tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    transform_gallery(query, tmp_path / "in", tmp_path / "out", queries=True)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "part00.npy"), want, rtol=0, atol=1e-6)
    gallery_side = load_artifact(str(save_adapter(module, tmp_path / "g.safetensors")))
    with pytest.raises(FCTError, match="not queries; drop --queries"):
        transform_gallery(gallery_side, tmp_path / "in", tmp_path / "out2", queries=True)


def test_bad_adapter_files_are_one_line(tmp_path):
    module, _ = adapter_maps()["mlp_adapter"]
    path = save_adapter(module, tmp_path / "m.safetensors")
    for config, match in [
        ({"d_in": 16, "d_out": 8, "hidden": 5, "skip": True}, "not a residual_mlp map"),
        ({"d_in": 16, "d_out": 8, "hidden": 6, "skip": "yes"}, "'skip' must be true or false"),
        ({"d_in": 16, "d_out": 8, "hidden": 6, "skip": True, "direction": "up"}, "'direction'"),
        ({"d_in": 0, "d_out": 8, "hidden": 6, "skip": True}, "'d_in' must be an integer"),
    ]:
        bare = tmp_path / "bare.safetensors"
        from safetensors.torch import save_file

        save_file(module.state_dict(), str(bare))
        (tmp_path / "bare.json").write_text(json.dumps({"kind": "residual_mlp", "config": config}))
        with pytest.raises(FCTError, match=match):
            load_artifact(str(bare))
    assert load_artifact(str(path)).d_out == 8


def test_a_cached_adapter_map_loads_by_name_and_saves_to_a_file(tmp_path):
    from fct.artifacts import Cache
    from fct.transform_models import cached_transformations

    module, _ = adapter_maps()["mlp_adapter"]
    entry = Cache(tmp_path / "cache").entry("transformations", "mlp-new", {"adapter": "mlp"})
    config = {**module.config(), "direction": "gallery", "method": "mlp"}
    entry.save(
        module.state_dict(),
        {"train_seconds": 0.25, "fit_rows": 9, "map": {"kind": "residual_mlp", "config": config}},
    )
    assert cached_transformations(tmp_path / "cache") == [
        (
            entry.path.name,
            "adapter mlp, gallery side (maps the gallery old->new), residual_mlp 16->8, "
            "hidden 6, fit 0.25 s",
        )
    ]
    x = torch.randn(21, 16)
    with torch.no_grad():
        want = module(x)
    by_name = load_artifact(entry.path.name, tmp_path / "cache")
    assert by_name.kind == "residual_mlp" and torch.equal(by_name(x), want)
    path = save_cached(entry.path.name, tmp_path / "m.safetensors", tmp_path / "cache")
    assert torch.equal(load_artifact(str(path))(x), want)
    with pytest.raises(FCTError, match="no transformation 'nope'"):
        save_cached("nope", tmp_path / "n.safetensors", tmp_path / "cache")
