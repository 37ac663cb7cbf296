"""The `tiny` suite end to end through `fct run`: records, skipping, plugins, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from fct.cli import main
from fct.record import RunRecord

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(clean_tiny, tmp_path_factory):
    """A copy of the clean run of tiny (conftest.clean_tiny), results and cache, that the tests
    here rerun and change."""
    base = tmp_path_factory.mktemp("tiny")
    out, cache = base / "results", base / "cache"
    shutil.copytree(clean_tiny[0], out)
    shutil.copytree(clean_tiny[1], cache)
    return out, cache


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))}


def test_every_method_writes_a_complete_record(tiny_run):
    out, _ = tiny_run
    recs = records(out)
    assert set(recs) == {"independent", "bct", "fct", "fct_side"}
    for name, r in recs.items():
        assert r["suite"] == "tiny" and r["scenario"] == "half-classes" and r["method"] == name
        for case in ("old/old", "new/new", "cross"):
            for key in ("top1", "top5", "mAP", "mAP@R"):
                assert 0.0 <= r["cases"][case][key] <= 100.0
            assert r["cases"][case]["top1"] <= r["cases"][case]["top5"]
            assert r["cases"][case]["n_query"] == 320
        prov = r["provenance"]
        for key in (
            "fct_version",
            "git_sha",
            "torch",
            "timm",
            "faiss",
            "device",
            "seed",
            "date",
            "wall_seconds",
        ):
            assert key in prov
        assert r["costs"]["train_seconds"] > 0
    # One old model for all methods: old/old is identical everywhere.
    assert len({json.dumps(r["cases"]["old/old"], sort_keys=True) for r in recs.values()}) == 1
    # Methods that keep the old gallery have no transformation cost; FCT's is measured.
    assert recs["independent"]["costs"]["transform_embeddings_per_s"] is None
    assert recs["fct"]["costs"]["transform_embeddings_per_s"] > 0
    # BCT's new model is its own; FCT's new model is the independent one.
    assert recs["fct"]["cases"]["new/new"] == recs["independent"]["cases"]["new/new"]
    assert recs["bct"]["cases"]["new/new"] != recs["independent"]["cases"]["new/new"]


def test_records_are_run_records_with_the_method_traits(tiny_run):
    """Every key the runner writes, read back by the typed record as it is on disk, with what
    each method declares about itself."""
    out, _ = tiny_run
    for path in sorted((out / "runs").glob("*/*.json")):
        rec = RunRecord.read(path)
        on_disk = json.loads(path.read_text())
        assert rec.to_json() == on_disk and not rec.extra
        assert set(on_disk) == {
            *("schema", "suite", "scenario", "method", "label", "seed", "smoke"),
            *("config_hash", "method_source", "scenario_config", "method_config", "cases"),
            *("costs", "curves", "auc", "backfill_curves", "cases_cosine", "diagnostics"),
            *("artifacts", "artifact_weights"),
            *("models", "notes", "recovery", "provenance"),
        }
    traits = {name: RunRecord.read(p).traits for name, p in _paths(out).items()}
    assert traits["independent"].role == "baseline" and traits["fct"].role == "method"
    assert [traits[m].keeps_new_model for m in ("independent", "bct", "fct", "fct_side")] == [
        True,
        False,
        True,
        True,
    ]
    assert sorted(traits, key=lambda m: traits[m].report_order) == [
        "independent",
        "bct",
        "fct",
        "fct_side",
    ]


def _paths(out: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((out / "runs").glob("*/*.json"))}


def test_compatibility_findings_on_tiny(tiny_run):
    recs = records(tiny_run[0])
    old = recs["fct"]["cases"]["old/old"]["mAP"]
    # Independent models are incompatible; FCT's transformed gallery beats old/old.
    assert recs["independent"]["cases"]["cross"]["mAP"] < old
    assert recs["fct"]["cases"]["cross"]["mAP"] > old
    assert recs["fct_side"]["cases"]["cross"]["mAP"] > old


def test_report_files_are_written(tiny_run):
    out, _ = tiny_run
    for name in ("leaderboard.md", "leaderboard.csv", "index.html", "tables/half-classes.md"):
        assert (out / name).stat().st_size > 0
    assert "FCT" in (out / "leaderboard.md").read_text()
    # The leaderboard holds the records' numbers, best cross mAP first.
    recs = records(out)
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["method"] for r in rows] == sorted(
        recs, key=lambda m: -recs[m]["cases"]["cross"]["mAP"]
    )
    for row in rows:
        cross = recs[row["method"]]["cases"]["cross"]
        assert float(row["half-classes/cross_mAP"]) == pytest.approx(cross["mAP"], abs=1e-3)
        assert float(row["half-classes/cross_top1"]) == pytest.approx(cross["top1"], abs=1e-3)
        assert int(row["rank"]) == rows.index(row) + 1


def test_rerun_trains_nothing_and_keeps_records(tiny_run, caplog):
    out, cache = tiny_run
    before = {k: v["provenance"]["date"] for k, v in records(out).items()}
    caplog.set_level("INFO")
    argv = ["run", "tiny", "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    assert main([*argv, "--no-plots"]) == 0
    assert "training" not in caplog.text
    assert caplog.text.count("up to date") == 4
    assert {k: v["provenance"]["date"] for k, v in records(out).items()} == before


def test_method_subset_and_force_rerun(tiny_run, caplog):
    out, cache = tiny_run
    caplog.set_level("INFO")
    assert (
        main(
            [
                "run",
                "tiny",
                "--out",
                str(out),
                "--cache",
                str(cache),
                "--methods",
                "fct",
                "--force",
                "--device",
                "cpu",
                "--no-plots",
            ]
        )
        == 0
    )
    assert "fct: fitting" in caplog.text and "independent: fitting" not in caplog.text
    assert "training models/" in caplog.text  # --force retrains what the method uses


def test_example_plugin_runs(tiny_run, capsys):
    out, cache = tiny_run
    plugin = str(ROOT / "examples" / "linear_map.py")
    assert (
        main(
            [
                "run",
                "tiny",
                "--out",
                str(out),
                "--cache",
                str(cache),
                "--plugin",
                plugin,
                "--methods",
                "linear_map",
                "--device",
                "cpu",
                "--no-plots",
            ]
        )
        == 0
    )
    rec = records(out)["linear_map"]
    assert rec["method_config"] == {
        "name": "linear_map",
        "base": "linear_map",
        "label": "Linear map",
        "settings": {"ridge": 1e-3},
        # a plugin's traits: after the built-ins, not the baseline; it declares keeps_new_model
        "report_order": None,
        "role": "method",
        "keeps_new_model": True,
    }
    assert rec["cases"]["cross"]["mAP"] > records(out)["independent"]["cases"]["cross"]["mAP"]
    assert rec["costs"]["transform_embeddings_per_s"] > 0
    capsys.readouterr()
    assert main(["list", "methods", "--plugin", plugin]) == 0
    assert "linear_map" in capsys.readouterr().out


def test_unknown_method_and_plugin_errors(tmp_path, capsys):
    assert main(["run", "tiny", "--methods", "fct_sid", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'fct_sid'" in err and "did you mean 'fct_side'" in err
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    assert main(["run", "tiny", "--plugin", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        "failed to import" in err
        and "ModuleNotFoundError" in err
        and len(err.strip().splitlines()) == 1
    )


def test_unknown_suite(capsys):
    assert main(["run", "quickstar"]) == 2
    assert "did you mean 'quickstart'" in capsys.readouterr().err
