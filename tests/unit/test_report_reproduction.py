"""The reproduction check: a run's report beside the project's reference records.

The reference is loaded on its own (never merged or ranked with the run), and the report
says, per (scenario, method, seed) present in both, this run − reference, with one verdict.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from report_records import SUITE, base_records, make_record, read_csv, write_record

from fct.errors import FCTError
from fct.io import write_json
from fct.report import build_report

VERDICT = re.compile(
    r"reproduced within (\d+\.\d\d) points \(max \|difference\| over (\d+) matched records? × 6 "
    r"metrics; (\d+) records? only in this run, (\d+) only in the reference\)"
)


def folders(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "results" / SUITE, tmp_path / "results" / "reference" / SUITE


def shifted(rec: dict[str, Any], by: float) -> dict[str, Any]:
    """A copy of ``rec`` whose every compared number is ``by`` points higher."""
    rec = copy.deepcopy(rec)
    for case in rec["cases"].values():
        case["top1"] += by
        case["mAP"] += by
    return rec


def write_all(folder: Path, records: list[dict[str, Any]]) -> None:
    for rec in records:
        write_record(folder, rec)


def test_reproduction_check_compares_matched_records(tmp_path: Path) -> None:
    run, ref = folders(tmp_path)
    records = base_records()
    write_all(run, records)
    # The reference: the same records, a.fct 0.75 points higher in every number, b.bct 0.25
    # lower; plus a method the run did not run. The run has a plugin the reference lacks.
    reference = []
    for rec in records:
        by = {("a", "fct"): 0.75, ("b", "bct"): -0.25}.get((rec["scenario"], rec["method"]), 0.0)
        reference.append(shifted(rec, by))
    reference.append(make_record("a", "ref_only", (99.0, 99.0), label="Only in the reference"))
    write_all(ref, reference)
    write_record(run, make_record("a", "my_plugin", (30.0, 16.0), label="Mine"))

    paths = build_report(SUITE, [run], reference=ref, plots=False)
    assert run / "reproduction.md" in paths
    md = (run / "reproduction.md").read_text().replace("\\", "")  # Markdown escapes aside
    m = VERDICT.search(md)
    assert m is not None, md
    assert m.groups() == ("0.75", "8", "1", "1")
    assert md.index("reproduced within") < md.index("| scenario |")  # the verdict on top
    row = next(line for line in md.splitlines() if line.startswith("| a | FCT |"))
    assert row.count("-0.75") == 6
    assert "| b | BCT | 0 | – | +0.25 |" in md  # no config hashes in these records
    assert "Largest difference: -0.75 (a / FCT, seed 0" in md

    # Never merged or ranked: the leaderboard has the run's numbers and methods only.
    rows = read_csv(run / "leaderboard.csv")
    assert float(rows["fct"]["a/cross_mAP"]) == 25.0
    assert "ref_only" not in rows and "my_plugin" in rows
    board = (run / "leaderboard.md").read_text()
    assert "Reproduction check: reproduced within 0.75 points" in board
    page = (run / "index.html").read_text()
    assert '<h2 id="reproduction">Reproduction check</h2>' in page
    assert "reproduced within 0.75 points" in page and "Only in the reference" not in page


def test_config_column_tells_a_differently_configured_run(tmp_path: Path) -> None:
    run, ref = folders(tmp_path)
    records = [r for r in base_records() if r["scenario"] == "a"]
    for rec in records:
        rec["config_hash"] = f"hash-{rec['method']}"
    write_all(run, records)
    reference = copy.deepcopy(records)
    reference[1]["config_hash"] = "another"
    del reference[2]["config_hash"]  # a reference record of before config hashes
    write_all(ref, reference)
    build_report(SUITE, [run], reference=ref)
    md = (run / "reproduction.md").read_text().replace("\\", "")
    configs = [line.split("|")[4].strip() for line in md.splitlines() if line.startswith("| a |")]
    assert sorted(configs) == ["differs", "same", "same", "–"]


@pytest.mark.parametrize("shape", ["missing", "no runs", "empty runs", "other suite"])
def test_no_reference_records_means_no_section(tmp_path: Path, shape: str) -> None:
    run, ref = folders(tmp_path)
    write_all(run, base_records())
    if shape == "no runs":
        ref.mkdir(parents=True)
    elif shape == "empty runs":
        (ref / "runs").mkdir(parents=True)
    elif shape == "other suite":
        write_record(ref, make_record("a", "fct", (45.0, 25.0), suite="cifar100"))
    paths = build_report(SUITE, [run], reference=ref, plots=False)
    assert not (run / "reproduction.md").exists() and run / "reproduction.md" not in paths
    assert "Reproduction" not in (run / "leaderboard.md").read_text()
    assert "Reproduction" not in (run / "index.html").read_text()


def test_no_matching_record_says_so(tmp_path: Path) -> None:
    run, ref = folders(tmp_path)
    write_all(run, base_records())
    write_record(ref, make_record("a", "fct", (45.0, 25.0), seed=7))
    build_report(SUITE, [run], reference=ref, plots=False)
    md = (run / "reproduction.md").read_text()
    assert "not compared: no record of this run is in the reference" in md
    assert "8 records only in this run, 1 only in the reference" in md


def test_malformed_reference_record_is_one_line_error(tmp_path: Path) -> None:
    run, ref = folders(tmp_path)
    write_all(run, base_records())
    rec = make_record("a", "fct", (45.0, 25.0))
    rec["cases"]["cross"]["mAP"] = "high"
    bad = write_json(ref / "runs" / "a" / "fct.json", rec)
    with pytest.raises(FCTError) as e:
        build_report(SUITE, [run], reference=ref, plots=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"reference results {ref}") and str(bad) in msg
    assert not (run / "leaderboard.md").exists()


def test_stale_reproduction_file_goes_when_rebuilt_without_reference(tmp_path: Path) -> None:
    run, ref = folders(tmp_path)
    write_all(run, base_records())
    write_all(ref, base_records())
    build_report(SUITE, [run], reference=ref, plots=False)
    assert "reproduced within 0.00 points" in (run / "reproduction.md").read_text()
    build_report(SUITE, [run], plots=False)
    assert not (run / "reproduction.md").exists()
    assert not any(p.name.startswith(".report-") for p in run.iterdir() if p.is_dir())


def test_smoke_run_is_not_compared_with_a_full_reference(tmp_path: Path) -> None:
    run, ref = folders(tmp_path)
    write_all(run, base_records(smoke=True))
    write_all(ref, base_records())
    build_report(SUITE, [run], reference=ref, plots=False)
    md = (run / "reproduction.md").read_text()
    assert "not compared: this run is a smoke run" in md and "| scenario |" not in md


def test_reference_that_is_the_run_folder_is_not_compared(tmp_path: Path) -> None:
    run, _ = folders(tmp_path)
    write_all(run, base_records())
    build_report(SUITE, [run], reference=run, plots=False)
    assert not (run / "reproduction.md").exists()
