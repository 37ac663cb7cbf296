"""Model specs with given weights (``weights = "PATH.safetensors"``): tiny's old model, trained
and saved by the clean run of tiny (conftest.clean_tiny), given as weights trains nothing and
gives the records of the run that trained it; weights that do not fit the spec, and methods
that would retrain given new weights, are refused before anything trains."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import records, run_fct

from fct.errors import FCTError
from fct.scenarios import load_suite

TINY = Path(__file__).resolve().parents[2] / "fct" / "suites" / "tiny.toml"
OLD = "test_resnet-synthetic-0-9-ce-32"  # tiny's old model's cache entry name
METHODS = ("--methods", "independent,fct", "--scenarios", "half-classes")


def suite_with(tmp_path: Path, table: str, line: str) -> Path:
    """tiny.toml with ``line`` added to its ``[table]``, written beside the weights."""
    text = TINY.read_text()
    if f"[{table}]\n" in text:
        text = text.replace(f"[{table}]\n", f"[{table}]\n{line}\n", 1)
    else:
        text += f"\n[{table}]\n{line}\n"
    path = tmp_path / "suite" / "tiny.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained_old(clean_tiny) -> tuple[dict[str, dict], Path]:
    """The clean run of tiny that trained the old model (conftest.clean_tiny): (its normalised
    records of the methods run here, the old model's weights)."""
    _, cache, recs = clean_tiny
    (entry,) = (cache / "models").glob(f"{OLD}-*")
    mine = {k: v for k, v in recs.items() if Path(k).stem in ("independent", "fct")}
    assert len(mine) == 2
    return mine, entry / "tensors.safetensors"


def give(tmp_path: Path, weights: Path) -> None:
    """Copy the saved weights to where the test suites name them (suite/weights/old...)."""
    target = tmp_path / "suite" / "weights" / "old.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, target)


def comparable(recs: dict[str, dict]) -> dict[str, dict]:
    """Records without what names the models and the config (the weights key changes those)."""
    drop = {"config_hash", "scenario_config", "artifacts", "artifact_weights", "models"}
    return {k: {f: v for f, v in r.items() if f not in drop} for k, r in recs.items()}


def test_given_old_weights_train_nothing_and_give_the_same_records(tmp_path, trained_old):
    trained, weights = trained_old
    give(tmp_path, weights)
    suite = suite_with(tmp_path, "defaults.old", 'weights = "weights/old.safetensors"')
    out, cache = tmp_path / "given", tmp_path / "cache-given"
    args = ["run", str(suite), "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    args.append("--no-plots")
    proc = run_fct(*args, *METHODS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"training models/{OLD} " not in proc.stderr
    assert f"for models/{OLD}-pretrained (nothing trained" in proc.stderr
    assert "training models/test_resnet-synthetic-all-ce-32 " in proc.stderr  # new still trains
    assert comparable(records(out)) == comparable(trained)
    # The weights' sha256 is in the scenario's config (and hash), not their path.
    rec = next(iter(records(out).values()))
    assert rec["scenario_config"]["old"]["weights"].startswith("sha256:")
    assert "weights" not in next(iter(trained.values()))["scenario_config"]["old"]


def test_weights_that_do_not_fit_are_one_line_before_training(tmp_path, trained_old):
    give(tmp_path, trained_old[1])
    for line, match in (
        ("embedding_dim = 16", r"classifier.weight is \[10, 32\], the spec's model has \[10, 16\]"),
        ('weights = "weights/nope.safetensors"', "does not exist"),
    ):
        suite = suite_with(tmp_path, "defaults.old", f'weights = "weights/old.safetensors"\n{line}')
        if "nope" in line:
            suite = suite_with(tmp_path, "defaults.old", line)
        out = tmp_path / "bad"
        proc = run_fct(
            "run",
            str(suite),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "c2"),
            "--device",
            "cpu",
            *METHODS,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(error) == 1 and "half-classes' [old]" in error[0], proc.stderr[-2000:]
        assert re.search(match, error[0]), error[0]
        assert "training " not in proc.stderr


def test_weights_key_is_checked_on_load_and_resolved_against_the_suite(tmp_path):
    suite = suite_with(tmp_path, "defaults.new", 'weights = "w/new.safetensors"')
    sc = load_suite(str(suite)).scenarios[0]
    assert sc.new.weights == str((tmp_path / "suite" / "w" / "new.safetensors").resolve())
    assert sc.old.weights is None
    assert sc.as_dict()["new"]["weights"] == "missing:new.safetensors"
    assert "weights" not in sc.as_dict()["old"]
    for bad, match in (('"w/new.pt"', "must be a .safetensors file"), ("3", "must be")):
        suite = suite_with(tmp_path, "defaults.new", f"weights = {bad}")
        with pytest.raises(FCTError, match=match):
            load_suite(str(suite))


def test_methods_that_train_given_new_weights_are_refused(tmp_path):
    from fct.pretrained import refuse_trainers

    suite = suite_with(tmp_path, "defaults.new", 'weights = "w/new.safetensors"')
    sc = load_suite(str(suite)).scenarios[0]
    refused = refuse_trainers(sc, ["independent", "bct", "fct", "fct_side"])
    assert list(refused) == ["bct"] and "new.weights" in refused["bct"]
    plain = load_suite(str(TINY)).scenarios[0]
    assert refuse_trainers(plain, ["bct"]) == {}


def test_timm_weights_without_downloads_are_one_line(tmp_path, monkeypatch):
    from fct.builders import check_weights

    monkeypatch.setenv("FCT_NO_DOWNLOAD", "1")
    suite = suite_with(tmp_path, "defaults.old", 'weights = "timm:a1_in1k"')
    sc = load_suite(str(suite)).scenarios[0]
    assert sc.old.weights == "timm:a1_in1k" and sc.as_dict()["old"]["weights"] == "timm:a1_in1k"
    with pytest.raises(FCTError, match="FCT_NO_DOWNLOAD is set") as err:
        check_weights(None, sc.old, side=False)
    assert "\n" not in str(err.value)
    for bad in ('"timm:"', '"timm:a/b"'):
        with pytest.raises(FCTError, match="timm pretrained tag"):
            load_suite(str(suite_with(tmp_path, "defaults.old", f"weights = {bad}")))
