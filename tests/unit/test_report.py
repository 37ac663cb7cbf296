"""Reports from hand-made run records: leaderboard numbers, tables, plots, HTML, merging, errors."""

from __future__ import annotations

import copy
import csv
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from report_records import (  # noqa: F401  (SUITE etc.: other test files import them from here too)
    BASE,
    SUITE,
    base_records,
    case,
    check_latex_structure,
    make_record,
    ml_fct_setup,
    paper_records,
    read_csv,
    scenario_a,
    table_row,
    write_record,
)

from fct.cli import main
from fct.errors import FCTError
from fct.io import write_json
from fct.report import METRICS, build_report, load_records
from fct.report.render import tex_escape

# ---------------------------------------------------------------------------------------------
# Record factory


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results" / SUITE
    for rec in base_records():
        write_record(folder, rec)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The base records' report, built once for the tests that only read it."""
    folder = tmp_path_factory.mktemp("built") / SUITE
    for rec in base_records():
        write_record(folder, rec)
    return folder, build_report(SUITE, [folder])


# ---------------------------------------------------------------------------------------------
# Leaderboard


def test_leaderboard_numbers(built: tuple[Path, list[Path]]) -> None:
    results, paths = built
    rows = read_csv(results / "leaderboard.csv")
    fct = rows["fct"]
    assert float(fct["a/cross_top1"]) == 45.0
    assert float(fct["a/cross_mAP"]) == 25.0
    assert float(fct["a/gain_mAP"]) == pytest.approx(25.0 - 15.0)
    assert float(fct["a/new_new_change_mAP"]) == 0.0
    assert float(rows["bct"]["a/new_new_change_mAP"]) == pytest.approx(30.0 - 35.0)
    assert float(rows["bct"]["b/gain_mAP"]) == pytest.approx(14.0 - 15.0)
    assert float(rows["independent"]["a/new_new_change_mAP"]) == 0.0
    assert float(fct["mean/cross_mAP"]) == pytest.approx(24.5)
    assert float(fct["mean/cross_top1"]) == pytest.approx(44.5)
    assert fct["label"] == "FCT"
    assert rows["fct_side"]["label"] == "FCT + side-info"


