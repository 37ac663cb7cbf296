"""A sequence scenario end to end (`fct run tiny_sequence`): the records' compatibility
matrices, the chained FCT gallery recomputed by hand from the cache, BCT's predecessors by
artifact digest, the report's heatmaps, table and leaderboard columns, and a bad sequence
refused in one line before anything trains."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_fct

from fct import sequence_metrics
from fct.artifacts import Cache
from fct.context import Context
from fct.embedding import apply_transformation
from fct.record import RunRecord
from fct.scenarios import load_suite, parse_set
from fct.sequence import step_scenario
from fct.session import Role

SCENARIO = "three-generations"
METHODS = ("independent", "bct", "bct_first", "fct", "fct_side")
# Shorter training than the suite's (the wiring is checked, not the numbers): every model one
# epoch, h two. Every run and suite loaded here uses them, so they share the cache.
SHORT = ("defaults.model.epochs=1", "defaults.side.epochs=1", "defaults.transformation.epochs=2")
SHORT_ARGS = [x for key in SHORT for x in ("--set", key)]


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    out, cache = root / "out", root / "cache"
    args = ["run", "tiny_sequence", "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    proc = run_fct(*args, *SHORT_ARGS, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {m: json.loads((out / "runs" / SCENARIO / f"{m}.json").read_text()) for m in METHODS}
    return out, cache, recs


def test_records_carry_the_matrix_and_its_summary(seq_run):
    out, _, recs = seq_run
    for m, rec in recs.items():
        RunRecord.read(out / "runs" / SCENARIO / f"{m}.json")  # the schema accepts it
        seq = rec["sequence"]
        assert len(seq["models"]) == 3 and len(seq["steps"]) == 2
        for metric in ("top1", "mAP"):
            mat = seq["matrix"][metric]
            assert [[v is None for v in row] for row in mat] == [
                [False, True, True],
                [False, False, True],
                [False, False, False],
            ]
            assert seq["by_metric"][metric]["AC"] == pytest.approx(
                sequence_metrics.average_compatibility(mat), abs=1e-4
            )
            assert seq["compatible"][metric] == sequence_metrics.criterion(mat)
        mat = seq["matrix"]["mAP"]
        assert seq["AC"] == pytest.approx(sequence_metrics.average_compatibility(mat), abs=1e-4)
        assert seq["BC"] == pytest.approx(sequence_metrics.backward_compatibility(mat), abs=1e-4)
        assert seq["FC"] == pytest.approx(sequence_metrics.forward_compatibility(mat), abs=1e-4)
        assert seq["mean"] == pytest.approx(sequence_metrics.lower_mean(mat), abs=1e-4)
        # The record's cases are the sequence's ends: first gallery, last model.
        assert rec["cases"]["old/old"]["mAP"] == mat[0][0]
        assert rec["cases"]["new/new"]["mAP"] == mat[2][2]
        assert rec["cases"]["cross"]["mAP"] == mat[2][0]
        assert (seq["direct"] is not None) == m.startswith("fct")
        # Each update's flips on the first gallery: over the same (never skipped: every class
        # is in the gallery) queries, top-1 after - top-1 before == pfr - nfr.
        top1 = seq["matrix"]["top1"]
        for k, step in enumerate(seq["steps"], 1):
            assert 0 <= step["nfr"] <= 100 and 0 <= step["pfr"] <= 100
            gain = top1[k][0] - top1[k - 1][0]
            assert step["pfr"] - step["nfr"] == pytest.approx(gain, abs=2e-3), (m, k)
        cross = rec["cases"]["cross"]
        assert cross["pfr"] - cross["nfr"] == pytest.approx(
            cross["top1"] - rec["cases"]["old/old"]["top1"], abs=2e-3
        )
    # Every method starts from the same first model; Independent and FCT deploy the same chain.
    firsts = {rec["sequence"]["models"][0]["digest"] for rec in recs.values()}
    assert len(firsts) == 1
    ind, fct = recs["independent"]["sequence"], recs["fct"]["sequence"]
    assert [x["digest"] for x in ind["models"]] == [x["digest"] for x in fct["models"]]
    assert [row[i] for i, row in enumerate(ind["matrix"]["mAP"])] == [
        row[i] for i, row in enumerate(fct["matrix"]["mAP"])
    ]


def _entry_key(cache: Path, kind: str, tail: str) -> dict:
    (folder,) = [p for p in (cache / kind).iterdir() if p.name.endswith(tail)]
    return json.loads((folder / "meta.json").read_text())["key"]


def test_bct_is_constrained_by_its_own_previous_model(seq_run):
    _, cache, recs = seq_run
    ind = [x["digest"] for x in recs["independent"]["sequence"]["models"]]
    for method, anchors in (("bct", (0, 1)), ("bct_first", (0, 0))):
        seq = recs[method]["sequence"]
        models = [x["digest"] for x in seq["models"]]
        assert models[0] == ind[0] and models[1] != ind[1] and models[2] != ind[2]
        for step, anchor in zip(seq["steps"], anchors, strict=True):
            assert step["old"] == models[anchor]
        for k, anchor in ((1, anchors[0]), (2, anchors[1])):
            # the trained model's cache key names the model its influence loss went through
            key = _entry_key(cache, "models", f"-{method}-{models[k]}")
            assert key["extra"]["old"] == models[anchor]
    assert recs["bct_first"]["sequence"]["anchor"] == "first"
    # the first update is the same for both anchors: one cache key (entries named per method)
    first_update = [recs[m]["sequence"]["models"][1]["digest"] for m in ("bct", "bct_first")]
    assert first_update[0] == first_update[1]


def _brute_top1(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 by a plain loop: each query's nearest gallery item, its own paired item left out."""
    hits = 0
    for i, q in enumerate(queries):
        d = ((gallery - q) ** 2).sum(1)
        d[i] = np.inf
        hits += labels[int(np.argmin(d))] == labels[i]
    return 100.0 * hits / len(queries)


