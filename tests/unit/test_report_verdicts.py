"""Reports from fabricated run records: labels and method identity from the records, display
order of suite variants, the "within 1 std" verdict over seeds, and the cosine / norm-ratio
diagnostic columns (blank for records that predate them)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest
from report_records import SUITE, base_records, make_record, read_csv, write_record

from fct.errors import FCTError
from fct.io import write_json
from fct.report import METRICS, build_report, load_records
from fct.report.summary import summarize


def variant(
    scenario: str,
    method: str,
    base: str,
    cross: tuple[float, float],
    label: str | None = None,
    settings: dict[str, Any] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """A record of ``method`` run as a suite variant of the registered method ``base``."""
    rec = make_record(scenario, method, cross, **kw)
    rec["method_config"] = {"name": method, "base": base, "settings": settings or {}}
    if label is not None:
        rec["label"] = label
        rec["method_config"]["label"] = label
    return rec


def table_names(md: str) -> list[str]:
    """The first cell of every row of the paper table (header and separator left out)."""
    paper = md.split("## ")[0]
    names = [line.split("|")[1].strip() for line in paper.splitlines() if line.startswith("| ")]
    return names[1:]


# ---------------------------------------------------------------------------------------------
# Labels and method identity


def test_label_comes_from_the_record(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["method"] == "fct":
            rec["label"] = "FCT (top-level label)"  # the record's own label wins
            rec["method_config"]["label"] = "FCT (method_config label)"
        if rec["method"] == "fct_side":
            rec["method_config"]["label"] = "FCT with psi"  # older records: method_config only
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    assert rows["fct"]["label"] == "FCT (top-level label)"
    assert rows["fct_side"]["label"] == "FCT with psi"
    assert rows["bct"]["label"] == "BCT"  # no label anywhere: the built-in default
    md = (folder / "tables" / "a.md").read_text()
    assert "FCT (top-level label)" in table_names(md)


def test_variants_follow_their_base_and_plugins_come_last(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["scenario"] == "a":
            write_record(folder, rec)
    new = (50.0, 30.0)
    extra = [
        variant("a", "aaa_plugin", "aaa_plugin", (41.0, 21.0), "A plugin", new=new),
        variant("a", "bct_scaled", "bct", (42.0, 22.0), "BCT, scaled", new=new),
        variant("a", "bct_norm", "bct", (43.0, 23.0), "BCT, normalised", new=new),
        variant("a", "fct_wide", "fct", (46.0, 26.0), "FCT, wide h"),
        variant("a", "l2_bct", "l2_bct", (44.0, 24.0), new=new),
        variant("a", "aaa_plugin_v2", "aaa_plugin", (41.5, 21.5), "A plugin v2", new=new),
    ]
    for rec in extra:
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    names = [n for n in table_names((folder / "tables" / "a.md").read_text()) if "new/new" not in n]
    assert names == [
        "old/old",
        "Independent",
        "BCT",
        "BCT, normalised",  # variants right after their base, by run name
        "BCT, scaled",
        "FCT",
        "FCT, wide h",
        "FCT + side-info",
        "L2-BCT",  # a built-in without label: its default label
        "A plugin",  # plugins last, each followed by its own variants
        "A plugin v2",
    ]


def test_methods_that_train_their_own_new_model_get_a_new_new_row(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["scenario"] == "a" and rec["method"] != "bct":
            write_record(folder, rec)
    same = (55.0, 35.0)  # Independent's new/new: no numeric difference to go by
    for rec in (
        variant("a", "bct_scaled", "bct", (42.0, 22.0), "BCT, scaled", new=same),
        variant("a", "ract", "ract", (43.0, 23.0), new=same),
        variant("a", "fct_wide", "fct", (46.0, 26.0), "FCT, wide h", new=(55.2, 35.4)),
    ):
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    names = table_names((folder / "tables" / "a.md").read_text())
    assert "BCT, scaled new/new" in names and "RACT new/new" in names
    assert "FCT, wide h new/new" not in names  # FCT's base keeps Independent's new model
    rows = read_csv(folder / "leaderboard.csv")
    assert float(rows["bct_scaled"]["a/new_new_change_mAP"]) == 0.0


def with_models(rec: dict[str, Any], new_digest: str) -> dict[str, Any]:
    rec["artifacts"] = {"models/old-0-4": "old1", f"models/new-{new_digest}": new_digest}
    return rec


def test_plugin_new_model_identified_by_artifact_digest(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["scenario"] == "a" and rec["method"] in ("independent", "fct"):
            write_record(folder, with_models(rec, "ind"))
    # Same digest as Independent's new model, new/new numbers off by rounding elsewhere: no row.
    reuse = with_models(make_record("a", "reuse", (40.0, 20.0), new=(54.0, 34.0)), "ind")
    # Its own new model (another digest), numbers equal to Independent's: a row all the same.
    own = with_models(make_record("a", "own", (40.0, 20.0), new=(55.0, 35.0)), "own")
    write_record(folder, reuse)
    write_record(folder, own)
    build_report(SUITE, [folder], plots=False)
    names = table_names((folder / "tables" / "a.md").read_text())
    assert "own new/new" in names
    assert "reuse new/new" not in names


def test_independent_is_found_by_base_in_older_records() -> None:
    recs = [
        {**r, "_path": f"{i}.json"}
        for i, r in enumerate(base_records())
        if r["scenario"] == "a" and r["method"] != "independent"
    ]
    recs.append(variant("a", "indep_run", "independent", (5.0, 1.0), "Independent (renamed)"))
    recs[-1]["_path"] = "x.json"
    summary = summarize(recs, SUITE)
    assert summary.baseline("a") == "indep_run"
    assert summary.reference("a", "new/new").method == "indep_run"
    assert summary.cell("a", "bct").stats["new_new_change_mAP"].mean == pytest.approx(-5.0)


def declared(
    rec: dict[str, Any], order: int | None, role: str = "method", keeps: bool | None = None
) -> dict[str, Any]:
    """``rec`` as written since methods declare their traits (fct.record.MethodTraits)."""
    rec["method_config"].update(report_order=order, role=role, keeps_new_model=keeps)
    return rec


def test_declared_traits_decide_not_the_method_names(tmp_path: Path) -> None:
    """Records that carry ``report_order``, ``role`` and ``keeps_new_model`` are ordered and
    read by them: a plugin baseline is the reference, a method named "independent" that says
    it is not the baseline is not, a plugin's declared order places it among the built-ins,
    and a declared own new model gets its new/new row with Independent's very numbers."""
    folder = tmp_path / "r"
    recs = [
        declared(make_record("a", "independent", (5.0, 1.0)), 10, keeps=True),
        declared(make_record("a", "my_baseline", (6.0, 2.0), new=(60.0, 40.0)), 99, "baseline"),
        declared(make_record("a", "fct", (45.0, 25.0), new=(60.0, 40.0)), 30, keeps=True),
        declared(make_record("a", "mine", (41.0, 21.0), new=(60.0, 40.0)), 15, keeps=False),
        declared(make_record("a", "later", (42.0, 22.0), new=(61.0, 41.0)), None, keeps=True),
    ]
    for rec in recs:
        write_record(folder, rec)
    summary = summarize([{**r, "_path": f"{r['method']}.json"} for r in recs], SUITE)
    assert summary.methods == ["independent", "mine", "fct", "my_baseline", "later"]
    assert summary.baseline("a") == "my_baseline"
    assert summary.reference("a", "new/new").method == "my_baseline"
    assert summary.cell("a", "independent").stats["new_new_change_mAP"].mean == -5.0
    assert summary.cell("a", "my_baseline").stats["new_new_change_mAP"].mean == 0.0
    build_report(SUITE, [folder], plots=False)
    names = table_names((folder / "tables" / "a.md").read_text())
    assert "mine new/new" in names  # declared: no numeric difference needed
    assert "later new/new" not in names  # declared to keep it: its new/new differs by 1 point
    assert "FCT new/new" not in names


