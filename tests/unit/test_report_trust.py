"""Records a reader can trust (issue 14): smoke runs marked and never mixed with full runs,
records made from other trained weights refused, the new/new change and the training-time
split explained, provenance and training settings on the page, pandas not a dependency."""

from __future__ import annotations

import ast
import copy
import csv
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from report_records import SUITE, base_records, make_record, read_csv, write_record

from fct.errors import FCTError
from fct.report import build_report, load_records
from fct.report.details import value_text
from fct.report.summary import SMOKE_TITLE

ROOT = Path(__file__).resolve().parents[2]


def build(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    folder = tmp_path / "r"
    for rec in records:
        write_record(folder, rec)
    build_report(
        SUITE, [folder], plots=False
    )  # tables and page only: plots are tested in test_report
    return folder


def scenario_a(**kw: Any) -> list[dict[str, Any]]:
    return [r for r in base_records(**kw) if r["scenario"] == "a"]


# ---------------------------------------------------------------------------------------------
# Smoke runs


def test_smoke_report_is_marked_everywhere(tmp_path: Path) -> None:
    folder = build(tmp_path, scenario_a(smoke=True))
    md = (folder / "leaderboard.md").read_text()
    assert md.splitlines()[0] == f"# Leaderboard: quickstart — {SMOKE_TITLE}"
    page = (folder / "index.html").read_text()
    h1 = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert SMOKE_TITLE in h1
    assert re.search(r'<div class="banner"[^>]*>SMOKE RUN', page)
    with open(folder / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[0] == "smoke" and {r["smoke"] for r in rows} == {"yes"}
    assert SMOKE_TITLE in (folder / "tables" / "a.md").read_text().splitlines()[0]
    assert SMOKE_TITLE in (folder / "tables" / "a.tex").read_text()


def test_full_report_has_no_smoke_mark(tmp_path: Path) -> None:
    # Records of before the flag (no key) and full runs (false) are full runs.
    recs = scenario_a()
    recs[0]["smoke"] = False
    folder = build(tmp_path, recs)
    assert "SMOKE" not in (folder / "leaderboard.md").read_text()
    assert "SMOKE" not in (folder / "index.html").read_text()
    assert "smoke" not in (folder / "leaderboard.csv").read_text().splitlines()[0]


def test_smoke_and_full_records_are_refused_together(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, rec)
    smoke = make_record("a", "my_smoke", (50.0, 28.0), smoke=True)
    smoke_path = write_record(folder, smoke)
    with pytest.raises(FCTError) as e:
        build_report(SUITE, [folder], plots=False)
    msg = str(e.value)
    assert "\n" not in msg and str(smoke_path) in msg and "--smoke" in msg
    assert str(folder / "runs" / "a" / "bct.json") in msg  # one full record, named
    assert not (folder / "leaderboard.md").exists()


def test_smoke_must_be_a_boolean(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    write_record(folder, make_record("a", "fct", (45.0, 25.0), smoke="yes"))
    with pytest.raises(FCTError, match="key 'smoke' must be true or false"):
        load_records([folder])


# ---------------------------------------------------------------------------------------------
# Records made from other trained weights, or other shared models


def with_models(rec: dict[str, Any], weights: str, old: str = "models/old") -> dict[str, Any]:
    rec["artifacts"] = {old: "key1", "models/new": "key2"}
    rec["artifact_weights"] = {old: weights, "models/new": "w-new"}
    rec["models"] = {"old": old, "query": "models/new"}
    return rec


def test_same_key_other_weights_are_refused_naming_both_records(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, with_models(rec, "a" * 20))
    # The same config trained again on another machine: same key digest, other weights.
    other = with_models(make_record("a", "my_plugin", (45.0, 25.0)), "b" * 20)
    other_path = write_record(folder, other)
    with pytest.raises(FCTError) as e:
        build_report(SUITE, [folder], plots=False)
    msg = str(e.value)
    assert "\n" not in msg and str(other_path) in msg
    assert str(folder / "runs" / "a" / "bct.json") in msg
    assert "trained weights of models/old" in msg and "--rerun" in msg and "--out" in msg


def test_unknown_weights_and_other_seeds_are_not_compared(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, with_models(rec, "a" * 20))
        seed1 = with_models(copy.deepcopy(rec), "c" * 20)  # seed 1: other weights, fine
        seed1["seed"] = 1
        write_record(folder, seed1)
    unknown = with_models(make_record("a", "my_plugin", (45.0, 25.0)), "x")
    unknown["artifact_weights"]["models/old"] = None  # the runner could not read the manifest
    write_record(folder, unknown)
    assert len(load_records([folder])) == 9


def test_other_old_model_in_one_scenario_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, with_models(rec, "a" * 20))
    other = with_models(make_record("a", "my_plugin", (45.0, 25.0)), "a" * 20, old="models/old2")
    write_record(folder, other)
    with pytest.raises(FCTError, match=r"different old models \(models/old vs models/old2\)"):
        load_records([folder])


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("artifact_weights", ["models/old"], "key 'artifact_weights' must be an object"),
        (
            "artifact_weights",
            {"models/old": 5},
            "key 'artifact_weights.models/old' must be a digest",
        ),
        ("models", {"old": 3}, "key 'models.old' must be an artifact name"),
        ("models", {"old": None}, "key 'models.old' must be an artifact name"),
        ("notes", ["a note"], "key 'notes' must be an object"),
    ],
)
def test_new_record_keys_are_type_checked(
    tmp_path: Path, key: str, value: Any, needle: str
) -> None:
    folder = tmp_path / "r"
    path = write_record(folder, make_record("a", "fct", (45.0, 25.0), **{key: value}))
    with pytest.raises(FCTError) as e:
        load_records([folder])
    assert needle in str(e.value) and str(path) in str(e.value)