def test_chained_fct_is_h01_then_h12_on_the_cached_embeddings(seq_run):
    _, cache, recs = seq_run
    suite = load_suite("tiny_sequence", overrides=parse_set(list(SHORT)))
    sc = next(s for s in suite.scenarios if s.name == SCENARIO)
    c = Cache(cache)
    ctx0 = Context(step_scenario(sc, 0, 1), c, device=torch.device("cpu"))
    m0, m1 = ctx0.old_model(), ctx0.new_model()
    h01 = ctx0.transformation(m1, use_side=False)
    ctx1 = Context(step_scenario(sc, 1, 2), c, device=torch.device("cpu"), old=m1)
    m2 = ctx1.new_model()
    h12 = ctx1.transformation(m2, use_side=False)
    assert not any(a.built_now for a in (m0, m1, m2, h01, h12))  # all from the cache
    seq = recs["fct"]["sequence"]
    assert [s["transformation"] for s in seq["steps"]] == [h01.digest, h12.digest]
    x0, labels = ctx0.embed(m0, Role.EVAL)
    x2, _ = ctx1.embed(m2, Role.EVAL)
    g = apply_transformation(h01.module, x0, None, torch.device("cpu"))[0]
    g = apply_transformation(h12.module, g, None, torch.device("cpu"))[0]
    top1 = _brute_top1(x2.float().numpy(), g.float().numpy(), labels.numpy())
    assert seq["matrix"]["top1"][2][0] == pytest.approx(top1, abs=1e-3)
    # and the direct h_0->2 is another transformation than either step's
    assert seq["direct"]["digest"] not in (h01.digest, h12.digest)


def test_report_has_heatmaps_table_and_columns(seq_run):
    out, _, recs = seq_run
    for metric in ("mAP", "top1"):
        assert (out / "plots" / f"sequence_{SCENARIO}_{metric}.png").stat().st_size > 1000
        assert (out / "plots" / f"sequence_{SCENARIO}_{metric}.pdf").stat().st_size > 1000
    md = (out / "tables" / f"sequence_{SCENARIO}.md").read_text()
    assert "BCT, first model as anchor" in md and "M\\[2\\]\\[0\\]" in md
    tex = (out / "tables" / f"sequence_{SCENARIO}.tex").read_text()
    assert "\\begin{tabular}" in tex
    with open(out / "leaderboard.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    for m, rec in recs.items():
        assert float(rows[m][f"{SCENARIO}/seq_AC"]) == pytest.approx(rec["sequence"]["AC"])
        assert float(rows[m][f"{SCENARIO}/seq_mean_mAP"]) == pytest.approx(rec["sequence"]["mean"])
    assert "compatibility matrix" in (out / "index.html").read_text()
    assert (
        "- generation 1: synthetic, classes \\[0, 12\\]"
        in (out / "tables" / f"{SCENARIO}.md").read_text()
    )


def test_a_query_set_apart_runs_the_whole_chain(seq_run, tmp_path):
    """[eval] query_split / gallery_split in a sequence: the test split's queries against the
    train split's gallery in every cell (the models come from the cache; no item excluded)."""
    _, cache, _ = seq_run
    out = tmp_path / "out"
    args = ["run", "tiny_sequence", "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    args += ["--set", 'defaults.eval.query_split="test"']
    args += ["--set", 'defaults.eval.gallery_split="train"', "--methods", "independent,fct"]
    args += SHORT_ARGS
    proc = run_fct(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training " not in proc.stderr  # every model came from the cache
    for m in ("independent", "fct"):
        rec = json.loads((out / "runs" / SCENARIO / f"{m}.json").read_text())
        assert rec["scenario_config"]["eval"]["query_split"] == "test"
        cases = rec["cases"]
        n_query = cases["old/old"]["n_query"] + cases["old/old"]["n_skipped"]
        assert cases["cross"]["n_gallery"] > n_query  # train items searched by test queries
        mat = rec["sequence"]["matrix"]["mAP"]
        assert cases["cross"]["mAP"] == mat[2][0] and cases["old/old"]["mAP"] == mat[0][0]
        assert all(0 <= s["nfr"] <= 100 for s in rec["sequence"]["steps"])


def test_a_two_model_sequence_is_refused_before_training(tmp_path):
    suite = tmp_path / "bad.toml"
    suite.write_text(
        '[suite]\nname = "bad"\n[defaults.model]\ndataset = "synthetic"\n'
        '[[scenario]]\nname = "seq"\nkinds = ["sequence"]\nmodels = [{}, {}]\n'
    )
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = run_fct("run", str(suite), "--out", str(out), "--cache", str(cache), cwd=tmp_path)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "a sequence needs 3 to 32 model generations, got 2" in err[0]
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
