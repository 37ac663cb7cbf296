"""The flip rates in records and reports: the schema accepts the optional ``nfr``/``pfr`` keys
(and refuses bad values in one line), and the leaderboard's NFR column shows them, blank for
records written before they existed."""

from __future__ import annotations

import csv

import pytest
from report_records import make_record, write_record

from fct.errors import FCTError
from fct.record import validate_record
from fct.report import build_report


def with_flips(rec: dict, nfr: float, pfr: float) -> dict:
    rec["cases"]["cross"].update(nfr=nfr, pfr=pfr)
    rec["backfill_curves"] = {
        "metric": "mAP",
        "fractions": [0.0, 1.0],
        "top1": {"random": [1.0, 2.0]},
        "auc_top1": {"random": 1.5},
        "nfr": {"random": [nfr, 3.0]},
        "pfr": {"random": [pfr, 4.0]},
    }
    return rec


def test_schema_accepts_flip_rates_and_records_without_them() -> None:
    validate_record(make_record("a", "fct", (45.0, 25.0)), "old.json")
    validate_record(with_flips(make_record("a", "fct", (45.0, 25.0)), 3.5, 6.0), "new.json")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda r: r["cases"]["cross"].update(nfr="many"), "cases.cross.nfr"),
        (lambda r: r["cases"]["cross"].update(pfr=[1.0]), "cases.cross.pfr"),
        (lambda r: r["backfill_curves"].update(nfr={"random": "x"}), "backfill_curves.nfr"),
        (lambda r: r["backfill_curves"].update(pfr={"random": [1.0, None]}), "backfill_curves.pfr"),
        (lambda r: r["backfill_curves"].update(nfr=[1.0]), "backfill_curves.nfr"),
    ],
)
def test_bad_flip_values_are_one_line(damage, needle) -> None:
    rec = with_flips(make_record("a", "fct", (45.0, 25.0)), 3.5, 6.0)
    damage(rec)
    with pytest.raises(FCTError) as err:
        validate_record(rec, "r.json")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_leaderboard_nfr_column_blank_for_older_records(tmp_path) -> None:
    results = tmp_path / "results"
    write_record(results, with_flips(make_record("a", "fct", (45.0, 25.0)), 3.5, 6.0))
    write_record(results, make_record("a", "bct", (40.0, 20.0)))  # written before flip rates
    build_report("quickstart", [results], tmp_path / "out", reference=None, plots=False)
    with open(tmp_path / "out" / "leaderboard.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["fct"]["a/cross_nfr"] == "3.5"
    assert rows["bct"]["a/cross_nfr"] == ""
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| a NFR |" in md and "NFR: negative flip rate" in md


def test_no_nfr_column_when_no_record_has_flip_rates(tmp_path) -> None:
    results = tmp_path / "results"
    write_record(results, make_record("a", "bct", (40.0, 20.0)))
    build_report("quickstart", [results], tmp_path / "out", reference=None, plots=False)
    header = (tmp_path / "out" / "leaderboard.csv").read_text().splitlines()[0]
    assert "cross_nfr" not in header