def test_query_model_role_decides_who_has_an_own_new_model(tmp_path: Path) -> None:
    recs = scenario_a()
    for rec in recs:
        rec["artifacts"] = {"models/old": "k1", "models/new": "k2"}
        rec["models"] = {"old": "models/old", "query": "models/new"}
    # A plugin that queried with Independent's new model: no new/new row of its own, even
    # though its new/new numbers differ (another evaluation subset, say).
    same = make_record("a", "aaa_same", (45.0, 25.0), new=(40.0, 20.0), label="Same model")
    same["artifacts"] = {"models/old": "k1", "models/new": "k2"}
    same["models"] = {"old": "models/old", "query": "models/new"}
    own = make_record("a", "aaa_own", (45.0, 25.0), new=(55.0, 35.0), label="Own model")
    own["artifacts"] = {"models/old": "k1", "models/new": "k2", "models/own": "k3"}
    own["models"] = {"old": "models/old", "query": "models/own"}
    folder = build(tmp_path, [*recs, same, own])
    md = (folder / "tables" / "a.md").read_text()
    assert "| Own model new/new |" in md and "| Same model new/new |" not in md


# ---------------------------------------------------------------------------------------------
# new/new change and the training-time split


def test_new_new_change_is_named_and_explained(tmp_path: Path) -> None:
    folder = build(tmp_path, base_records())
    md = (folder / "leaderboard.md").read_text()
    assert "new/new change" in md and "new/new cost" not in md
    assert "positive = the method's new model is better than Independent's" in md
    rows = read_csv(folder / "leaderboard.csv")
    assert float(rows["bct"]["a/new_new_change_mAP"]) == -5.0  # 30 − 35: worse, negative
    assert "a/new_new_cost_mAP" not in rows["bct"]


def cost_rows(folder: Path, scenario: str = "a") -> dict[str, list[str]]:
    md = (folder / "tables" / f"{scenario}.md").read_text()
    section = md.split("## Update cost")[1].split("## ")[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ")
    ]
    return {r[0]: r for r in rows}


def test_training_time_split_into_own_and_shared(tmp_path: Path) -> None:
    recs = scenario_a()
    for rec in recs:
        own = {"independent": 0.0, "bct": 40.0, "fct": 7.5, "fct_side": 9.0}[rec["method"]]
        rec["costs"].update(
            train_seconds=100.0 + own, train_seconds_method=own, train_seconds_shared=100.0
        )
    recs[0]["costs"].pop("train_seconds_method")  # a record of before the split
    recs[0]["costs"].pop("train_seconds_shared")
    folder = build(tmp_path, recs)
    rows = cost_rows(folder)
    header = rows["method"]
    assert header[-3:] == ["train s (method)", "train s (shared)", "train s (total)"]
    assert rows["FCT"][-3:] == ["7.5", "100.0", "107.5"]
    assert rows["BCT"][-3:] == ["40.0", "100.0", "140.0"]
    first = next(r for r in rows.values() if r[-2] == "n/a")
    assert first[-3:] == ["n/a", "n/a", f"{recs[0]['costs']['train_seconds']:.1f}"]
    md = (folder / "tables" / "a.md").read_text()
    assert "n/a: the record predates the split" in md


