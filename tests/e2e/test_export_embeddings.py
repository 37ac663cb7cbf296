"""`fct export-embeddings`: an image scenario's embeddings written as stored-embedding files
(the cached models' embeddings, exactly), and the suite it writes runs them."""

from __future__ import annotations

import json

import numpy as np
import torch

from fct.artifacts import Cache
from fct.cli import main
from fct.context import Context
from fct.scenarios import SUITES_DIR, load_suite
from fct.session import Role, Session


def test_export_then_run_the_written_suite(tmp_path, capsys):
    out, cache = tmp_path / "emb", tmp_path / "cache"
    argv = ["export-embeddings", str(SUITES_DIR / "tiny.toml"), "--scenario", "half-classes"]
    assert main([*argv, "--out", str(out), "--cache", str(cache), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "train.npz"), str(out / "eval.npz"), str(out / "suite.toml")]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # The files hold exactly the cached models' embeddings.
    sc = load_suite("tiny").scenarios[0]
    ctx = Context(sc, session=Session(Cache(cache), device=torch.device("cpu")))
    with np.load(out / "eval.npz") as f:
        assert set(f.files) == {"old", "new", "labels", "side"}
        x, y = ctx.embed(ctx.old_model(), Role.EVAL)
        np.testing.assert_array_equal(f["old"], x.numpy())
        np.testing.assert_array_equal(f["labels"], y.numpy())
        np.testing.assert_array_equal(f["new"], ctx.embed(ctx.new_model(), Role.EVAL)[0].numpy())
        np.testing.assert_array_equal(f["side"], ctx.embed(ctx.side_model(), Role.EVAL)[0].numpy())
    with np.load(out / "train.npz") as f:
        assert len(f["old"]) == len(ctx.embed(ctx.old_model(), Role.NEW_TRAIN)[0])
    # The written suite runs on them.
    results = tmp_path / "results"
    code = main(
        ["run", str(out / "suite.toml"), "--methods", "independent,affine,fct_side",
         "--out", str(results), "--cache", str(cache), "--device", "cpu", "--no-plots"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recs = {p.stem: json.loads(p.read_text()) for p in (results / "runs").rglob("*.json")}
    assert set(recs) == {"independent", "affine", "fct_side"}
    # The stored new/new is the image scenario's new/new: the same vectors, the same metrics.
    assert recs["affine"]["scenario_config"]["embeddings"]["eval"] == "eval.npz"


def test_export_refusals(tmp_path, capsys):
    base = ["export-embeddings", str(SUITES_DIR / "tiny.toml"), "--out", str(tmp_path / "o")]
    assert main([*base, "--scenario", "nope", "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no scenario 'nope'" in err[0] and "half-classes" in err[0]
    assert not (tmp_path / "o").exists()
    assert (
        main(
            [
                *base,
                "--scenario",
                "half-classes",
                "--method",
                "nope",
                "--cache",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
