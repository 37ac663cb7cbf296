"""Hostile inputs to `fct report`: corrupt run records, mixed artifacts, labels made of markup.

Every record here is crafted in a tmp folder with the factory of tests/unit/test_report.py. The report
must either refuse a bad record with one FCTError line naming it, or show every label as the
characters it is (no mathtext, no Markdown/HTML, no spreadsheet formula, no LaTeX command), and a
report that fails half-way must leave the previous one as it was.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import run_fct
from report_records import (
    SUITE,
    base_records,
    check_latex_structure,
    make_record,
    scenario_a,
    write_record,
)

from fct.errors import FCTError
from fct.io import write_json
from fct.report import build_report, load_records, validate_record
from fct.report.build import OLD_PREFIX, TMP_PREFIX
from fct.report.html import index_html
from fct.report.leaderboard import leaderboard_csv, leaderboard_markdown
from fct.report.plots import plain
from fct.report.records import SOURCE_KEY, check_same_artifacts
from fct.report.render import csv_cell, md_escape, md_line, tex_escape
from fct.report.reproduction import compare
from fct.report.summary import summarize
from fct.report.tables import scenario_markdown, scenario_tables

ROOT = Path(__file__).resolve().parents[2]


def report_files(out: Path) -> dict[str, bytes]:
    """Every file of the report under ``out`` (runs/ and the lock aside), by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).parts[0] not in ("runs", ".report.lock")
    }


def leftovers(out: Path) -> list[Path]:
    """Temp folders of a report build left in ``out``."""
    return [p for p in out.iterdir() if p.name.startswith((TMP_PREFIX, OLD_PREFIX))]


def with_artifacts(rec: dict[str, Any], **names: str) -> dict[str, Any]:
    rec["artifacts"] = {k.replace("__", "/"): v for k, v in names.items()}
    return rec


# ---------------------------------------------------------------------------------------------
# 1. Text in plots: mathtext never parsed from a label


HOSTILE_TEXT = [
    r"$\undefinedcommand$",
    r"$\frac{$",
    "$x$ and $y",
    r"price \$5 and $",
    "_starts_with_underscore",
    "two\nlines\tand\rcontrol\x00",
    r"\$\\$",
]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_plot_label_is_drawn_as_plain_text(text: str) -> None:
    from matplotlib.text import Text

    shown, is_math = Text()._preprocess_math(plain(text))
    assert not is_math
    expected = re.sub(r"[\x00-\x1f]+", " ", text)
    assert shown.strip() == expected.strip()


def test_mathtext_in_labels_scenarios_and_orders_does_not_crash(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    scenario = r"sc $\undefined$"
    for method, cross in (("independent", (5.0, 1.0)), ("fct", (45.0, 25.0))):
        rec = make_record(scenario, method, cross, label=rf"{method} $\frac{{$ $\bad$")
        rec["scenario_config"]["description"] = r"$\sqrt{$ described"
        rec["curves"] = {r"$\nope$": [10.0 + i for i in range(22)]}
        rec["auc"] = {r"$\nope$": 20.0}
        write_record(folder, rec)
    write_record(folder, make_record("b", "my_plugin", (1.0, 1.0), label="_hidden $x^$"))
    paths = build_report(SUITE, [folder])
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 4 and all(p.stat().st_size > 1000 for p in pngs)  # bars x2, curves, cost


# ---------------------------------------------------------------------------------------------
# 2. The report is swapped in whole; a failed build leaves the old one


def test_failed_report_leaves_the_previous_report_intact(tmp_path: Path, monkeypatch) -> None:
    import fct.report.plots as plots

    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, rec)
    build_report(SUITE, [folder])
    before = report_files(folder)
    runs_before = {p: p.read_bytes() for p in (folder / "runs").rglob("*.json")}
    assert "leaderboard.md" in before and "index.html" in before

    # New numbers, then a failure after the leaderboard, tables and bar charts were written.
    write_record(folder, make_record("a", "fct", (47.0, 27.0)))
    runs_before[folder / "runs" / "a" / "fct.json"] = (folder / "runs/a/fct.json").read_bytes()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "cost_scatter", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        build_report(SUITE, [folder])
    assert report_files(folder) == before
    assert leftovers(folder) == []
    assert {p: p.read_bytes() for p in (folder / "runs").rglob("*.json")} == runs_before

    monkeypatch.undo()
    # The next build goes through (no plots: the failure above is the plot test).
    build_report(SUITE, [folder], plots=False)
    after = report_files(folder)
    assert after.keys() == {k for k in before if not k.startswith("plots/")}
    assert after["leaderboard.md"] != before["leaderboard.md"]
    assert leftovers(folder) == []