@pytest.mark.parametrize("value", [-1.0, "fast", True])
def test_training_time_split_is_validated(tmp_path: Path, value: Any) -> None:
    folder = tmp_path / "r"
    write_record(
        folder, make_record("a", "fct", (45.0, 25.0), costs={"train_seconds_shared": value})
    )
    with pytest.raises(FCTError, match="costs.train_seconds_shared"):
        load_records([folder])


# ---------------------------------------------------------------------------------------------
# Provenance, settings and notes on the page


def test_page_shows_provenance(tmp_path: Path) -> None:
    recs = base_records()
    for i, rec in enumerate(recs):
        rec["provenance"]["git_sha"] = "a" * 40 if i < 6 else "b" * 40 + "-dirty"
        rec["provenance"]["world_size"] = 2
        rec["provenance"]["fct_version"] = "0.1.0"
    recs[-1]["provenance"]["date"] = "2026-11-28T09:30:00Z"
    folder = build(tmp_path, recs)
    page = (folder / "index.html").read_text()
    prov = page.split('<h2 id="provenance">')[1]
    assert "fct version</td>" in prov and ">0.1.0<" in prov
    assert "a" * 40 + " (6 runs); " + "b" * 40 + "-dirty (2 runs)" in prov
    assert "world size (processes)</td><td" in prov and ">2<" in prov
    assert "2026-11-26 13:00 UTC to 2026-11-28 09:30 UTC" in prov
    assert "cpu (test)" in prov


def test_page_and_tables_show_training_settings_and_notes(tmp_path: Path) -> None:
    recs = scenario_a()
    for rec in recs:
        config = rec["scenario_config"]
        config["old"].update(epochs=8, lr=0.1, batch_size=128, max_per_class=2000)
        config["new"].update(epochs=12, lr=0.05, batch_size=256, max_per_class=None)
        config["transformation"] = {"epochs": 30, "hidden": 512, "features": "cached"}
        if rec["method"] == "bct":
            rec["method_config"]["settings"] = {"weight": 10.0, "rows": "means"}
            rec["notes"] = {"influence_rows": 5, "warning": "<b>classifier</b> frozen"}
        else:
            rec["notes"] = {}
    folder = build(tmp_path, recs)
    md = (folder / "tables" / "a.md").read_text()
    settings = md.split("## Settings")[1]
    assert "| old | fashion_mnist | 0-4 | 2000 | resnet18 | ce | 128 | 8 | 0.1 | 128 |" in settings
    assert (
        "| new (Independent's) | fashion_mnist | 0-9 | all | resnet18 | ce | 128 | 12 | 0.05 | 256 |"
        in settings
    )
    assert "images per class" in settings and "epochs" in settings and "batch" in settings
    assert "transformation h: epochs=30, features=cached, hidden=512" in settings
    assert "| BCT | bct | bct | rows=means, weight=10 |" in settings
    assert "influence_rows=5" in settings and "&lt;b>classifier&lt;/b> frozen" in settings
    page = (folder / "index.html").read_text()
    assert "<h3>Settings</h3>" in page and "images per class" in page
    assert "influence_rows=5, warning=&lt;b&gt;classifier&lt;/b&gt; frozen" in page
    assert "<b>classifier" not in page


def test_no_notes_column_without_notes(tmp_path: Path) -> None:
    folder = build(tmp_path, scenario_a())  # records of before notes, and nothing to say
    settings = (folder / "tables" / "a.md").read_text().split("## Settings")[1]
    assert "| method | run name | base | settings |" in settings
    assert "notes" not in settings.split("| method |")[1].splitlines()[0]


def test_value_text_is_bounded_whatever_the_record_holds() -> None:
    assert value_text(10**4000).startswith("~1e")
    assert value_text([0, 5]) == "[0, 5]"
    assert value_text({"a": True, "b": None, "c": 1e-05}) == "{a: true, b: null, c: 1e-05}"
    deep: Any = 1
    for _ in range(500):
        deep = [deep]
    assert len(value_text(deep)) <= 160
    assert len(value_text("x" * 10**6)) == 160
    assert len(value_text(list(range(10**5)))) == 160


# ---------------------------------------------------------------------------------------------
# pandas: not declared, not imported (the report's tables are one Table model, three renderers)


def test_pandas_is_neither_declared_nor_imported() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [re.split(r"[<>=!~ \[;]", d)[0].lower() for d in project["dependencies"]]
    assert "pandas" not in deps
    for path in (ROOT / "fct").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "pandas" for n in names), path
