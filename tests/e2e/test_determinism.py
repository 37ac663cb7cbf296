"""Determinism on the CPU: the same seed gives the same run records in another process; another
seed gives other ones; `--seeds` runs a suite over several seeds and the report shows mean ± std."""

from __future__ import annotations

import json

from conftest import normalize, records, run_fct, tiny_args


def test_seeds_same_seed_same_records_other_seed_other_records(clean_tiny, tmp_path):
    _, _, clean = clean_tiny
    out, cache = tmp_path / "out", tmp_path / "cache"  # nothing shared with the clean run
    proc = run_fct(*tiny_args(out, cache, "--seeds", "0,1", "--no-plots"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    recs = records(out)
    methods = ("independent", "bct", "fct", "fct_side")
    expected = {f"runs/half-classes/{m}{suffix}.json" for m in methods for suffix in ("", ".seed1")}
    assert set(recs) == expected
    # Seed 0, trained from scratch in another process, matches the clean run exactly.
    assert {k: v for k, v in recs.items() if ".seed" not in k} == clean
    for m in methods:
        a, b = (recs[f"runs/half-classes/{m}{s}.json"] for s in ("", ".seed1"))
        assert [a["seed"], b["seed"]] == [0, 1]
        assert a["cases"] != b["cases"]
        assert a["artifacts"] != b["artifacts"]  # each seed trains its own models
        # Other weights, not only other cache keys: the seed reached the initialisation
        # and the data order (normalize() keeps weights digests and curves).
        assert set(a["artifact_weights"]) == set(b["artifact_weights"])
        assert all(
            a["artifact_weights"][k] != b["artifact_weights"][k] for k in a["artifact_weights"]
        )
        # Every metric of every case, and the interior of every backfilling curve.
        for case in ("old/old", "new/new", "cross"):
            assert all(a["cases"][case][k] != b["cases"][case][k] for k in ("mAP", "mAP@R"))
        for order, curve in a["curves"].items():
            assert curve[1:-1] != b["curves"][order][1:-1]
    # The normalised records keep everything a rerun must reproduce (curves, weights digests).
    some = recs["runs/half-classes/fct.json"]
    assert {"curves", "backfill_curves", "artifact_weights", "cases", "auc"} <= set(some)
    board = (out / "leaderboard.md").read_text()
    assert "±" in board and "mean ± sample standard deviation over seeds" in board


def test_normalize_drops_only_times_dates_and_provenance():
    rec = {
        "cases": {"cross": {"mAP": 1.0}},
        "costs": {"train_seconds": 3.0, "backfill_images_per_s": 9.0, "backfill_fraction": 0.0},
        "provenance": {"date": "x"},
    }
    assert normalize(json.loads(json.dumps(rec))) == {
        "cases": {"cross": {"mAP": 1.0}},
        "costs": {"backfill_fraction": 0.0},
    }