def test_records_without_traits_fall_back_to_the_names_only_then(tmp_path: Path) -> None:
    """A record written before the traits (no keys) is read by its registered name; one of
    the same name written since is read by what it declares."""
    old = [r for r in base_records() if r["scenario"] == "a"]
    summary = summarize([{**r, "_path": f"{i}.json"} for i, r in enumerate(old)], SUITE)
    assert summary.baseline("a") == "independent"
    assert summary.shares_new_model("a", "fct") and not summary.shares_new_model("a", "bct")
    new = copy.deepcopy(old)
    for rec in new:
        declared(rec, None)  # nothing declared: a plugin's defaults
    summary = summarize([{**r, "_path": f"{i}.json"} for i, r in enumerate(new)], SUITE)
    assert summary.baseline("a") is None
    assert summary.methods == ["bct", "fct", "fct_side", "independent"]  # by name
    assert summary.shares_new_model("a", "fct") is None  # the table compares the numbers


# ---------------------------------------------------------------------------------------------
# Verdicts over seeds


def seeded(method: str, cross_by_seed: list[tuple[float, float]]) -> list[dict[str, Any]]:
    return [
        make_record("a", method, cross, seed=seed, old=(30.0, 15.0))
        for seed, cross in enumerate(cross_by_seed)
    ]


