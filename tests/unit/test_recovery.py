"""The record's ``recovery`` key (fct.recovery): its values, its validation as an optional
key (older records have none), and the report's columns for it."""

from __future__ import annotations

import copy

import pytest
import torch
from report_records import make_record

from fct.errors import FCTError
from fct.methods import Deployment
from fct.record import validate_record
from fct.recovery import direction, query_latency_us, ratio, recovery


def test_ratio_and_direction():
    assert ratio(45.0, 60.0) == 0.75
    assert ratio(10.0, 0.0) is None and ratio(None, 5.0) is None
    new = object()
    assert direction(Deployment(query_model=new)) == "none"
    assert direction(Deployment(query_model=new, gallery_update=lambda o, s: o)) == "gallery"
    assert direction(Deployment(query_model=new, query_update=lambda q: q)) == "query"


def test_recovery_of_a_query_side_deployment_measures_latency():
    w = torch.randn(8, 8)
    dep = Deployment(query_model=object(), query_update=lambda q: q @ w, fit_seconds=0.25)
    cases = {"cross": {"top1": 40.0, "mAP": 30.0}, "new/new": {"top1": 80.0, "mAP": 60.0}}
    rec = recovery(cases, dep, own_train_seconds=9.0, query_dim=8)
    assert rec["top1"] == 0.5 and rec["mAP"] == 0.5
    assert rec["fit_seconds"] == 0.25  # the method's own measurement wins
    assert set(rec["query_latency_us"]) == {"1", "1024"}
    assert all(v > 0 for v in rec["query_latency_us"].values())
    gallery = Deployment(query_model=object(), gallery_update=lambda o, s: o)
    rec = recovery(cases, gallery, own_train_seconds=9.0, query_dim=8)
    assert rec["fit_seconds"] == 9.0 and rec["query_latency_us"] is None


def test_latency_is_per_query():
    calls = []

    def slow(q):
        calls.append(len(q))
        return q

    out = query_latency_us(slow, 4)
    assert {1, 1024} == set(calls) and out["1"] > 0 and out["1024"] > 0


def test_recovery_is_optional_and_validated(tmp_path):
    rec = make_record("s", "affine", (40.0, 20.0))
    rec.pop("recovery", None)
    validate_record(rec, tmp_path / "r.json")  # older records: no key
    good = copy.deepcopy(rec)
    good["recovery"] = {
        "top1": 0.9,
        "mAP": 0.8,
        "direction": "query",
        "fit_seconds": 0.1,
        "query_latency_us": {"1": 3.0, "1024": 0.1},
    }
    validate_record(good, tmp_path / "r.json")
    for key, value, match in (
        ("mAP", "high", "recovery.mAP"),
        ("top1", -0.1, "negative"),
        ("direction", 3, "recovery.direction"),
        ("query_latency_us", {"1": "fast"}, "query_latency_us"),
        ("query_latency_us", [1.0], "recovery.query_latency_us"),
    ):
        bad = copy.deepcopy(good)
        bad["recovery"][key] = value
        with pytest.raises(FCTError, match=match):
            validate_record(bad, tmp_path / "r.json")
    bad = copy.deepcopy(good)
    bad["recovery"] = "all of it"
    with pytest.raises(FCTError, match="recovery"):
        validate_record(bad, tmp_path / "r.json")


def test_report_shows_recovery_columns(tmp_path):
    from fct.report.leaderboard import RECOVERY_METRICS
    from fct.report.metric_table import METRICS

    rec = make_record("s", "affine", (40.0, 20.0))
    rec["recovery"] = {"top1": 0.5, "mAP": 0.25, "direction": "query", "fit_seconds": 2.0,
                       "query_latency_us": {"1": 7.5, "1024": 0.5}}  # fmt: skip
    got = {k: METRICS[k].extract(rec, None) for k in (*RECOVERY_METRICS, "query_latency_us_1")}
    assert got == {"recovery_top1": 0.5, "recovery_mAP": 0.25, "query_latency_us_1": 7.5}
    rec.pop("recovery")
    assert METRICS["recovery_mAP"].extract(rec, None) is None
