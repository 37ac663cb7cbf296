"""`fct run` with a query set apart from the gallery ([eval] query_split / gallery_split /
query_fraction): the records' cases, flip rates and curves against a brute-force loop on the
same (cached) embeddings, on the synthetic tiny suite and on a tiny fake Fashion-MNIST."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import write_fashion
from sklearn.metrics import average_precision_score

from fct.artifacts import Cache
from fct.cli import main
from fct.context import Context
from fct.embedding import apply_transformation
from fct.retrieval import distance_blocks
from fct.scenarios import SUITES_DIR, load_suite
from fct.session import Role, Session

TINY = SUITES_DIR / "tiny.toml"


def brute(q, ql, g, gl) -> dict:
    """top-1 (stable order), mAP (scikit-learn's AP), per-query hits and scored flags, one
    query at a time. The distances are fct.retrieval's float32 ones: on these barely trained
    models many distances differ by less than float32 resolves (relative gaps of 1e-9), so
    float64 distances would order them otherwise; what is checked is which embeddings are
    queries and gallery, and the metrics over them."""
    d_all = np.concatenate(
        [b.numpy().copy() for _, b in distance_blocks(q.float().numpy(), g.float().numpy())]
    )
    ql, gl = ql.numpy(), gl.numpy()
    rel = gl[None, :] == ql[:, None]
    scored = rel.any(axis=1)
    hits = np.zeros(len(q), bool)
    for i in np.flatnonzero(scored):
        hits[i] = rel[i, np.argsort(d_all[i], kind="stable")[0]]
    # scikit-learn's AP of each scored query (one row each), averaged over them.
    m_ap = average_precision_score(rel[scored], -d_all[scored], average="samples")
    return {
        "top1": 100 * hits[scored].mean(),
        "mAP": 100 * m_ap,
        "n_query": int(scored.sum()),
        "n_skipped": int((~scored).sum()),
        "hits": hits,
        "scored": scored,
    }


def check_against_brute_force(suite: str, out: Path, cache: Path, data_root=None) -> dict:
    """Recompute old/old, new/new and cross (Independent and FCT) of every scenario from the
    cached embeddings, by brute force; compare with the records. Returns the records."""
    recs = {}
    for sc in load_suite(suite).scenarios:
        session = Session(Cache(cache), device=torch.device("cpu"), seed=0, data_root=data_root)
        ctx = Context(sc, session=session)
        old = ctx.old_model()
        old_q, ql = ctx.embed(old, Role.QUERY)
        old_g, gl = ctx.embed(old, Role.EVAL)
        before = brute(old_q, ql, old_g, gl)
        for method in ("independent", "fct"):
            rec = json.loads((out / "runs" / sc.name / f"{method}.json").read_text())
            recs[(sc.name, method)] = rec
            dep = sc.method(method).fit(ctx)  # everything from the cache
            new_q, _ = ctx.embed(dep.query_model, Role.QUERY)
            new_g, _ = ctx.embed(dep.query_model, Role.EVAL)
            gallery = old_g
            if dep.transformation is not None:
                gallery = apply_transformation(dep.transformation.module, old_g, None, ctx.device)[
                    0
                ]
            cases = {
                "old/old": before,
                "new/new": brute(new_q, ql, new_g, gl),
                "cross": brute(new_q, ql, gallery, gl),
            }
            for case, want in cases.items():
                got = rec["cases"][case]
                assert got["n_gallery"] == len(gl), case
                assert (got["n_query"], got["n_skipped"]) == (want["n_query"], want["n_skipped"])
                assert got["top1"] == pytest.approx(want["top1"], abs=1e-3), (method, case)
                assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-3), (method, case)
            flips = cases["cross"]
            valid = before["scored"] & flips["scored"]
            n = valid.sum()
            nfr = 100 * (before["hits"] & ~flips["hits"] & valid).sum() / n
            pfr = 100 * (~before["hits"] & flips["hits"] & valid).sum() / n
            assert rec["cases"]["cross"]["nfr"] == pytest.approx(nfr, abs=1e-3)
            assert rec["cases"]["cross"]["pfr"] == pytest.approx(pfr, abs=1e-3)
            # The curves backfill the gallery: the first point is the cross case, the last
            # the new/new case, and so are their flip rates.
            curve = rec["backfill_curves"]
            assert curve["top1"]["random"][0] == rec["cases"]["cross"]["top1"]
            assert curve["top1"]["random"][-1] == rec["cases"]["new/new"]["top1"]
            assert curve["nfr"]["random"][0] == rec["cases"]["cross"]["nfr"]
            assert rec["curves"]["random"][0] == rec["cases"]["cross"]["mAP"]
    return recs


def suite_with(tmp_path: Path, eval_keys: str, name: str = "suite.toml") -> Path:
    text = TINY.read_text().replace(
        '[defaults.eval]\ndataset = "synthetic"',
        f'[defaults.eval]\ndataset = "synthetic"\n{eval_keys}',
    )
    text = text.replace(
        'methods = ["independent", "bct", "fct", "fct_side"]', 'methods = ["independent", "fct"]'
    )
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def shared_cache(clean_tiny, tmp_path_factory) -> Path:
    """A copy of the clean run's cache: tiny's models, trained once (conftest.clean_tiny)."""
    cache = tmp_path_factory.mktemp("query-sets") / "cache"
    shutil.copytree(clean_tiny[1], cache)
    return cache


@pytest.mark.parametrize(
    "keys, sizes",
    [
        ('query_split = "train"', (1280, 320)),  # queries: train; gallery: test
        ('query_split = "test"\ngallery_split = "train"', (320, 1280)),
        ("query_fraction = 0.25", (80, 240)),
    ],
)
def test_a_query_set_apart_matches_a_brute_force_loop(
    keys, sizes, tmp_path, shared_cache, one_thread
):
    suite = suite_with(tmp_path, keys)
    out = tmp_path / "out"
    code = main(
        ["run", str(suite), "--out", str(out), "--cache", str(shared_cache), "--device", "cpu"]
        + ["--no-plots"]  # the records against the brute force; plots are tested elsewhere
    )
    assert code == 0
    recs = check_against_brute_force(str(suite), out, shared_cache)
    rec = recs[("half-classes", "fct")]
    cross = rec["cases"]["cross"]
    assert (cross["n_query"] + cross["n_skipped"], cross["n_gallery"]) == sizes
    for key, value in (("query_split", None), ("query_fraction", None)):
        if key in keys:
            assert key in rec["scenario_config"]["eval"]
        else:
            assert rec["scenario_config"]["eval"].get(key) is value


def test_bad_query_spec_is_one_line_before_training(tmp_path, capsys):
    suite = suite_with(tmp_path, "query_fraction = 1.2")
    cache = tmp_path / "cache"
    code = main(["run", str(suite), "--out", str(tmp_path / "o"), "--cache", str(cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "query_fraction must lie in (0, 1)" in err[0]
    assert not cache.exists() or not any(cache.iterdir())


FASHION_SUITE = """
[suite]
name = "fake-fashion"
description = "a tiny fake Fashion-MNIST: test queries against a train gallery"
methods = ["independent", "fct"]

[defaults.model]
arch = "test_resnet"
small_stem = false
embedding_dim = 16
epochs = 1
batch_size = 32
lr = 0.05
warmup_epochs = 0.5
image_size = 16

[defaults.old]
classes = [0, 5]

[defaults.transformation]
hidden = 32
epochs = 2
batch_size = 64
warmup_epochs = 0.5

[defaults.eval]
query_split = "test"
gallery_split = "train"

[[scenario]]
name = "split-queries"
side_info = false
"""


def test_fake_fashion_mnist_test_queries_against_the_train_gallery(tmp_path, one_thread):
    root = tmp_path / "fm"
    arrays = write_fashion(root, n=(150, 60), seed=3)
    suite = tmp_path / "fashion.toml"
    suite.write_text(FASHION_SUITE)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["run", str(suite), "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    argv.append("--no-plots")
    assert main([*argv, "--data-root", str(root)]) == 0
    recs = check_against_brute_force(str(suite), out, cache, data_root=str(root))
    cross = recs[("split-queries", "fct")]["cases"]["cross"]
    train_labels, test_labels = arrays["train"][1], arrays["test"][1]
    assert cross["n_gallery"] == len(train_labels)
    missing = np.isin(test_labels, train_labels, invert=True).sum()
    assert (cross["n_query"], cross["n_skipped"]) == (len(test_labels) - missing, missing)