def test_failed_swap_puts_the_old_report_back(tmp_path: Path, monkeypatch) -> None:
    import fct.report.build as build

    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, rec)
    build_report(SUITE, [folder])
    before = report_files(folder)
    write_record(folder, make_record("a", "fct", (47.0, 27.0)))

    assert any(k.startswith("plots/") for k in before)
    real_rename, calls = os.rename, []

    def flaky_rename(src: Any, dst: Any) -> None:
        calls.append(src)
        # The new report has no plots: old tables, plots and leaderboard.csv are aside, the
        # new tables in, the new leaderboard.csv on its way.
        if len(calls) == 5:
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(build.os, "rename", flaky_rename)
    with pytest.raises(FCTError, match="cannot write the report in .*Input/output error"):
        build_report(SUITE, [folder], plots=False)
    monkeypatch.undo()
    assert len(calls) > 5  # the rollback renamed the old entries back
    assert report_files(folder) == before
    assert leftovers(folder) == []


def test_new_report_replaces_stale_files_and_leftover_temp_folders(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["scenario"] == "b":
            write_record(folder, rec)
    build_report(SUITE, [folder])
    assert (folder / "tables" / "b.md").exists() and (folder / "plots" / "bars_b.png").exists()
    # A report killed mid-way left its temp folders; scenario b's records are gone since,
    # scenario a's came.
    (folder / f"{TMP_PREFIX}dead" / "plots").mkdir(parents=True)
    (folder / f"{OLD_PREFIX}dead").mkdir()
    for p in (folder / "runs" / "b").iterdir():
        p.unlink()
    for rec in scenario_a():
        write_record(folder, rec)
    paths = build_report(SUITE, [folder])
    expected = {p.relative_to(folder).as_posix() for p in paths}
    assert set(report_files(folder)) == expected
    assert not (folder / "tables" / "b.md").exists()
    assert leftovers(folder) == []


# ---------------------------------------------------------------------------------------------
# 3. Corrupt run records of every shape: one FCTError line naming the file


def _huge_int(rec_path: Path) -> None:
    rec_path.write_text('{"schema": 1, "seed": ' + "7" * 5000 + "}")


def _wrong_nested(mutate):
    def write(rec_path: Path) -> None:
        rec = make_record("a", "fct", (45.0, 25.0))
        mutate(rec)
        write_json(rec_path, rec)

    return write


CORRUPT = {
    "random bytes": lambda p: p.write_bytes(bytes(range(256)) * 40),
    "deep nesting": lambda p: p.write_text("[" * 200_000),
    "a list": lambda p: p.write_text(json.dumps([make_record("a", "fct", (45.0, 25.0))])),
    "a 5000-digit integer": _huge_int,
    "a folder": lambda p: (p / "inner").mkdir(parents=True),
    "cases a list": _wrong_nested(lambda r: r.update(cases=[1, 2, 3])),
    "cross a string": _wrong_nested(lambda r: r["cases"].update(cross="high")),
    "costs a list": _wrong_nested(lambda r: r.update(costs=[0.0])),
    "provenance an int": _wrong_nested(lambda r: r.update(provenance=3)),
    "n_skipped a string": _wrong_nested(lambda r: r["cases"]["cross"].update(n_skipped="lots")),
    "label a number": _wrong_nested(lambda r: r["method_config"].update(label=5)),
    "eval a list": _wrong_nested(lambda r: r["scenario_config"].update(eval=["test"])),
    "kinds an int": _wrong_nested(lambda r: r["scenario_config"].update(kinds=7)),
    "eval.dataset a dict": _wrong_nested(lambda r: r["scenario_config"]["eval"].update(dataset={})),
    "artifacts a list": _wrong_nested(lambda r: r.update(artifacts=["models/x"])),
    "artifact digest an int": _wrong_nested(lambda r: r.update(artifacts={"models/x": 1})),
    "auc a list": _wrong_nested(lambda r: r.update(auc=[1.0])),
    "weights digest a list": _wrong_nested(lambda r: r.update(artifact_weights={"models/x": []})),
    "models a string": _wrong_nested(lambda r: r.update(models="models/x")),
    "notes a number": _wrong_nested(lambda r: r.update(notes=3)),
    "smoke a string": _wrong_nested(lambda r: r.update(smoke="true")),
    "negative own training time": _wrong_nested(
        lambda r: r["costs"].update(train_seconds_method=-5.0)
    ),
    "cost 1e300": _wrong_nested(lambda r: r["costs"].update(train_seconds=1e300)),
    "negative throughput": _wrong_nested(
        lambda r: r["costs"].update(backfill_images_per_s=-1000.0)
    ),
    "seed of 4000 digits": _wrong_nested(lambda r: r.update(seed=10**3999)),
    "scenario of 1 MB": _wrong_nested(lambda r: r.update(scenario="s" * 1_000_000)),
}


@pytest.mark.parametrize("shape", list(CORRUPT))
def test_corrupt_record_is_named_in_one_line(tmp_path: Path, shape: str) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, rec)
    bad = folder / "runs" / "a" / "zz_bad.json"
    bad.parent.mkdir(parents=True, exist_ok=True)
    CORRUPT[shape](bad)
    with pytest.raises(FCTError) as e:
        load_records([folder])
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg and len(msg) < 600, msg
    assert re.search(r"delete|rerun", msg), msg


