"""`fct evaluate`: output formats and the one-line errors for bad input (exit status 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fct.cli import main
from fct.retrieval import FeatureSet, evaluate


def save(path, features, labels, **extra):
    np.savez(path, features=features, labels=labels, **extra)
    return str(path)


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 8)
    x = (np.eye(5, 16)[y] * 3 + rng.normal(size=(40, 16))).astype(np.float32)
    return save(tmp_path / "q.npz", x, y)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_has_the_documented_keys(capsys, good):
    code, out, err = run(capsys, "evaluate", "--query", good, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert set(res) >= {
        "top1",
        "top5",
        "mAP",
        "mAP@R",
        "n_query",
        "n_gallery",
        "distance",
        "backend",
    }
    assert res["n_query"] == 40 and res["distance"] == "l2" and res["backend"] == "torch"
    # The numbers are the library's on the same file (leave-one-out, l2, torch).
    d = np.load(good)
    lib = evaluate(FeatureSet(d["features"], d["labels"]), distance="l2", backend="torch")
    for key in ("top1", "top5", "mAP", "mAP@R"):
        assert res[key] == pytest.approx(lib[key], abs=1e-4), key


def test_smoke_table_output_and_faiss_cosine(capsys, good):
    code, out, _ = run(
        capsys, "evaluate", "--query", good, "--backend", "faiss", "--distance", "cosine"
    )
    assert code == 0
    assert "leave-one-out" in out and "top1" in out and "mAP@R" in out


def test_paired_against_gallery(capsys, tmp_path, good):
    d = np.load(good)
    gal = save(tmp_path / "g.npz", d["features"] + 0.01, d["labels"])
    code, out, _ = run(capsys, "evaluate", "--query", good, "--gallery", gal, "--paired", "--json")
    assert code == 0 and json.loads(out)["n_gallery"] == 40


def expect_error(capsys, argv, *needles):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_file(capsys, tmp_path):
    expect_error(
        capsys, ["evaluate", "--query", str(tmp_path / "nope.npz")], "no such file", "features"
    )


def test_missing_npz_key(capsys, tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, feats=np.zeros((3, 2), np.float32), labels=np.zeros(3, int))
    expect_error(capsys, ["evaluate", "--query", str(p)], "missing key 'features'", "np.savez")


def test_not_an_npz(capsys, tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip file")
    expect_error(capsys, ["evaluate", "--query", str(p)], "not a readable npz")


def test_feature_size_differs(capsys, tmp_path, good):
    gal = save(tmp_path / "g.npz", np.zeros((4, 8), np.float32), np.arange(4))
    expect_error(
        capsys,
        ["evaluate", "--query", good, "--gallery", gal],
        "feature size differs",
        "16-d",
        "8-d",
    )


def test_label_length_mismatch(capsys, tmp_path):
    p = save(tmp_path / "q.npz", np.zeros((5, 3), np.float32), np.arange(4))
    expect_error(capsys, ["evaluate", "--query", p], "4 labels for 5 feature rows")


def test_nan_and_inf(capsys, tmp_path):
    x = np.zeros((5, 3), np.float32)
    x[2, 1] = np.nan
    x[4, 0] = np.inf
    p = save(tmp_path / "q.npz", x, np.zeros(5, int))
    expect_error(capsys, ["evaluate", "--query", p], "2 rows hold NaN or inf", "row 2")


def test_empty_set(capsys, tmp_path):
    p = save(tmp_path / "q.npz", np.zeros((0, 3), np.float32), np.zeros(0, int))
    expect_error(capsys, ["evaluate", "--query", p], "empty")


def test_every_class_single_item(capsys, tmp_path):
    p = save(tmp_path / "q.npz", np.eye(4, dtype=np.float32), np.arange(4))
    expect_error(capsys, ["evaluate", "--query", p], "no query has a same-class item")


def test_single_item_class_is_counted_as_skipped(capsys, tmp_path):
    x = np.array([[0, 0], [0, 1], [5, 5]], np.float32)
    p = save(tmp_path / "q.npz", x, np.array([0, 0, 1]))
    code, out, err = run(capsys, "evaluate", "--query", p, "--json")
    assert code == 0
    assert json.loads(out)["n_skipped"] == 1
    assert "1 queries have no same-class item" in err and "excluded from every metric" in err


def test_paired_needs_matching_sets(capsys, tmp_path, good):
    gal = save(tmp_path / "g.npz", np.zeros((4, 16), np.float32), np.arange(4))
    expect_error(
        capsys, ["evaluate", "--query", good, "--gallery", gal, "--paired"], "--paired needs"
    )
    expect_error(capsys, ["evaluate", "--query", good, "--paired"], "--paired needs --gallery")


def test_bad_option_is_one_line(capsys, good):
    expect_error(capsys, ["evaluate", "--query", good, "--distance", "hamming"], "invalid choice")


def test_integer_features_are_refused(capsys, tmp_path):
    p = save(tmp_path / "q.npz", np.zeros((3, 2), np.int32), np.zeros(3, int))
    expect_error(capsys, ["evaluate", "--query", p], "floating point")
