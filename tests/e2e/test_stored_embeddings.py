"""Scenarios on stored embeddings (fct.precomputed) end to end: `fct run suite.toml` on .npz
files and on memory-mapped .npy folders, every embedding-only method and the refusal of the
image-training ones, the query-side cross case computed by hand, the records' recovery key,
the files' digests in the config hash, and each bad input as one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stored_embeddings import make_arrays, write_set, write_suite

from fct import retrieval
from fct.cli import main
from fct.methods.adapters import procrustes
from fct.scenarios import load_suite

METHODS = ["independent", "fct", "fct_side", "fastfill", "procrustes", "affine", "low_rank"]


def run(capsys, suite: Path, *more: str) -> tuple[int, str]:
    out = suite.parent / "out"
    code = main(
        [
            "run",
            str(suite),
            "--out",
            str(out),
            "--cache",
            str(suite.parent / "cache"),
            "--device",
            "cpu",
            "--no-plots",  # the records; plots are tested on tiny and in the report tests
            *more,
        ]
    )
    return code, capsys.readouterr().err


def records(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (folder / "out/runs/pair").glob("*.json")}


def fails(capsys, suite: Path) -> str:
    code, err = run(capsys, suite)
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not (suite.parent / "out" / "runs").exists() or not list(
        (suite.parent / "out" / "runs").rglob("*.json")
    )
    assert not (suite.parent / "cache" / "transformations").exists()
    return errors[0]


def test_every_embedding_method_runs_and_image_methods_are_refused(tmp_path, capsys):
    train = make_arrays(240, d_old=16, d_new=24, side=8, seed=0)
    evals = make_arrays(160, d_old=16, d_new=24, side=8, seed=1)
    suite = write_suite(
        tmp_path,
        [*METHODS, "mlp_adapter", "bct", "ract"],
        train,
        evals,
        extra=(
            '[methods.procrustes_g]\nbase = "procrustes"\ndirection = "gallery"\n'
            "[methods.low_rank]\nrank = 8\n"
            "[methods.mlp_adapter]\nepochs = 2\nhidden = 16\n"
        ),
    )
    text = suite.read_text().replace('"mlp_adapter"', '"mlp_adapter", "procrustes_g"')
    suite.write_text(text)
    code, err = run(capsys, suite)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "pair/bct" in last and "pair/ract" in last
    assert "needs images" in last
    recs = records(tmp_path)
    # Independent compares 24-d queries with a 16-d gallery: refused by its own check.
    assert "pair/independent" in last
    assert set(recs) == {*METHODS, "mlp_adapter", "procrustes_g"} - {"independent"}
    assert recs["fct_side"]["models"]["side"].startswith("embeddings/side-")
    assert recs["fct"]["models"]["transformation"].startswith("transformations/h-")
    for name in ("procrustes", "affine", "low_rank", "mlp_adapter"):
        assert recs[name]["recovery"]["direction"] == "query"
        assert recs[name]["cases"]["cross"]["n_gallery"] == 160
    assert recs["procrustes_g"]["recovery"]["direction"] == "gallery"
    assert recs["fct"]["recovery"]["direction"] == "gallery"
    assert recs["fct"]["recovery"]["fit_seconds"] > 0  # h's training, from the cache entry


def test_query_side_cross_case_is_adapted_new_queries_against_the_old_gallery(tmp_path, capsys):
    train = make_arrays(300, d_old=24, d_new=24, seed=0, noise=1.0)
    evals = make_arrays(200, d_old=24, d_new=24, seed=1, noise=1.0)
    suite = write_suite(
        tmp_path,
        ["independent", "procrustes", "procrustes_g"],
        train,
        evals,
        extra=('[methods.procrustes_g]\nbase = "procrustes"\ndirection = "gallery"\n'),
    )
    code, err = run(capsys, suite)
    assert code == 0, err
    recs = records(tmp_path)
    # By hand: Procrustes from the training new to old embeddings, applied to the eval new ones.
    m = procrustes(torch.from_numpy(train["new"]).double(), torch.from_numpy(train["old"]).double())
    q = m(torch.from_numpy(evals["new"])).numpy()
    y = evals["labels"]
    want = retrieval.evaluate(
        retrieval.FeatureSet(q, y), retrieval.FeatureSet(evals["old"], y), paired=True
    )
    got = recs["procrustes"]["cases"]["cross"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-3)
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-3)
    # new/new and old/old are the stored sets leave-one-out, the same for every method.
    nn = retrieval.evaluate(retrieval.FeatureSet(evals["new"], y))
    for name in ("independent", "procrustes", "procrustes_g"):
        assert recs[name]["cases"]["new/new"]["mAP"] == pytest.approx(nn["mAP"], abs=1e-3)
    rec = recs["procrustes"]["recovery"]
    assert rec["direction"] == "query" and rec["fit_seconds"] >= 0
    assert rec["mAP"] == pytest.approx(round(got["mAP"] / nn["mAP"], 4), abs=1e-4)
    assert set(rec["query_latency_us"]) == {"1", "1024"}
    assert all(v > 0 for v in rec["query_latency_us"].values())
    assert recs["procrustes_g"]["recovery"]["direction"] == "gallery"
    assert recs["procrustes_g"]["recovery"]["query_latency_us"] is None
    # Equal sizes, L2: the query-side rotation is the gallery-side one transposed, and a
    # rotation keeps distances, so both directions rank alike.
    cross_g = recs["procrustes_g"]["cases"]["cross"]
    assert cross_g["mAP"] == pytest.approx(got["mAP"], abs=1e-3)
    assert recs["independent"]["recovery"]["direction"] == "none"
    # The query side keeps the gallery: no backfilling curves (the gallery side has them off
    # here too: curves = false in the suite), zero backfill.
    assert recs["procrustes"]["costs"]["backfill_fraction"] == 0
    # The report shows the recovery.
    html = tmp_path / "out" / "leaderboard.md"
    assert html.exists()
    assert "recovery" in html.read_text().lower()


def test_npy_folders_are_memory_mapped_and_give_the_npz_results(tmp_path, capsys):
    train, evals = make_arrays(200, seed=0), make_arrays(120, seed=1)
    a = write_suite(tmp_path / "a", ["affine"], train, evals)
    b = write_suite(tmp_path / "b", ["affine"], train, evals, names=("train", "eval"))
    assert run(capsys, a)[0] == 0 and run(capsys, b)[0] == 0
    ra, rb = records(tmp_path / "a")["affine"], records(tmp_path / "b")["affine"]
    assert ra["cases"] == rb["cases"]
    from fct.precomputed import open_set

    s = open_set(tmp_path / "b" / "eval")
    assert isinstance(s.arrays["old"], np.memmap)


def test_changed_files_rerun_the_records(tmp_path, capsys):
    suite = write_suite(tmp_path, ["affine"])
    assert run(capsys, suite)[0] == 0
    first = records(tmp_path)["affine"]
    assert run(capsys, suite)[0] == 0
    assert records(tmp_path)["affine"] == first  # skipped: same files, same record
    write_set(tmp_path / "eval.npz", make_arrays(160, seed=7))
    assert run(capsys, suite)[0] == 0
    second = records(tmp_path)["affine"]
    assert second["config_hash"] != first["config_hash"]
    digests = [r["scenario_config"]["embeddings"]["digests"] for r in (first, second)]
    assert digests[0]["train"] == digests[1]["train"]
    assert digests[0]["eval"] != digests[1]["eval"]


def _bad(tmp_path: Path, where: str, arrays: dict, npy: bool = False) -> Path:
    good_train, good_eval = make_arrays(100, seed=0), make_arrays(80, seed=1)
    sets = {"train": good_train, "eval": good_eval}
    sets[where] = arrays
    names = ("train", "eval") if npy else ("train.npz", "eval.npz")
    return write_suite(tmp_path, ["affine", "fct"], sets["train"], sets["eval"], names=names)


def test_mismatched_row_counts(tmp_path, capsys):
    a = make_arrays(80, seed=1)
    a["labels"] = a["labels"][:-3]
    msg = fails(capsys, _bad(tmp_path, "eval", a))
    assert "rows" in msg and "eval.npz" in msg


def test_wrong_dimensions(tmp_path, capsys):
    a = make_arrays(80, d_old=10, seed=1)  # train's old is 16-d
    msg = fails(capsys, _bad(tmp_path, "eval", a))
    assert "16-d" in msg and "10-d" in msg
    b = make_arrays(80, seed=1)
    b["new"] = b["new"][:, 0]  # 1-D
    assert "2-D" in fails(capsys, _bad(tmp_path / "b", "eval", b))


def test_nan_in_a_memory_mapped_array(tmp_path, capsys):
    a = make_arrays(80, seed=1)
    a["new"][37, 2] = np.nan
    msg = fails(capsys, _bad(tmp_path, "eval", a, npy=True))
    assert "row 37" in msg and "NaN" in msg


def test_npz_without_old(tmp_path, capsys):
    a = make_arrays(100, seed=0)
    del a["old"]
    msg = fails(capsys, _bad(tmp_path, "train", a))
    assert "'old'" in msg and "train.npz" in msg


def test_missing_npy(tmp_path, capsys):
    suite = _bad(tmp_path, "eval", make_arrays(80, seed=1), npy=True)
    (tmp_path / "eval" / "labels.npy").unlink()
    msg = fails(capsys, suite)
    assert "labels.npy" in msg


def test_labels_must_be_integers_and_side_in_both(tmp_path, capsys):
    a = make_arrays(80, seed=1)
    a["labels"] = a["labels"].astype(np.float32)
    assert "integers" in fails(capsys, _bad(tmp_path, "eval", a))
    b = make_arrays(80, seed=1, side=4)
    assert "side" in fails(capsys, _bad(tmp_path / "b", "eval", b))


def test_image_scenario_hash_is_unchanged_by_the_new_keys():
    # The committed reference records of the quickstart keep their config hashes.
    from fct.runner import record_digest

    ref = Path(__file__).resolve().parents[2] / "results" / "reference" / "quickstart" / "runs"
    suite = load_suite("quickstart")
    checked = 0
    for path in sorted(ref.glob("*/*.json"))[:12]:
        rec = json.loads(path.read_text())
        sc = next(s for s in suite.scenarios if s.name == rec["scenario"])
        assert record_digest(sc, sc.method(rec["method"]), rec["seed"]) == rec["config_hash"], path
        checked += 1
    assert checked


def test_the_example_suite_loads_with_its_files(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "embeddings" / "suite.toml"
    (tmp_path / "suite.toml").write_text(example.read_text())
    for name, n in (("train", 60), ("eval", 40)):
        write_set(tmp_path / "fmnist-half" / f"{name}.npz", make_arrays(n, 128, 128, side=64))
    suite = load_suite(str(tmp_path / "suite.toml"))
    sc = suite.scenarios[0]
    assert sc.embeddings is not None and sc.side is not None and sc.side.embedding_dim == 64
    assert {"fct", "procrustes_gallery", "mlp_adapter"} <= set(sc.methods)


def test_query_and_gallery_sets(tmp_path, capsys):
    train = make_arrays(200, d_old=16, d_new=16, seed=0)
    query, gallery = make_arrays(50, 16, 16, seed=1), make_arrays(150, 16, 16, seed=2)
    for name, arrays in (("train", train), ("query", query), ("gallery", gallery)):
        write_set(tmp_path / f"{name}.npz", arrays)
    text = write_suite(tmp_path / "unused", ["affine"]).read_text()
    text = text.replace(
        'embeddings = { train = "train.npz", eval = "eval.npz" }',
        'embeddings = { train = "train.npz", query = "query.npz", gallery = "gallery.npz" }',
    ).replace('methods = ["affine"]', 'methods = ["affine", "affine_g", "independent"]')
    text += '[methods.affine_g]\nbase = "affine"\ndirection = "gallery"\n'
    suite = tmp_path / "suite.toml"
    suite.write_text(text)
    code, err = run(capsys, suite)
    assert code == 0, err
    recs = records(tmp_path)

    def ev(q, g):
        return retrieval.evaluate(
            retrieval.FeatureSet(q, query["labels"]), retrieval.FeatureSet(g, gallery["labels"])
        )

    from fct.methods.adapters import affine

    t = {k: torch.from_numpy(v).double() for k, v in train.items() if k != "labels"}
    to_old = affine(t["new"], t["old"], 1e-3)(torch.from_numpy(query["new"])).numpy()
    to_new = affine(t["old"], t["new"], 1e-3)(torch.from_numpy(gallery["old"])).numpy()
    want = {
        "affine": ev(to_old, gallery["old"]),
        "affine_g": ev(query["new"], to_new),
        "independent": ev(query["new"], gallery["old"]),
    }
    for name, w in want.items():
        cases = recs[name]["cases"]
        assert cases["cross"]["mAP"] == pytest.approx(w["mAP"], abs=1e-3), name
        assert cases["cross"]["n_query"] == 50 and cases["cross"]["n_gallery"] == 150
        assert cases["old/old"]["mAP"] == pytest.approx(
            ev(query["old"], gallery["old"])["mAP"], abs=1e-3
        )
        assert cases["new/new"]["mAP"] == pytest.approx(
            ev(query["new"], gallery["new"])["mAP"], abs=1e-3
        )
    assert set(recs["affine"]["scenario_config"]["embeddings"]["digests"]) == {
        "train",
        "query",
        "gallery",
    }


def test_embeddings_table_forms(tmp_path):
    from fct.errors import FCTError

    base = write_suite(tmp_path, ["affine"]).read_text()
    for table, match in (
        ('{ train = "train.npz" }', "either eval"),
        ('{ train = "train.npz", eval = "eval.npz", query = "eval.npz" }', "either eval"),
        ('{ train = "train.npz", query = "eval.npz" }', "query and gallery"),
        ('{ eval = "eval.npz", trian = "train.npz" }', "trian"),
        ('{ train = "nope.npz", eval = "eval.npz" }', "nope.npz"),
    ):
        text = base.replace('{ train = "train.npz", eval = "eval.npz" }', table)
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(FCTError, match=match):
            load_suite(str(tmp_path / "bad.toml"))


def test_ranking_metrics_reach_the_records(tmp_path, capsys):
    train, evals = make_arrays(200, seed=0), make_arrays(120, seed=1, noise=2.0)
    suite = write_suite(tmp_path, ["affine"], train, evals)
    text = suite.read_text().replace(
        "curves = false", 'curves = false\nmetrics = ["recall@10", "mrr@10"]'
    )
    suite.write_text(text)
    assert run(capsys, suite)[0] == 0
    cases = records(tmp_path)["affine"]["cases"]
    want = retrieval.evaluate(
        retrieval.FeatureSet(evals["new"], evals["labels"]), ranking=("recall@10", "mrr@10")
    )
    assert cases["new/new"]["recall@10"] == pytest.approx(want["recall@10"], abs=1e-3)
    assert cases["new/new"]["mrr@10"] == pytest.approx(want["mrr@10"], abs=1e-3)
    assert {"recall@10", "mrr@10"} <= set(cases["cross"]) and "recall@1" not in cases["cross"]


def test_a_query_fraction_of_one_stored_eval_set(tmp_path, capsys):
    """[eval] query_fraction on a stored eval set: the same seeded per-class draw as on images
    (fct.embedding.query_mask), queries against the rest, nothing excluded by index; with
    query and gallery files, or image splits, it is refused in one line."""
    from fct.embedding import query_mask

    evals = make_arrays(160, d_old=16, d_new=16, seed=1)
    train = make_arrays(240, d_old=16, d_new=16, seed=0)
    suite = write_suite(tmp_path, ["independent", "affine_g"], train, evals)
    text = suite.read_text().replace("curves = false", "curves = false\nquery_fraction = 0.25")
    suite.write_text(text + '[methods.affine_g]\nbase = "affine"\ndirection = "gallery"\n')
    code, err = run(capsys, suite)
    assert code == 0, err
    sc = load_suite(str(suite)).scenarios[0]
    keep = query_mask(sc.eval, torch.from_numpy(evals["labels"])).numpy()
    assert 0 < keep.sum() < len(keep)
    q, g, ql, gl = (
        evals["new"][keep],
        evals["old"][~keep],
        evals["labels"][keep],
        evals["labels"][~keep],
    )
    want = retrieval.evaluate(retrieval.FeatureSet(q, ql), retrieval.FeatureSet(g, gl))
    cross = records(tmp_path)["independent"]["cases"]["cross"]
    assert cross["mAP"] == pytest.approx(want["mAP"], abs=1e-3)
    assert (
        cross["n_query"] + cross["n_skipped"] == keep.sum() and cross["n_gallery"] == (~keep).sum()
    )
    assert "nfr" in cross and "pfr" in cross

    bad = tmp_path / "bad"
    bad.mkdir()
    suite = write_suite(bad, ["independent"])
    suite.write_text(
        suite.read_text().replace("curves = false", 'curves = false\nquery_split = "train"')
    )
    assert "query_split and gallery_split name image splits" in fails(capsys, suite)
    # A sequence needs a model per generation; stored files hold two.
    seq = tmp_path / "seq"
    seq.mkdir()
    suite = write_suite(seq, ["independent"])
    suite.write_text(
        suite.read_text().replace(
            'name = "pair"', 'name = "pair"\nkinds = ["sequence"]\nmodels = [{}, {}, {}]'
        )
    )
    assert "stored embeddings hold an old and a new model only" in fails(capsys, suite)
    # Queries named twice: a query file and a fraction of the eval set.
    both = tmp_path / "both"
    both.mkdir()
    for name, n in (("train", 60), ("query", 20), ("gallery", 40)):
        write_set(both / f"{name}.npz", make_arrays(n, 16, 24, seed=len(name)))
    suite = write_suite(both, ["independent"])
    text = suite.read_text().replace(
        'embeddings = { train = "train.npz", eval = "eval.npz" }',
        'embeddings = { train = "train.npz", query = "query.npz", gallery = "gallery.npz" }',
    )
    suite.write_text(text.replace("curves = false", "curves = false\nquery_fraction = 0.5"))
    assert "query_fraction and the stored query file both name the queries" in fails(capsys, suite)