@pytest.mark.slow  # end to end: a whole `fct` command
def test_corrupt_record_through_the_cli_exits_2_without_traceback(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, rec)
    (folder / "runs" / "a" / "fct.json").unlink()
    (folder / "runs" / "a" / "fct.json").mkdir()  # a folder where a record should be
    proc = run_fct("report", SUITE, "--results", str(folder), cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "fct.json" in lines[0]


# Values that replace each value of a valid record in turn: other types, extremes, markup.
DELETE = object()  # the key is removed
FUZZ_VALUES = [
    None,
    "x",
    "<script>",
    [],
    {},
    True,
    -1,
    0,
    1e300,
    10**4000,
    [1, 2],
    {"k": 1},
    DELETE,
]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    return out


def test_every_key_of_a_record_with_every_wrong_value_is_refused_or_reported(
    tmp_path: Path,
) -> None:
    """No value anywhere in a record makes the report fail other than with an FCTError."""
    others = [r for r in base_records() if (r["scenario"], r["method"]) != ("a", "fct")]
    template = make_record("a", "fct", (45.0, 25.0), label="FCT", curves={"random": [1.0] * 22})
    template["artifacts"] = {"models/old": "d1"}
    template["artifact_weights"] = {"models/old": "0123456789abcdef0123"}
    template["models"] = {"old": "models/old", "query": "models/old"}
    template["notes"] = {"rows": 5, "what": "text"}
    template["smoke"] = False
    template["config_hash"] = "abc"
    template["costs"].update(train_seconds_method=1.0, train_seconds_shared=2.0)
    template["provenance"]["world_size"] = 1
    template["scenario_config"]["transformation"] = {"epochs": 3, "features": "cached"}
    template["scenario_config"]["old"].update(epochs=2, lr=0.1, max_per_class=10)
    template["method_config"]["settings"] = {"weight": 1.0}
    template["auc"] = {"random": 1.0}
    # The records that do not change, validated once (validate_record only reads a record).
    fixed = [{**validate_record(r, f"{i}.json"), SOURCE_KEY: f"{i}.json"}
             for i, r in enumerate(others)]  # fmt: skip
    name = f"{len(others)}.json"
    tried = refused = 0
    for key_path in _paths(template):
        for value in FUZZ_VALUES:
            rec = copy.deepcopy(template)
            node = rec
            for k in key_path[:-1]:
                node = node[k]
            if value is DELETE:
                del node[key_path[-1]]
            else:
                node[key_path[-1]] = value
            tried += 1
            try:
                recs = [*({**r} for r in fixed), {**validate_record(rec, name), SOURCE_KEY: name}]
                check_same_artifacts(recs)
                summary = summarize(recs, SUITE)
                leaderboard_csv(summary)
                leaderboard_markdown(summary)
                tables = [scenario_tables(summary, s) for s in summary.scenarios]
                for t in tables:
                    scenario_markdown(t)
                index_html(summary, tables, {})
                summary.reproduction = compare(summary, Path("ref"), recs)
                summary.reproduction.markdown(SUITE)
                index_html(summary, tables, {})
            except FCTError as e:
                refused += 1
                assert "\n" not in str(e) and len(str(e)) < 600, (key_path, value, str(e))
            except Exception as e:  # pragma: no cover - the failure being tested for
                raise AssertionError(f"{'.'.join(key_path)} = {repr(value)[:40]}: {e!r}") from e
    assert tried > 500 and refused > tried // 3


@pytest.mark.parametrize("value", [0.0, 1e-300, 1e15])
def test_extreme_costs_still_plot(tmp_path: Path, value: float) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        for key in ("train_seconds", "transform_embeddings_per_s", "backfill_images_per_s"):
            rec["costs"][key] = value
        rec["costs"]["backfill_fraction"] = 0.5 if rec["method"] == "fct" else 0.0
        write_record(folder, rec)
    paths = build_report(SUITE, [folder])
    assert (folder / "plots" / "update_cost.png") in paths


# ---------------------------------------------------------------------------------------------
# 4. Markdown, CSV and LaTeX show labels as text


MARKUP = {
    "script": "<script>alert(1)</script>",
    "img": "<img src=x onerror=alert(1)>",
    "link": "[click](javascript:alert(1))",
    "autolink": "<javascript:alert(1)>",
    "pipe": "a|b|c",
    "code": "`rm -rf /`",
    "emphasis": "**bold** _it_ ~~gone~~",
    "entity": "&lt;script&gt;",
}


def test_markdown_escapes_html_and_markdown_from_records(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        rec["scenario_config"]["description"] = "<script>x</script>\n# heading\n> quote `c`"
        rec["scenario_config"]["eval"]["dataset"] = "<img src=x onerror=alert(1)>"
        write_record(folder, rec)
    for i, label in enumerate(MARKUP.values()):
        write_record(folder, make_record("a", f"plugin{i}", (1.0, 1.0), label=label))
    write_record(folder, make_record("a", "dev", (2.0, 2.0), device="<b>gpu</b> | `x`"))
    build_report(SUITE, [folder], plots=False)
    for path in [folder / "leaderboard.md", *sorted((folder / "tables").glob("*.md"))]:
        md = path.read_text()
        assert "<" not in md, path  # no tag, comment or autolink of any kind
        assert re.search(r"(?<!\\)\]\(", md) is None, "a link"
        assert re.search(r"(?<!\\)`", md) is None, "an unescaped backtick"
        assert re.search(r"(?<!\\)\*\*", md) is None and re.search(r"(?<!\\)~~", md) is None
        assert not re.search(r"^#+ heading|^> quote", md, flags=re.M)
        # Every row of a table is as wide as its header: no "|" from a label split a cell.
        blocks, current = [], []
        for line in [*md.splitlines(), ""]:
            if line.startswith("|"):
                current.append(len(re.split(r"(?<!\\)\|", line)))
            elif current:
                blocks.append(current)
                current = []
        assert blocks and all(len(set(b)) == 1 for b in blocks), (path, blocks)
    board = (folder / "leaderboard.md").read_text()
    assert md_escape(MARKUP["script"]) in board and md_escape(MARKUP["pipe"]) in board
    assert "&amp;lt;script&amp;gt;" in board  # an entity in a label is shown, not decoded


@pytest.mark.parametrize("text", list(MARKUP.values()) + ["# h", "> q", "- l", "1. o", "=\n"])
def test_md_escape_leaves_no_markup(text: str) -> None:
    for out in (md_escape(text), md_line(text)):
        assert "<" not in out and "\n" not in out
        assert re.search(r"(?<!\\)[`|\[\]*_~]", out) is None
    assert re.match(r"[#>\-+=]|\d+[.)]", md_line(text)) is None


def test_csv_neutralises_formulas_but_keeps_numbers(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        write_record(folder, rec)
    evil = {
        "m_eq": '=HYPERLINK("http://x","y")',
        "m_plus": "+1+cmd|' /C calc'!A0",
        "m_minus": "-2+3",
        "m_at": "@SUM(A1:A2)",
        "m_tab": "\t=1",
        "m_cr": "\r=1",
    }
    for method, label in evil.items():
        write_record(folder, make_record("a", method, (1.0, 1.0), label=label))
    write_record(folder, make_record("a", "=cmd", (1.0, 1.0)), name="formula-method.json")
    build_report(SUITE, [folder], plots=False)
    with open(folder / "leaderboard.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    trigger = ("=", "+", "-", "@", "\t", "\r")
    for row in rows:
        for cell in row:
            if cell.startswith(trigger):
                float(cell)  # only a genuine number may start like a formula
    labels = {r[1]: r[2] for r in rows[1:]}
    assert labels["m_eq"] == "'" + evil["m_eq"] and labels["m_at"] == "'@SUM(A1:A2)"
    assert "'=cmd" in labels
    header = rows[0]
    bct = next(r for r in rows if r[1] == "bct")
    assert bct[header.index("a/new_new_change_mAP")] == "-5.0"  # a negative number stays one
    assert csv_cell("-1.5") == "-1.5" and csv_cell("+2e-05") == "+2e-05"
    assert csv_cell("-1.5x") == "'-1.5x" and csv_cell("\uff1dcmd") == "'\uff1dcmd"


def test_latex_escapes_labels_and_descriptions(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        rec["scenario_config"]["eval"]["dataset"] = r"\input{/etc/passwd}"
        write_record(folder, rec)
    label = "\\input{/etc/passwd} $x$ 50% a_b #1 & ~ ^ {}\n\nnew paragraph"
    write_record(folder, make_record("a", "evil", (1.0, 1.0), label=label))
    build_report(SUITE, [folder], plots=False)
    tex = (folder / "tables" / "a.tex").read_text()
    check_latex_structure(tex)
    assert "\\input" not in tex and "\n\n" not in tex
    assert tex_escape(label) in tex
    assert tex_escape("a\nb") == "a b"


# ---------------------------------------------------------------------------------------------
# 5. Records of one scenario and seed made from different artifacts are never ranked together


def test_mixed_artifacts_are_refused_naming_both_records(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        write_record(folder, with_artifacts(rec, models__old="aaa", models__new="bbb"))
    # FCT's record was made with a new model retrained since: same name, another digest.
    stale = with_artifacts(
        make_record("a", "fct", (45.0, 25.0)), models__old="aaa", models__new="ccc"
    )
    stale_path = write_record(folder, stale)
    with pytest.raises(FCTError) as e:
        build_report(SUITE, [folder], plots=False)
    msg = str(e.value)
    assert "\n" not in msg and str(stale_path) in msg and "models/new" in msg
    assert str(folder / "runs" / "a" / "bct.json") in msg  # the first record of scenario a
    assert "--force" in msg and "scenario a, seed 0" in msg
    assert not (folder / "leaderboard.md").exists()


def test_same_artifacts_or_other_seeds_are_fine(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        write_record(folder, with_artifacts(rec, models__old="aaa", models__new="bbb"))
        # Seed 1 trains other models: other digests under the same names are expected.
        rec1 = with_artifacts(copy.deepcopy(rec), models__old="a1", models__new="b1")
        rec1["seed"] = 1
        write_record(folder, rec1)
    # A stale duplicate of a/fct that the newer record replaces is not compared either.
    old_copy = with_artifacts(
        make_record("a", "fct", (45.0, 25.0), date="2026-01-01T00:00:00Z"), models__new="zzz"
    )
    write_record(folder, old_copy, name="fct.old-copy.json")
    assert len(load_records([folder])) == 16


class _CountingDict(dict):
    """A record that counts how often its fields are read."""

    reads = 0

    def get(self, key, default=None):
        _CountingDict.reads += 1
        return super().get(key, default)

    def __getitem__(self, key):
        _CountingDict.reads += 1
        return super().__getitem__(key)


def test_artifact_check_is_one_pass() -> None:
    """Each record's fields are read a fixed number of times, however many records there are
    (counted, not timed: a pairwise comparison reads each record once per other record)."""
    reads = {}
    for n in (200, 2000):
        recs = []
        for i in range(n):
            rec = {"suite": SUITE, "scenario": f"s{i % 50}", "seed": i // 100, SOURCE_KEY: str(i)}
            rec["artifacts"] = {f"models/m{j}": f"d{i % 50}-{j}-{i // 100}" for j in range(6)}
            recs.append(_CountingDict(rec))
        _CountingDict.reads = 0
        check_same_artifacts(recs)
        reads[n] = _CountingDict.reads
    assert reads[2000] == 10 * reads[200], reads
    assert reads[2000] <= 10 * 2000, reads


# ---------------------------------------------------------------------------------------------
# File names from scenario names


def test_scenarios_that_clean_to_one_name_get_their_own_files(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for scenario in ("a b", "a_b", "x" * 200):
        for method, cross in (("independent", (5.0, 1.0)), ("fct", (45.0, 25.0))):
            write_record(folder, make_record(scenario, method, cross), name=f"{method}.json")
    # write_record puts each in runs/SCENARIO/; the 200-char folder name is still allowed.
    paths = build_report(SUITE, [folder], plots=False)
    tables = sorted(p.name for p in paths if p.suffix == ".md" and p.parent.name == "tables")
    assert len(tables) == 3 and "a_b.md" in tables
    assert all(len(name) < 100 for name in tables)
