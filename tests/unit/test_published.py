"""Published numbers beside our own: the setup-matching rule, footnotes for named differences,
backfilling-AUC rows, and the package copy of the shared reference table."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from report_records import (
    SUITE,
    make_record,
    ml_fct_setup,
    paper_records,
    table_row,
    write_record,
)

from fct.report import build_report
from fct.report import published as pub

ROOT = Path(__file__).resolve().parents[2]
SHARED_CSV = ROOT.parent / "shared" / "reference" / "published_results.csv"


def paper_md(folder: Path, scenario: str = "cifar100-half") -> str:
    """The paper table of ``scenario`` (the part of its page before the other sections)."""
    return (folder / "tables" / f"{scenario}.md").read_text().split("## ")[0]


def section(folder: Path, title: str, scenario: str = "cifar100-half") -> str:
    page = (folder / "tables" / f"{scenario}.md").read_text()
    return page.split(f"## {title}")[1].split("## ")[0]


def build(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    folder = tmp_path / "r"
    for rec in records:
        write_record(folder, rec)
    build_report(
        SUITE, [folder], plots=False
    )  # tables and page only: plots are tested in test_report
    return folder


# ---------------------------------------------------------------------------------------------
# The reference table


def test_package_csv_is_identical_to_the_shared_csv() -> None:
    if not SHARED_CSV.exists():
        pytest.skip(f"no shared reference table at {SHARED_CSV}")
    package = resources.files("fct").joinpath("reference/published_results.csv").read_bytes()
    assert package == SHARED_CSV.read_bytes()


def test_every_source_with_absolute_numbers_declares_its_setup() -> None:
    rows = pub.load_published()
    assert {p.family for p in rows} >= {"ml-fct README", "BT-2 README"}
    for p in rows:
        assert p.setup is not None, f"{p.source} / {p.dataset}: no declared setup"
    # BT-2 trains and evaluates its own way: never the ml-fct protocol.
    assert pub.SETUPS[("BT-2 README", "cifar100")].protocol != pub.DEFAULT_PROTOCOL


# ---------------------------------------------------------------------------------------------
# The matching rule


def test_published_row_shows_for_a_matching_scenario(tmp_path: Path) -> None:
    folder = build(tmp_path, paper_records())
    md = paper_md(folder)
    assert table_row(md, "old/old")[5:] == ["34.2", "60.6", "16.5", "ml-fct README (2023)"]
    assert table_row(md, "FCT")[5:] == ["47.2", "72.6", "25.8", "ml-fct README (2023)"]
    assert "Setups: ml-fct README: ResNet50-128" in md
    # BT-2's rows are about CIFAR-100 too, but were trained and evaluated otherwise.
    assert "BT-2" not in md and "33.6" not in md


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c["old"].update(arch="resnet18"), "old arch resnet18 (published resnet50)"),
        (lambda c: c["old"].update(classes=[0, 20]), "old on classes 0-19"),
        (lambda c: c["new"].update(embedding_dim=256), "new embedding 256-d"),
        (lambda c: c["new"].update(loss="cosface"), "new loss cosface (published ce)"),
        (lambda c: c["eval"].update(distance="cosine"), "cosine distance (published l2)"),
        # Declaring BT-2's protocol hides ml-fct's rows; BT-2's need its cosine evaluation.
        (lambda c: c.update(protocol="bt2"), "BT-2 README: l2 distance (published cosine)"),
    ],
)
def test_published_row_hidden_for_a_mismatching_scenario(tmp_path: Path, change, reason) -> None:
    records = paper_records()
    for rec in records:
        change(rec["scenario_config"])
    folder = build(tmp_path, records)
    md = paper_md(folder)
    assert "Published" not in md and "ml-fct README (2023)" not in md
    assert "No published numbers shown" in md and reason in md
    assert "Published" not in (folder / "tables" / "cifar100-half.tex").read_text()


def test_bt2_rows_only_beside_a_scenario_declaring_bt2(tmp_path: Path) -> None:
    records = paper_records()
    bt2_form = {"rows": "means", "normalize": True, "weight": 10.0}
    for rec in records:
        rec["scenario_config"].update(protocol="bt2")
        rec["scenario_config"]["eval"]["distance"] = "cosine"
        if rec["method"] == "bct":
            rec["method_config"].update(base="bct", settings=bt2_form)
    paper_bct = make_record("cifar100-half", "bct_paper", (41.0, 21.0), dataset="cifar100")
    paper_bct["scenario_config"] = records[0]["scenario_config"]
    paper_bct["method_config"] = {"name": "bct_paper", "base": "bct", "settings": {}}
    folder = build(tmp_path, [*records, paper_bct])
    md = paper_md(folder)
    assert table_row(md, "old/old")[5:] == ["33.6", "55.4", "24.4", "BT-2 README"]
    assert table_row(md, "BCT")[5:] == ["25.0", "62.1", "24.7", "BT-2 README"]
    assert table_row(md, "BCT new/new")[5:] == ["60.0", "71.9", "47.3", "BT-2 README"]
    # BCT in the paper's form is not BT-2's BCT; FCT was not published by BT-2.
    assert table_row(md, "bct_paper")[5:] == ["", "", "", ""]
    assert table_row(md, "FCT")[5:] == ["", "", "", ""]
    assert "ml-fct" not in md


def test_method_identity_by_base_and_settings() -> None:
    config = paper_records()[0]["scenario_config"]
    assert pub.identity("fct", "fct", {}, config) == ("fct", False)
    assert pub.identity("fct_side", "fct_side", {}, config) == ("fct", True)
    # A BCT variant in the paper's form is the paper's BCT; another form is not.
    assert pub.identity("bct", "bct_v", {"rows": "old+means"}, config) == ("bct", False)
    assert pub.identity("bct", "bct_sm0", {"smoothing": 0.0}, config) is None
    # Other variants are other methods; BT-2's method is nothing of ours.
    assert pub.identity("fct", "fct_wide", {}, config) is None
    assert pub.identity("ract", "ract", {}, config) is None
    builtins = ("independent", "bct", "fct", "fct_side", "fastfill", "fastfill_side", "ract")
    assert all(pub.identity(b, b, {}, config) != ("bt2", False) for b in builtins)
    assert pub.identity("bt2", "bt2", {}, config) == ("bt2", False)  # only a plugin of that base


# ---------------------------------------------------------------------------------------------
# Named differences: footnote marks


def test_side_info_footnote_for_a_side_model_trained_on_cifar100(tmp_path: Path) -> None:
    records = [ml_fct_setup(rec, side_dataset="cifar100") for rec in paper_records()]
    folder = build(tmp_path, records)
    md = paper_md(folder)
    side = table_row(md, "FCT + side-info")
    assert side[5:8] == ["50.2", "73.7", "32.2"]
    assert side[8] == "ml-fct README (2023) \\[a\\]"
    assert "\\[a\\] published: side-info from ImageNet-1k; ours: from cifar100 classes 0-49." in md
    # Rows without side-information carry no mark.
    assert table_row(md, "FCT")[8] == "ml-fct README (2023)"
    tex = (folder / "tables" / "cifar100-half.tex").read_text()
    assert "ml-fct README (2023) [a]" in tex and "ours: from cifar100 classes 0-49" in tex


def test_no_footnote_when_side_model_is_trained_on_imagenet(tmp_path: Path) -> None:
    folder = build(tmp_path, paper_records())  # side.dataset = "imagenet", all classes
    md = paper_md(folder)
    assert table_row(md, "FCT + side-info")[8] == "ml-fct README (2023)"
    assert "published: side-info" not in md


def test_cached_h_features_are_noted(tmp_path: Path) -> None:
    records = paper_records()
    for rec in records:
        rec["scenario_config"]["transformation"] = {"features": "cached", "views": 4}
    folder = build(tmp_path, records)
    md = paper_md(folder)
    assert table_row(md, "FCT")[8] == "ml-fct README (2023) \\[a\\]"
    assert table_row(md, "old/old")[8] == "ml-fct README (2023)"  # no h in old/old
    assert "ours: on cached embeddings of 4 views per training image" in md


# ---------------------------------------------------------------------------------------------
# Backfilling AUCs


def with_auc(rec: dict[str, Any], auc: dict[str, float]) -> dict[str, Any]:
    rec["curves"] = {order: [value] * 22 for order, value in auc.items()}
    rec["auc"] = auc
    rec["backfill_curves"] = {"auc_top1": {order: value + 20 for order, value in auc.items()}}
    return rec


def test_auc_rows_sit_beside_our_auc_columns(tmp_path: Path) -> None:
    kw = {"dataset": "cifar100", "paper": True, "old": (33.0, 16.0), "new": (56.0, 36.0)}
    records = paper_records()
    for rec in records:
        if rec["method"] == "fct":
            with_auc(rec, {"random": 30.0})
    fastfill = make_record("cifar100-half", "fastfill", (46.0, 30.0), **kw)
    records.append(ml_fct_setup(with_auc(fastfill, {"random": 31.0, "uncertainty": 33.0})))
    folder = build(tmp_path, records)
    auc = section(folder, "Backfilling (area under the curve)")
    row = table_row(auc, "FCT")
    assert row[1:4] == ["random", "50.0", "30.0"]  # ours: AUC top-1, AUC mAP
    assert row[4:] == ["49.1", "73.6", "29.1", "ml-fct README (2023)"]
    uncertainty = next(line for line in auc.splitlines() if "| FastFill | uncertainty |" in line)
    assert "53.6 | 75.3 | 32.5 | ml-fct README (2023)" in uncertainty
    random = next(line for line in auc.splitlines() if "| FastFill | random |" in line)
    assert "ml-fct" not in random  # FastFill's published AUC is its uncertainty order
    # AUC rows never land in the paper table's cross rows.
    assert "49.1" not in paper_md(folder) and "53.6" not in paper_md(folder)
    assert "Backfilling (area under the curve)" in (folder / "index.html").read_text()


def test_auc_rows_without_an_order_use_the_methods_own_order(tmp_path: Path) -> None:
    # The lambda-orthogonality paper's setup: ResNet-34 128-d on ImageNet, old on 500 classes.
    def lam(method: str, cross: tuple[float, float]) -> dict[str, Any]:
        rec = make_record("imagenet-r34", method, cross, dataset="imagenet", paper=True)
        config = rec["scenario_config"]
        config["protocol"] = "lambda-orthogonality"
        for role, classes in (("old", [0, 500]), ("new", None)):
            config[role].update(arch="resnet34", embedding_dim=128, classes=classes)
        return rec

    records = [
        lam("independent", (1.0, 1.0)),
        with_auc(lam("fct", (50.0, 30.0)), {"random": 31.0}),
        with_auc(lam("fastfill", (50.0, 30.0)), {"random": 31.0, "uncertainty": 32.0}),
    ]
    folder = build(tmp_path, records)
    auc = section(folder, "Backfilling (area under the curve)", "imagenet-r34")
    fct = next(line for line in auc.splitlines() if "| FCT | random |" in line)
    assert "58.7 | – | 33.6 | lambda-orthogonality paper" in fct
    ff = next(line for line in auc.splitlines() if "| FastFill | uncertainty |" in line)
    assert "60.5 | – | 35.6 | lambda-orthogonality paper" in ff
    ff_random = next(line for line in auc.splitlines() if "| FastFill | random |" in line)
    assert "lambda" not in ff_random
    md = paper_md(folder, "imagenet-r34")
    assert table_row(md, "old/old")[5:8] == ["43.6", "–", "25.2"]
    assert "ml-fct" not in md and "BT-2" not in md
