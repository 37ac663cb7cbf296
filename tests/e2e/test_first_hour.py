"""A new user's first hour (issue 14): records that go stale with their method's source,
`--rerun`, smoke records kept apart, refused and failing (scenario, method) pairs that do not
stop a suite, the reference results never written, records naming every model they used, and
`--set` on any key of a suite file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import entries, tiny_args

from fct.cli import main
from fct.errors import FCTError
from fct.scenarios import load_suite, parse_set

PLUGIN = '''
from dataclasses import dataclass

import torch

from fct.errors import FCTError
from fct.methods import Deployment, Method, register_method


@register_method("{name}")
class Probe(Method):
    """Least squares old -> new, fitted on the training embeddings."""

    def fit(self, ctx):
        old, new = ctx.old_model(), ctx.new_model()
        x, _ = ctx.embed(old, "new-train")
        y, _ = ctx.embed(new, "new-train")
        w = torch.linalg.lstsq(x.double(), y.double()).solution.float()
        return Deployment(
            query_model=new,
            gallery_update=lambda g, side: g @ w,
            artifacts=(old, new),
            notes={{"rows": len(x)}},
        )


@register_method("{name}_boom")
class Boom(Method):
    """Fails while fitting, as a plugin's bug would."""

    def fit(self, ctx):
        ctx.old_model()
        raise FCTError("boom: the plugin's own error")
