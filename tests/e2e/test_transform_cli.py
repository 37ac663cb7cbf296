"""`fct transform` from the command line: killed with SIGKILL and rerun, it ends with the bytes of
an uninterrupted run; bad input is one line and exit 2; under torchrun each rank writes its share;
an adapter fitted by `fct run` on stored embeddings is listed and applied by name (a query-side
one refused on a gallery in one line)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, fct_env, run_fct
from galleries import gallery, make_h
from stored_embeddings import make_arrays, write_suite
from test_crash import run_until

from fct.distributed import torchrun_command
from fct.transform_models import save_transformation


@pytest.fixture
def setup(tmp_path):
    """A 64 -> 32 h and a gallery of 6 shards of 12,000 rows (a second or so of work)."""
    path = save_transformation(make_h(64, 32, 0, 256), tmp_path / "h.safetensors")
    gallery(tmp_path / "in", [12_000] * 6, width=64)
    return path


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


def test_killed_then_rerun_gives_the_bytes_of_a_clean_run(tmp_path, setup):
    args = ["transform", "--model", str(setup), "--in", str(tmp_path / "in"), "--batch", "1000"]
    clean = run_fct(*args, "--out", str(tmp_path / "clean"), cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert "transformed 72,000 rows in 6 shards (0 already done" in clean.stdout
    assert "rows/s" in clean.stdout
    out = ["--out", str(tmp_path / "out")]
    for marker in (r"part00.npy: 12000 rows", r"part03.npy: 12000 rows"):
        run_until([*args, *out], tmp_path, marker)
    rerun = run_fct(*args, *out, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already done, skipped" in rerun.stdout and "(0 already done" not in rerun.stdout
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "break_it, match",
    [
        (
            lambda d, m: (d / "in" / "part02.npy").unlink() or ["--in", str(d / "nope")],
            "does not exist",
        ),
        (lambda d, m: ["--model", "unknown-0123"], "unknown artifact 'unknown-0123'"),
        (
            lambda d, m: (np.save(d / "in" / "part05.npy", np.zeros((4, 63), np.float32)), [])[1],
            "63 values",
        ),
        (lambda d, m: ((d / "in" / "README").write_text("x"), [])[1], "is not a .npy shard"),
        (lambda d, m: ["--out", str(d / "in" / "sub")], "inside the --in folder"),
    ],
    ids=["missing-folder", "unknown-artifact", "width", "not-npy", "out-inside-in"],
)
def test_bad_input_is_one_line_exit_2(tmp_path, setup, break_it, match):
    more = break_it(tmp_path, setup)
    base = {"--model": str(setup), "--in": str(tmp_path / "in"), "--out": str(tmp_path / "out")}
    for flag, value in zip(more[::2], more[1::2], strict=True):
        base[flag] = value
    argv = ["transform", *(x for kv in base.items() for x in kv)]
    proc = run_fct(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert not list((tmp_path / "out").glob("*.npy")) if (tmp_path / "out").exists() else True


def test_torchrun_ranks_write_their_share(tmp_path):
    path = save_transformation(make_h(), tmp_path / "h.safetensors")
    gallery(tmp_path / "in", [300, 50, 200, 100, 120])
    args = ["transform", "--model", str(path), "--in", str(tmp_path / "in")]
    one = run_fct(*args, "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        torchrun_command(2, ["-m", "fct", *args, "--out", str(tmp_path / "two")]),
        cwd=tmp_path,
        env=fct_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # assign([300, 50, 200, 100, 120], 2), by size: 300 -> rank 0, 200 -> 1, 120 -> 1,
    # 100 -> 0 (300 < 320), 50 -> 1 (320 < 400).
    assert "rank 0: transformed 400 rows in 2 shards" in two.stdout
    assert "rank 1: transformed 370 rows in 3 shards" in two.stdout
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")


def test_list_transformations_then_transform_by_name(tmp_path):
    from fct.artifacts import Cache

    empty = run_fct("list", "transformations", "--cache", str(tmp_path / "none"), cwd=tmp_path)
    assert empty.returncode == 2 and "no trained transformation in" in empty.stderr
    entry = Cache(tmp_path / "cache").entry("transformations", "h-new", {"side": None, "h": {}})
    entry.save(make_h().state_dict(), {"train_seconds": 3.2})
    listed = run_fct("list", "transformations", "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == f"{entry.path.name}  h 16->8, hidden 32, trained 3 s"
    gallery(tmp_path / "in", [10])
    args = ["--in", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    proc = run_fct(
        "transform",
        "--model",
        entry.path.name,
        "--cache",
        str(tmp_path / "cache"),
        *args,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"transformation 16->8 from cache entry transformations/{entry.path.name}" in proc.stdout


def test_an_adapter_fitted_by_fct_run_is_listed_and_transforms_a_gallery(tmp_path):
    from fct.methods.adapters import affine

    train = make_arrays(240, d_old=16, d_new=24, seed=0)
    suite = write_suite(
        tmp_path,
        ["affine_g", "affine_q"],
        train,
        make_arrays(120, d_old=16, d_new=24, seed=1),
        extra=(
            '[methods.affine_g]\nbase = "affine"\ndirection = "gallery"\n'
            '[methods.affine_q]\nbase = "affine"\ndirection = "query"\n'
        ),
    )
    cache = str(tmp_path / "cache")
    res = str(tmp_path / "res")
    ran = run_fct("run", str(suite), "--out", res, "--cache", cache, "--no-plots", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    listed = run_fct("list", "transformations", "--cache", cache, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = dict(line.split("  ", 1) for line in listed.stdout.strip().splitlines())
    (g_name,) = [n for n in lines if n.startswith("affine_g-new-train-")]
    (q_name,) = [n for n in lines if n.startswith("affine_q-new-train-")]
    assert lines[g_name].startswith("adapter affine_g (affine), gallery side (maps the gallery")
    assert "linear 16->24, fit " in lines[g_name]
    assert lines[q_name].startswith("adapter affine_q (affine), query side (maps queries new->old)")
    # The record names the entry it deployed.
    rec = json.loads((tmp_path / "res/runs/pair/affine_g.json").read_text())
    digest = rec["artifacts"]["transformations/affine_g-new-train"]
    assert g_name == f"affine_g-new-train-{digest}"

    xs = gallery(tmp_path / "shards", [50, 9], width=16)
    args = ["--cache", cache, "--in", str(tmp_path / "shards")]
    done = run_fct(
        "transform", "--model", g_name, *args, "--out", str(tmp_path / "out"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"linear 16->24 from cache entry transformations/{g_name}" in done.stdout
    # The same map fitted here, in memory, from the training file (old -> new, ridge 1e-3).
    m = affine(
        torch.from_numpy(train["old"]).double(), torch.from_numpy(train["new"]).double(), 1e-3
    )
    for i, x in enumerate(xs):
        got = np.load(tmp_path / "out" / f"part{i:02d}.npy")
        want = m(torch.from_numpy(x)).numpy()
        assert got.shape == (len(x), 24)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # fitted in two processes

    refused = run_fct(
        "transform", "--model", q_name, *args, "--out", str(tmp_path / "q"), cwd=tmp_path
    )
    assert refused.returncode == 2
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in refused.stderr
    assert "maps new queries into the old space, not the gallery" in err[0]
    assert 'direction = "gallery"' in err[0]
    assert not (tmp_path / "q").exists()
    # With --queries the query-side map takes a folder of new-model queries to the old space.
    (q,) = gallery(tmp_path / "queries", [11], width=24, seed=2)
    more = ["--in", str(tmp_path / "queries"), "--out", str(tmp_path / "q"), "--queries"]
    mapped = run_fct("transform", "--model", q_name, "--cache", cache, *more, cwd=tmp_path)
    assert mapped.returncode == 0, mapped.stderr[-2000:]
    mq = affine(
        torch.from_numpy(train["new"]).double(), torch.from_numpy(train["old"]).double(), 1e-3
    )
    want = mq(torch.from_numpy(q)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "q" / "part00.npy"), want, rtol=0, atol=1e-6)