def test_verdict_within_one_std_over_seeds(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    recs = [
        # cross mAP 14, 16.5, 17.5: mean 16.0 > 15 but std 1.8 > the margin of 1.0.
        *seeded("fct", [(45.0, 14.0), (45.0, 16.5), (45.0, 17.5)]),
        # Far above old/old on both measures: a plain yes.
        *seeded("fct_side", [(50.0, 28.0), (51.0, 29.0), (49.0, 27.0)]),
        # top-1 29.5, 29.0, 30.6 (mean 29.7 < 30, std 0.8): a no within noise.
        *seeded("bct", [(29.5, 20.0), (29.0, 20.0), (30.6, 20.0)]),
        # Far below on top-1: a plain no.
        *seeded("independent", [(5.0, 1.0), (6.0, 1.0), (5.5, 1.0)]),
    ]
    for rec in recs:
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    assert rows["fct"]["a/compatible"] == "yes (within 1 std)"
    assert rows["fct_side"]["a/compatible"] == "yes"
    assert rows["bct"]["a/compatible"] == "no (within 1 std)"
    assert rows["independent"]["a/compatible"] == "no"
    md = (folder / "leaderboard.md").read_text()
    marks = {
        name: next(line for line in md.splitlines() if f" | {name} | " in line).split("|")[-2]
        for name in ("FCT + side-info", "FCT", "BCT", "Independent")
    }
    assert {k: v.strip() for k, v in marks.items()} == {
        "FCT + side-info": "✓",
        "FCT": "(✓)",
        "BCT": "(✗)",
        "Independent": "✗",
    }
    assert "sample standard deviation of the cross case's values over seeds" in md
    html = (folder / "index.html").read_text()
    assert "(✓)" in html and "within 1 std" in html


def test_single_seed_verdict_has_no_std_mark(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if (rec["scenario"], rec["method"]) == ("a", "fct"):
            rec["cases"]["cross"]["mAP"] = 15.01  # a hair above old/old, one seed: plain yes
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    assert read_csv(folder / "leaderboard.csv")["fct"]["a/compatible"] == "yes"
    assert "within 1 std" not in (folder / "leaderboard.md").read_text()


# ---------------------------------------------------------------------------------------------
# Cosine and norm-ratio diagnostics


def with_diagnostics(rec: dict[str, Any], cos_top1: float, cos_map: float, ratio: float) -> dict:
    rec["cases_cosine"] = copy.deepcopy(rec["cases"])
    rec["cases_cosine"]["cross"].update(top1=cos_top1, mAP=cos_map, distance="cosine")
    rec["diagnostics"] = {"cross_norm_ratio": ratio}
    return rec


def test_cosine_and_norm_ratio_columns_blank_for_old_records(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["method"] == "bct":
            rec = with_diagnostics(rec, 43.5, 22.25, 1.8765)
        elif rec["method"] == "fct":
            rec = with_diagnostics(rec, 45.0, 25.5, 1.02)
        write_record(folder, rec)  # independent and fct_side: older records without them
    build_report(SUITE, [folder], plots=False)
    with open(folder / "leaderboard.csv", newline="") as fh:
        header = next(csv.reader(fh))
    for s in ("a", "b"):
        assert {f"{s}/cross_cos_top1", f"{s}/cross_cos_mAP", f"{s}/cross_norm_ratio"} <= set(header)
    rows = read_csv(folder / "leaderboard.csv")
    assert float(rows["bct"]["a/cross_cos_mAP"]) == 22.25
    assert float(rows["bct"]["a/cross_cos_top1"]) == 43.5
    assert float(rows["bct"]["a/cross_norm_ratio"]) == 1.8765
    assert rows["independent"]["a/cross_cos_mAP"] == ""
    assert rows["fct_side"]["b/cross_norm_ratio"] == ""
    md = (folder / "leaderboard.md").read_text()
    assert "a cos mAP" in md and "a norm ratio" in md and "1.88" in md
    assert "mean norm of the cross case's queries" in md
    fct_side = next(line for line in md.splitlines() if "| FCT + side-info |" in line)
    assert fct_side.count("–") >= 6  # three blank diagnostics per scenario
    assert "norm ratio" in (folder / "index.html").read_text()
    # The paper table keeps the scenario's own distance: the cosine numbers are not in it.
    table = (folder / "tables" / "a.md").read_text()
    assert "22.2" not in table and "1.88" not in table


def test_no_diagnostic_columns_without_any_measurement(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    header = (folder / "leaderboard.csv").read_text().splitlines()[0]
    assert "cross_cos" not in header and "norm_ratio" not in header


def test_diagnostic_metrics_in_the_metric_table() -> None:
    ratio = METRICS["cross_norm_ratio"]
    assert ratio.description and "closer to 1 is better" in ratio.axis_label
    assert ratio.format(1.2345) == "1.23"
    cos = METRICS["cross_cos_mAP"]
    assert "cosine" in cos.description and "higher is better" in cos.axis_label
    assert METRICS["cross_cos_top1"].format(None) == "–"


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda r: r.update(cases_cosine=[1]), "cases_cosine"),
        (lambda r: r.update(cases_cosine={"cross": {"mAP": "x"}}), "cases_cosine.cross.mAP"),
        (
            lambda r: r.update(diagnostics={"cross_norm_ratio": "big"}),
            "diagnostics.cross_norm_ratio",
        ),
        (lambda r: r.update(label=7), "label"),
        (lambda r: r["method_config"].update(base=["bct"]), "method_config.base"),
    ],
)
def test_bad_new_keys_are_refused_naming_them(tmp_path: Path, mutate, key: str) -> None:
    folder = tmp_path / "r"
    rec = make_record("a", "fct", (45.0, 25.0))
    mutate(rec)
    path = write_json(folder / "runs" / "a" / "fct.json", rec)
    with pytest.raises(FCTError) as e:
        load_records([folder])
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value) and "\n" not in str(e.value)