'''


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))}


def _plugin(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(PLUGIN.format(name=name))
    return path


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """`fct run tiny` with Independent and a plugin method: (base, out, cache, plugin)."""
    base = tmp_path_factory.mktemp("first-hour")
    plugin = _plugin(base, "hour_probe")
    out, cache = base / "out", base / "cache"
    args = tiny_args(out, cache, "--plugin", str(plugin), "--methods", "independent,hour_probe")
    args.append("--no-plots")
    assert main(args) == 0
    return base, out, cache, plugin, args


def test_records_name_every_model_and_its_weights(probe_run):
    _, out, _, _, _ = probe_run
    recs = _records(out)
    for rec in recs.values():
        roles = rec["models"]
        assert set(roles) == {"old", "query"}
        assert set(rec["artifacts"]) == set(rec["artifact_weights"]) == set(roles.values())
        assert all(len(d) == 20 for d in rec["artifact_weights"].values())
        assert rec["smoke"] is False and len(rec["method_source"]) == 20
        costs = rec["costs"]
        # Both methods use only the shared old and new models: nothing trained for themselves.
        assert costs["train_seconds_method"] == 0
        assert costs["train_seconds_shared"] == costs["train_seconds"] > 0
    # The weights digests are those of the cache files the records name.
    assert recs["independent"]["artifact_weights"] == recs["hour_probe"]["artifact_weights"]
    assert recs["hour_probe"]["notes"] == {"rows": 1280}
    assert recs["independent"]["notes"] == {}


def test_a_changed_method_source_reruns_only_its_record(probe_run, caplog):
    _, out, cache, plugin, args = probe_run
    before = _records(out)
    cached = {p: p.stat().st_mtime_ns for p in entries(cache)}
    plugin.write_text(plugin.read_text() + "\n# an edit\n")
    assert main(args) == 0
    after = _records(out)
    assert after["hour_probe"]["method_source"] != before["hour_probe"]["method_source"]
    assert after["hour_probe"]["provenance"]["date"] >= before["hour_probe"]["provenance"]["date"]
    assert after["hour_probe"]["provenance"] != before["hour_probe"]["provenance"]
    assert after["independent"] == before["independent"]  # its source did not change
    assert after["hour_probe"]["cases"] == before["hour_probe"]["cases"]
    # No model was retrained: every cache entry is the same folder, untouched.
    assert {p: p.stat().st_mtime_ns for p in entries(cache)} == cached


def test_rerun_reruns_methods_and_evaluation_but_no_cached_model(probe_run):
    _, out, cache, _, args = probe_run
    before = _records(out)
    cached = {p: p.stat().st_mtime_ns for p in entries(cache)}
    assert main([*args, "--rerun"]) == 0
    after = _records(out)
    for name in before:
        assert after[name]["provenance"] != before[name]["provenance"]  # rewritten
        assert after[name]["cases"] == before[name]["cases"]
    assert {p: p.stat().st_mtime_ns for p in entries(cache)} == cached


def test_smoke_records_are_marked_and_never_mixed(probe_run, capsys):
    base, out, cache, _, _ = probe_run
    capsys.readouterr()
    # A smoke run into a folder of full-run records is refused before anything trains.
    rc = main(tiny_args(out, cache, "--smoke", "--methods", "independent"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "full-run records" in err and "--out" in err
    smoke_out = base / "smoke"
    assert main(tiny_args(smoke_out, cache, "--smoke", "--methods", "independent")) == 0
    assert _records(smoke_out)["independent"]["smoke"] is True
    rc = main(tiny_args(smoke_out, cache, "--methods", "independent"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "smoke-run (--smoke) records" in err


def test_refused_and_failing_pairs_do_not_stop_the_suite(tmp_path, capsys):
    plugin = _plugin(tmp_path, "pair_probe")
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = main(
        tiny_args(
            out,
            cache,
            "--plugin",
            str(plugin),
            "--set",
            "scenario.half-classes.new.embedding_dim=16",
            "--methods",
            "independent,pair_probe_boom,fct",
            "--no-plots",
        )
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: 2 of 3 (scenario, method) pairs")
    assert "half-classes/independent (refused before training: Independent needs equal" in err[0]
    assert "half-classes/pair_probe_boom (boom" in err[0]
    assert set(_records(out)) == {"fct"}  # the pair that can run did, and its report exists
    assert (out / "leaderboard.md").is_file()


def test_the_reference_results_are_never_written(tmp_path, monkeypatch, capsys):
    ref = tmp_path / "results" / "reference" / "tiny"
    (ref / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "tiny", "--out", str(ref), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "reference results" in err and "results/tiny" in err
    assert os.listdir(ref / "runs") == []


def test_set_reaches_any_key_of_the_suite_file():
    suite = load_suite(
        "tiny",
        overrides=parse_set(
            ["defaults.model.epochs=2", "scenario.half-classes.new.lr=0.2", "bct.weight=0.5"]
        ),
    )
    (sc,) = suite.scenarios
    assert (sc.old.epochs, sc.new.epochs, sc.new.lr) == (2, 2, 0.2)
    assert sc.method("bct").settings.weight == 0.5
    assert (
        load_suite("tiny", overrides=parse_set(["methods.bct.weight=3"]))
        .scenarios[0]
        .method("bct")
        .settings.weight
        == 3
    )


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("defaults.model.epoch=2", "unknown key 'epoch' (did you mean 'epochs'?)"),
        ("defaults.model.epochs=-1", "epochs"),
        ("defaults.model.epochs=x", "'epochs' must be an integer"),
        ("scenario.nope.new.lr=1", "no scenario 'nope'"),
        ("a.b.c=1", "a method setting is METHOD.SETTING"),
        ("defaults.model", "--set takes"),
        ("scenario.x=1", "scenario.NAME.KEY=VALUE"),
    ],
)
def test_bad_set_paths_are_one_line(item, message):
    with pytest.raises(FCTError, match=None) as info:
        load_suite("tiny", overrides=parse_set([item]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_shipped_suite_lists_a_method_its_scenario_refuses():
    from fct.scenarios import list_suites

    for name in list_suites():
        for sc in load_suite(name).scenarios:
            for m in sc.methods:
                sc.method(m).check(sc)  # raises FCTError naming the pair


def test_a_changed_spec_retrains_exactly_what_depends_on_it(tmp_path, clean_tiny):
    """Changing the old model's spec reruns every record and retrains the old model, BCT's
    new model and h, never Independent's new model; changing the new model's spec retrains
    both new models and h, never the old model. (From a copy of the clean run's cache.)"""
    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(clean_tiny[1], cache)
    methods = ["--methods", "independent,bct,fct", "--no-plots"]
    assert main(tiny_args(out, cache, *methods)) == 0
    first = set(entries(cache))
    hashes = {k: r["config_hash"] for k, r in _records(out).items()}

    def names(paths):  # trained artifacts only (embeddings are recomputed with their model)
        kinds = ("models", "transformations")
        return sorted(p.name.rsplit("-", 1)[0] for p in paths if p.parent.name in kinds)

    set_old = ["--set", "scenario.half-classes.old.epochs=1"]  # a changed spec, quick to train
    assert main(tiny_args(out, cache, *methods, *set_old)) == 0
    second = set(entries(cache))
    new_old = names(second - first)
    assert new_old == [
        "h-test_resnet-synthetic-all-ce-32",
        "test_resnet-synthetic-0-9-ce-32",
        "test_resnet-synthetic-all-ce-32-bct",
    ], new_old
    recs = _records(out)
    assert all(recs[k]["config_hash"] != hashes[k] for k in hashes)

    set_new = ["--set", "scenario.half-classes.new.epochs=1"]
    assert main(tiny_args(out, cache, *methods, *set_old, *set_new)) == 0
    new_new = names(set(entries(cache)) - second)
    assert new_new == [
        "h-test_resnet-synthetic-all-ce-32",
        "test_resnet-synthetic-all-ce-32",
        "test_resnet-synthetic-all-ce-32-bct",
    ], new_new


def test_report_without_own_results_points_at_the_reference(tmp_path, monkeypatch, capsys):
    (tmp_path / "results" / "reference" / "tiny" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fct run tiny" in err
    assert "fct report tiny --results results/reference/tiny" in err
