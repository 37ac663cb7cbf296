"""The report of sequence records (fct.report.sequences, the leaderboard's AC and mean
columns) on crafted records, and the schema's checks of the ``sequence`` key."""

from __future__ import annotations

import copy

import pytest
from report_records import check_latex_structure, make_record, read_csv, write_record

from fct.errors import FCTError
from fct.record import validate_record
from fct.report import build_report
from fct.sequence_metrics import summarize


def seq_key(matrix: list[list[float | None]]) -> dict:
    s = summarize(matrix)
    return {
        "models": [{"artifact": f"models/m{k}", "digest": f"d{k}"} for k in range(len(matrix))],
        "matrix": {"mAP": copy.deepcopy(matrix), "top1": copy.deepcopy(matrix)},
        "compatible": {"mAP": s["compatible"], "top1": s["compatible"]},
        "AC": s["AC"],
        "BC": s["BC"],
        "FC": s["FC"],
        "mean": s["mean"],
        "direct": None,
    }


FCT = [[10.0, None, None], [12.0, 20.0, None], [9.0, 25.0, 30.0]]  # AC 2/3, mean 106/6
IND = [[10.0, None, None], [2.0, 20.0, None], [1.0, 3.0, 30.0]]  # AC 0


def records():
    return [
        make_record("pair", "independent", (20.0, 10.0)),
        make_record("pair", "fct", (35.0, 20.0)),
        make_record("seq", "independent", (1.0, 1.0), sequence=seq_key(IND)),
        make_record(
            "seq",
            "fct",
            (9.0, 9.0),
            sequence={**seq_key(FCT), "direct": {"mAP": 11.0, "top1": 12.0}},
        ),
    ]


def test_heatmaps_table_and_leaderboard_columns(tmp_path):
    for rec in records():
        write_record(tmp_path, rec)
    build_report("quickstart", [tmp_path], tmp_path)
    rows = read_csv(tmp_path / "leaderboard.csv")
    assert float(rows["fct"]["seq/seq_AC"]) == pytest.approx(2 / 3, abs=1e-4)
    assert float(rows["fct"]["seq/seq_mean_mAP"]) == pytest.approx(106 / 6, abs=1e-4)
    assert float(rows["independent"]["seq/seq_AC"]) == 0.0
    assert rows["fct"]["pair/seq_AC"] == "" and rows["fct"]["pair/seq_mean_mAP"] == ""
    for metric in ("mAP", "top1"):
        assert (tmp_path / "plots" / f"sequence_seq_{metric}.png").stat().st_size > 1000
    assert not (tmp_path / "plots" / "sequence_pair_mAP.png").exists()
    md = (tmp_path / "tables" / "sequence_seq.md").read_text()
    fct_row = next(line for line in md.splitlines() if line.startswith("| FCT"))
    # AC, BC, FC, mean, then M00 M10 M11 M20 M21 M22 (✓ where M[i][j] > M[j][j]), direct
    cells = [c.strip() for c in fct_row.strip("|").split("|")]
    assert cells[1:5] == ["0.67", "+2.0", "−6.5", "17.7"]
    assert cells[5:11] == ["10.0", "12.0 ✓", "20.0", "9.0", "25.0 ✓", "30.0"]
    assert cells[11] == "11.0"
    check_latex_structure((tmp_path / "tables" / "sequence_seq.tex").read_text())
    assert not (tmp_path / "tables" / "sequence_pair.md").exists()


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda s: s["matrix"]["mAP"][0].__setitem__(1, 3.0), "sequence.matrix.mAP"),
        (lambda s: s["matrix"]["top1"].pop(), "sequence.matrix.top1"),
        (lambda s: s.__setitem__("AC", 1.5), "sequence.AC"),
        (lambda s: s.__setitem__("BC", "x"), "sequence.BC"),
        (lambda s: s["models"].pop(), "sequence.models"),
    ],
)
def test_a_malformed_sequence_key_is_named(change, key):
    rec = copy.deepcopy(records()[3])
    validate_record(rec, "r.json")
    change(rec["sequence"])
    with pytest.raises(FCTError, match=key.replace(".", r"\.")):
        validate_record(rec, "r.json")