def test_leaderboard_order_and_ranks(built: tuple[Path, list[Path]]) -> None:
    results, paths = built
    with open(results / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["fct_side", "fct", "bct", "independent"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    means = [float(r["mean/cross_mAP"]) for r in rows]
    assert means == sorted(means, reverse=True)
    md = (results / "leaderboard.md").read_text()
    assert (
        md.index("| 1 | FCT + side-info") < md.index("| 2 | FCT |") < md.index("| 4 | Independent")
    )


def test_compatibility_marks_and_criterion(built: tuple[Path, list[Path]]) -> None:
    results, paths = built
    rows = read_csv(results / "leaderboard.csv")
    assert rows["fct"]["a/compatible"] == "yes"
    assert rows["bct"]["a/compatible"] == "yes"
    assert rows["bct"]["b/compatible"] == "no"  # top-1 38 > 30 but mAP 14 < 15: both needed
    assert rows["independent"]["a/compatible"] == "no"
    md = (results / "leaderboard.md").read_text()
    assert "cross top-1 > old/old top-1 and cross mAP > old/old mAP" in md
    bct_line = next(line for line in md.splitlines() if "| BCT |" in line)
    assert bct_line.count("✓") == 1 and bct_line.count("✗") == 1


def test_md_header_line(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["scenario"] == "b":
            rec["provenance"]["date"] = "2026-11-28T09:00:00+00:00"
            rec["provenance"]["device"] = "NVIDIA H100"
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    header = (folder / "leaderboard.md").read_text().splitlines()[2]
    assert "quickstart" in header and "8 runs" in header
    assert "2026-11-26 to 2026-11-28" in header
    assert "cpu (test)" in header and "NVIDIA H100" in header


def test_new_new_change_blank_without_independent(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["method"] != "independent":
            write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    assert rows["bct"]["a/new_new_change_mAP"] == ""
    assert rows["fct"]["a/gain_mAP"] == "10.0"


def test_new_new_change_pairs_seeds(tmp_path: Path) -> None:
    # Independent new/new mAP 35 (seed 0), 37 (seed 1); BCT 30, 34: per-seed costs -5 and -3.
    # fct ran seed 2 only, which Independent did not: compared with Independent's mean, 36.
    folder = tmp_path / "r"
    for seed, ind, bct in ((0, 35.0, 30.0), (1, 37.0, 34.0)):
        write_record(
            folder, make_record("a", "independent", (5.0, 1.0), seed=seed, new=(55.0, ind))
        )
        write_record(folder, make_record("a", "bct", (40.0, 20.0), seed=seed, new=(50.0, bct)))
    write_record(folder, make_record("a", "fct", (45.0, 25.0), seed=2, new=(55.0, 35.5)))
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    assert float(rows["bct"]["a/new_new_change_mAP_mean"]) == pytest.approx(-4.0)
    assert float(rows["bct"]["a/new_new_change_mAP_std"]) == pytest.approx(2**0.5, abs=1e-4)
    assert float(rows["fct"]["a/new_new_change_mAP_mean"]) == pytest.approx(-0.5)


def test_method_missing_a_scenario_is_unranked(results: Path) -> None:
    write_record(results, make_record("a", "my_method", (60.0, 40.0), label="Mine"))
    build_report(SUITE, [results], plots=False)
    with open(results / "leaderboard.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["method"] == "my_method"
    assert rows[-1]["rank"] == "" and rows[-1]["mean/cross_mAP"] == ""
    assert rows[-1]["label"] == "Mine"
    assert rows[-1]["b/cross_mAP"] == ""
    assert rows[0]["method"] == "fct_side"


def test_equal_means_share_a_rank(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if rec["method"] == "bct":
            rec["cases"]["cross"]["mAP"] = BASE[(rec["scenario"], "fct")][1]
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    assert rows["fct"]["rank"] == rows["bct"]["rank"] == "2"
    assert rows["independent"]["rank"] == "4"


def test_two_seeds_mean_and_sample_std(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        write_record(folder, rec)
        if rec["method"] == "fct":
            rec2 = copy.deepcopy(rec)
            rec2["seed"] = 1
            rec2["cases"]["cross"]["mAP"] += 2.0  # seed 0: 25, seed 1: 27 on scenario a
            write_record(folder, rec2)
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    fct = rows["fct"]
    assert float(fct["a/cross_mAP_mean"]) == pytest.approx(26.0)
    assert float(fct["a/cross_mAP_std"]) == pytest.approx(
        2**0.5, abs=1e-4
    )  # sample std of (25, 27)
    assert fct["a/seeds"] == "2"
    assert rows["bct"]["a/cross_mAP_std"] == ""  # one seed: no std
    assert "a/cross_mAP" not in fct
    md = (folder / "leaderboard.md").read_text()
    assert "26.0 ± 1.4" in md
    table = (folder / "tables" / "a.md").read_text()
    assert "26.0 ± 1.4" in table and "seeds 0, 1" in table


# ---------------------------------------------------------------------------------------------
# Merging and duplicates


def test_merge_two_folders_keeps_newer_duplicate(tmp_path: Path, caplog) -> None:
    first, second = tmp_path / "machine1", tmp_path / "machine2"
    for rec in base_records():
        write_record(first if rec["scenario"] == "a" else second, rec)
    stale = make_record("a", "fct", (10.0, 5.0), date="2026-11-01T00:00:00Z")
    fresh = make_record("a", "fct", (46.0, 26.0), date="2026-11-30T00:00:00Z")
    write_record(first, stale, name="fct.old-copy.json")  # same identity as a/fct seed 0
    write_record(second, fresh)
    with caplog.at_level(logging.WARNING, logger="fct.report"):
        records = load_records([first, second])
    assert len(records) == 8
    kept = next(r for r in records if (r["scenario"], r["method"]) == ("a", "fct"))
    assert kept["cases"]["cross"]["mAP"] == 26.0
    assert kept["_path"].startswith(str(second))
    dup = [r for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(dup) >= 2 and all("a/fct seed 0" in r.getMessage() for r in dup)

    out = tmp_path / "merged"
    paths = build_report(SUITE, [first, second], out=out, plots=False)
    assert all(p.is_relative_to(out) for p in paths)
    rows = read_csv(out / "leaderboard.csv")
    assert float(rows["fct"]["a/cross_mAP"]) == 26.0
    assert set(rows) == {"independent", "bct", "fct", "fct_side"}


def test_out_defaults_to_first_folder(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for rec in base_records():
        write_record(first if rec["method"] in ("independent", "bct") else second, rec)
    paths = build_report(SUITE, [first, second], plots=False)
    assert (first / "leaderboard.csv") in paths and not (second / "leaderboard.csv").exists()


def test_records_grouped_by_content_not_filename(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        write_record(folder, rec, name=f"whatever-{rec['method']}-{rec['scenario']}.json")
    build_report(SUITE, [folder], plots=False)
    rows = read_csv(folder / "leaderboard.csv")
    assert float(rows["fct_side"]["b/cross_mAP"]) == 29.0


def test_warns_when_old_old_differs_between_methods(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "r"
    for rec in base_records():
        if (rec["scenario"], rec["method"]) == ("a", "fct"):
            rec["cases"]["old/old"]["mAP"] = 17.0  # another old model than the other methods'
        write_record(folder, rec)
    with caplog.at_level(logging.WARNING, logger="fct.report"):
        build_report(SUITE, [folder], plots=False)
    msgs = [r.getMessage() for r in caplog.records if "old/old mAP differs" in r.getMessage()]
    assert len(msgs) == 1 and "scenario a seed 0" in msgs[0]


def test_other_suites_records_are_ignored(results: Path) -> None:
    write_record(results, make_record("a", "fct", (90.0, 90.0), suite="cifar100"), name="x.json")
    build_report(SUITE, [results], plots=False)
    assert float(read_csv(results / "leaderboard.csv")["fct"]["a/cross_mAP"]) == 25.0
    with pytest.raises(FCTError, match="no run records for suite 'imagenet'"):
        build_report("imagenet", [results], plots=False)


# ---------------------------------------------------------------------------------------------
# Paper tables


def test_paper_table_rows_and_published_columns(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in paper_records():
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    md = (folder / "tables" / "cifar100-half.md").read_text().split("## Update cost")[0]
    assert "Published top-1" in md
    # Ours: top-1, top-5, mAP, mAP@R; then published top-1, top-5, mAP, source.
    side = table_row(md, "FCT + side-info")
    assert side[1:5] == ["50.3", "74.0", "33.3", "16.0"]
    # Two published FCT + side-info rows (2022: 50.6/74.2/34.2, 2023: 50.2/73.7/32.2):
    # the most recent is shown, the older one is listed in the notes.
    assert side[5:] == ["50.2", "73.7", "32.2", "ml-fct README (2023)"]
    assert "ml-fct README (2022): 50.6 / 74.2 / 34.2" in md
    assert table_row(md, "FCT")[5:] == ["47.2", "72.6", "25.8", "ml-fct README (2023)"]
    assert table_row(md, "old/old")[1] == "33.0" and table_row(md, "new/new")[3] == "36.0"
    assert table_row(md, "Independent")[5:] == ["", "", "", ""]  # nothing published
    bct_new = table_row(md, "BCT new/new")
    assert bct_new[1] == "52.0" and bct_new[3] == "31.0"
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "old/old",
        "new/new",
        "Independent",
        "BCT",
        "BCT new/new",
        "FCT",
        "FCT + side-info",
    ]
    tex = (folder / "tables" / "cifar100-half.tex").read_text()
    assert "50.2 & 73.7 & 32.2" in tex


def test_no_published_columns_unless_paper(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in paper_records():
        rec["scenario_config"]["paper"] = False
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    md = (folder / "tables" / "cifar100-half.md").read_text()
    assert "Published" not in md and "50.2" not in md
    assert "Published" not in (folder / "tables" / "cifar100-half.tex").read_text()


def test_plugin_rows_use_label_and_follow_builtins(results: Path) -> None:
    for scenario in ("a", "b"):
        rec = make_record(scenario, "aaa_plugin", (47.0, 26.0), new=(45.0, 28.0), label="My compat")
        write_record(results, rec)
    build_report(SUITE, [results], plots=False)
    md = (results / "tables" / "a.md").read_text().split("## Update cost")[0]
    names = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    assert names[names.index("FCT + side-info") + 1] == "My compat"
    assert "My compat new/new" in names  # its own new model differs from Independent's
    assert "FCT new/new" not in names
    assert (
        float(read_csv(results / "leaderboard.csv")["aaa_plugin"]["a/new_new_change_mAP"]) == -7.0
    )


# ---------------------------------------------------------------------------------------------
# LaTeX


@pytest.mark.parametrize("paper", [False, True])
def test_latex_tables(tmp_path: Path, paper: bool) -> None:
    folder = tmp_path / "r"
    records = paper_records() if paper else base_records()
    for rec in records:
        rec["scenario_config"]["description"] = "50% of classes_with_underscores & more"
        write_record(folder, rec)
    write_record(
        folder, make_record(records[0]["scenario"], "my_plugin", (1.0, 1.0), label="a_b 100%")
    )
    build_report(SUITE, [folder], plots=False)
    for tex_path in sorted((folder / "tables").glob("*.tex")):
        tex = tex_path.read_text()
        check_latex_structure(tex)
        if tex_path.stem == records[0]["scenario"]:
            assert "a\\_b 100\\%" in tex
        if shutil.which("pdflatex"):
            doc = tmp_path / f"{tex_path.stem}-doc.tex"
            doc.write_text(
                "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
                + tex
                + "\\end{document}\n"
            )
            proc = subprocess.run(
                ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stdout[-2000:]


def test_tex_escape() -> None:
    assert tex_escape("fct_side 50% a&b #1 $x {y} ~ ^") == (
        r"fct\_side 50\% a\&b \#1 \$x \{y\} \textasciitilde{} \textasciicircum{}"
    )
    assert tex_escape("1.0 ± 0.2") == r"1.0 $\pm$ 0.2"
    assert tex_escape("a\\b") == r"a\textbackslash{}b"


# ---------------------------------------------------------------------------------------------
# Plots and HTML


def test_every_plot_written_nonempty_and_deterministic(
    built: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    results, paths = built
    plots = sorted(p for p in paths if p.parent.name == "plots")
    names = {p.name for p in plots}
    assert names == {
        "bars_a.png", "bars_a.pdf", "bars_b.png", "bars_b.pdf", "update_cost.png", "update_cost.pdf",
    }  # fmt: skip
    first = {}
    for p in plots:
        data = p.read_bytes()
        assert len(data) > 1000
        assert data.startswith(b"\x89PNG") if p.suffix == ".png" else data.startswith(b"%PDF")
        # No dates or software versions in the metadata: rebuilt plots stay byte-identical.
        assert b"CreationDate" not in data and b"matplotlib" not in data.lower()
        first[p] = data
    again = tmp_path / "again"  # the same records built a second time
    build_report(SUITE, [results], out=again)
    assert all((again / p.relative_to(results)).read_bytes() == first[p] for p in plots), (
        "plots differ between two builds"
    )
    assert not [*results.rglob("*.tmp"), *again.rglob("*.tmp")], "a temporary file was left"


def test_scatter_by_backfill_fraction_when_no_throughput(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    for rec in scenario_a():
        rec["costs"] = {"train_seconds": None, "backfill_fraction": 0.0}
        if rec["method"] == "fct":
            rec["costs"]["backfill_fraction"] = 0.25
        write_record(folder, rec)
    paths = build_report(SUITE, [folder])
    scatter = folder / "plots" / "update_cost.png"
    assert scatter in paths and scatter.stat().st_size > 1000


def test_curves_and_auc_when_present(results: Path) -> None:
    for scenario in ("a", "b"):
        rec = make_record(
            scenario,
            "fastfill",
            (46.0, 27.0),
            costs={"backfill_fraction": 0.2},
            curves={
                "random": [27.0 + i for i in range(22)],
                "uncertainty": [27.0 + 1.5 * i for i in range(22)],
            },
            auc={"random": 37.5, "uncertainty": 42.0},
        )
        write_record(results, rec)
    paths = build_report(SUITE, [results])
    assert results / "plots" / "curves_a.png" in paths
    assert (results / "plots" / "curves_b.pdf").stat().st_size > 1000
    rows = read_csv(results / "leaderboard.csv")
    assert float(rows["fastfill"]["a/auc_random"]) == 37.5
    assert float(rows["fastfill"]["b/auc_uncertainty"]) == 42.0
    assert rows["fct"]["a/auc_random"] == ""
    assert "AUC random" in (results / "leaderboard.md").read_text()


def test_no_auc_columns_or_curves_without_them(built: tuple[Path, list[Path]]) -> None:
    results, paths = built
    header = (results / "leaderboard.csv").read_text().splitlines()[0]
    assert "auc" not in header
    assert not any(p.name.startswith("curves_") for p in paths)


def test_index_html_is_self_contained(built: tuple[Path, list[Path]]) -> None:
    results, paths = built
    page = (results / "index.html").read_text()
    assert results / "index.html" in paths
    assert re.search(r"https?:", page) is None, "index.html must not reference the network"
    srcs = re.findall(r'src="([^"]*)"', page)
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "<script" not in page
    assert "FCT + side-info" in page and "compatible" in page


def test_build_report_writes_listed_files(built: tuple[Path, list[Path]]) -> None:
    folder, paths = built
    expected = {"leaderboard.csv", "leaderboard.md", "index.html"}
    expected |= {f"tables/{s}.{e}" for s in ("a", "b") for e in ("md", "tex")}
    expected |= {f"plots/bars_{s}.{e}" for s in ("a", "b") for e in ("png", "pdf")}
    expected |= {"plots/update_cost.png", "plots/update_cost.pdf"}
    assert {p.relative_to(folder).as_posix() for p in paths} == expected
    assert all(p.stat().st_size > 0 for p in paths)


def test_report_imports_neither_torch_nor_matplotlib_eagerly() -> None:
    code = (
        "import sys, fct.report; "
        "bad = [m for m in ('torch', 'matplotlib', 'pandas') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Errors


def test_no_records_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(FCTError) as e:
        build_report(SUITE, [tmp_path / "empty"], plots=False)
    assert (
        str(e.value)
        == f"no run records under {tmp_path / 'empty'}/runs; run `fct run quickstart` first"
    )


def test_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(FCTError, match="does not exist"):
        load_records([tmp_path / "nowhere"])


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda r: r["cases"]["cross"].pop("mAP"), "cases.cross.mAP"),
        (lambda r: r["cases"].pop("new/new"), "cases.new/new"),
        (lambda r: r.pop("scenario"), "scenario"),
        (lambda r: r["provenance"].pop("date"), "provenance.date"),
        (lambda r: r["costs"].pop("backfill_fraction"), "costs.backfill_fraction"),
    ],
)
def test_missing_key_error_names_file_and_key(tmp_path: Path, mutate, key: str) -> None:
    folder = tmp_path / "r"
    rec = make_record("a", "fct", (45.0, 25.0))
    mutate(rec)
    path = write_json(folder / "runs" / "a" / "fct.json", rec)
    with pytest.raises(FCTError) as e:
        build_report(SUITE, [folder], plots=False)
    msg = str(e.value)
    assert str(path) in msg and f"missing key '{key}'" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.update(schema=2), "key 'schema' is 2"),
        (
            lambda r: r["cases"]["cross"].update(top1="high"),
            "key 'cases.cross.top1' must be a finite number",
        ),
        (lambda r: r.update(seed=True), "key 'seed' must be an integer"),
        (
            lambda r: r["provenance"].update(date="yesterday"),
            "'provenance.date' is not an ISO-8601",
        ),
        (lambda r: r.update(curves={"random": []}), "curves.random"),
        (lambda r: r["costs"].update(backfill_fraction=1.5), "between 0 and 1"),
    ],
)
def test_bad_record_error(tmp_path: Path, mutate, needle: str) -> None:
    folder = tmp_path / "r"
    rec = make_record("a", "fct", (45.0, 25.0))
    mutate(rec)
    path = write_json(folder / "runs" / "a" / "fct.json", rec)
    with pytest.raises(FCTError) as e:
        load_records([folder])
    assert str(path) in str(e.value) and needle in str(e.value)


def test_corrupt_json_error(tmp_path: Path) -> None:
    bad = tmp_path / "r" / "runs" / "a" / "fct.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(FCTError, match="fct.json is not valid JSON"):
        load_records([tmp_path / "r"])


# ---------------------------------------------------------------------------------------------
# Metric table


def test_metric_table_is_complete() -> None:
    for key in ("cross_top1", "cross_top5", "cross_mAP", "cross_mAP@R", "gain_mAP", "new_new_change_mAP",
                "backfill_fraction", "update_cost_s", "transform_embeddings_per_s"):  # fmt: skip
        m = METRICS[key]
        assert m.key == key and m.description and m.label
        lo, hi = m.lim
        assert lo is None or hi is None or lo < hi
    assert METRICS["cross_mAP"].format(30.04, 1.234) == "30.0 ± 1.2"
    assert METRICS["gain_mAP"].format(2.0) == "+2.0"
    assert METRICS["gain_mAP"].format(-0.04) == "0.0"
    assert METRICS["cross_mAP"].format(None) == "–"
    assert METRICS["transform_embeddings_per_s"].format(1.2e6) == "1.20e+06"
    assert "higher is better" in METRICS["cross_mAP"].axis_label
    assert "lower is better" in METRICS["update_cost_s"].axis_label


def test_no_plots_writes_the_rest_and_removes_stale_plots(tmp_path: Path) -> None:
    """build_report(plots=False): the same tables and leaderboard as with plots, no plots/,
    no image on the page; a previous report's plots go with it."""
    folder = tmp_path / SUITE
    for rec in scenario_a():
        write_record(folder, rec)
    with_plots = build_report(SUITE, [folder])
    tables = {p: p.read_bytes() for p in with_plots if p.suffix in (".md", ".tex", ".csv")}
    assert (folder / "plots").is_dir() and "<img" in (folder / "index.html").read_text()
    shutil.copytree(folder / "plots", tmp_path / "saved-plots")
    paths = build_report(SUITE, [folder], plots=False)
    assert not (folder / "plots").exists()
    assert not any("plots" in p.parts for p in paths)
    assert "<img" not in (folder / "index.html").read_text()
    assert {p: p.read_bytes() for p in paths if p.suffix in (".md", ".tex", ".csv")} == tables
    # A report's plots back (copied, not drawn again), then off again through the CLI flag.
    shutil.copytree(tmp_path / "saved-plots", folder / "plots")
    argv = ["report", SUITE, "--results", str(folder), "--no-reference", "--no-plots"]
    assert main(argv) == 0
    assert not (folder / "plots").exists()


def test_recovery_note_only_beside_recovery_columns(tmp_path: Path) -> None:
    folder = tmp_path / SUITE
    records = base_records()
    for rec in records:
        write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    board = (folder / "leaderboard.md").read_text()
    assert "recovery mAP" not in board and "recall recovery" not in board
    rec = records[0]
    rec["recovery"] = {"top1": 0.9, "mAP": 0.95, "direction": "gallery", "fit_seconds": 1.0}
    write_record(folder, rec)
    build_report(SUITE, [folder], plots=False)
    board = (folder / "leaderboard.md").read_text()
    assert "recovery mAP" in board and "recall recovery" in board
