"""What decides whether a record or a cached artifact is reused (issue 18, item 2), at unit level:
fct.record.is_current (a record is skipped only when its config hash and its method's source
both match; damage is moved aside), fct.runner.record_digest (what a record's hash covers) and
the cache keys of the models and of h (fct.builders, the methods' extra terms). The end-to-end
counterparts are in tests/e2e/test_first_hour.py."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from fct import builders
from fct.artifacts import Cache
from fct.hashing import config_hash
from fct.methods.baselines import BCTInfluence, BCTSettings
from fct.methods.l2_bct import L2Compatibility
from fct.methods.ract import RACTRegularizer
from fct.record import is_current
from fct.runner import record_digest
from fct.scenarios import load_suite
from fct.session import Session

SC = load_suite("tiny").scenarios[0]


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


# --- is_current: when a record is skipped -------------------------------------------------------


def test_a_record_is_current_only_with_its_hash_and_its_source(tmp_path, caplog):
    rec = write(tmp_path / "bct.json", {"config_hash": "h1", "method_source": "s1"})
    caplog.set_level(logging.INFO, logger="fct.record")

    def said(*args) -> str:
        messages = [r.getMessage() for r in caplog.records]
        caplog.clear()
        assert len(messages) == 1, messages
        return messages[0]

    assert is_current(rec, "h1", "s1", "sc / bct") is True
    assert said() == f"sc / bct: up to date ({rec}), skipped"
    assert is_current(rec, "h1", None, "sc / bct") is True  # no source known: the hash decides
    said()
    assert is_current(rec, "h2", "s1", "sc / bct") is False  # the config changed
    assert said() == f"sc / bct: config changed since {rec} was written; rerunning"
    assert is_current(rec, "h1", "s2", "sc / bct") is False  # the method's file changed
    assert said() == (
        f"sc / bct: the method's source file changed since {rec} was written; rerunning the "
        "method and its evaluation (cached shared models are reused)"
    )
    # A stale record stays where it is, to be overwritten by the rerun.
    assert rec.exists() and not rec.with_name("bct.json.corrupt").exists()
    no_hash = write(tmp_path / "old.json", {"method_source": "s1"})
    assert is_current(no_hash, "h1", "s1", "sc / old") is False


def test_damage_is_named_in_the_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fct.record")
    listed = write(tmp_path / "a.json", "[1]")
    assert is_current(listed, "h", "s", "sc / a") is False
    assert [r.getMessage() for r in caplog.records] == [
        f"{listed} is not a run record (a JSON list); rerunning it"
    ]
    caplog.clear()
    broken = write(tmp_path / "b.json", "{")
    assert is_current(broken, "h", "s", "sc / b") is False
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"{broken} is unreadable (") and message.endswith("); rerunning it")
    assert "b.json" in message[len(str(broken)) :]  # the reason names the file again


def test_move_aside_replaces_an_older_damaged_copy_of_any_kind(tmp_path):
    from fct.record import move_aside

    rec = write(tmp_path / "r.json", "{bad")
    aside = tmp_path / "r.json.corrupt"
    aside.mkdir()
    (aside / "inner").write_text("x")
    move_aside(rec)
    assert aside.is_file() and aside.read_text() == "{bad" and not rec.exists()
    # A link in the way is removed, never followed: the folder it points to survives.
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "f").write_text("kept")
    aside.unlink()
    aside.symlink_to(keep, target_is_directory=True)
    write(rec, "{again")
    move_aside(rec)
    assert aside.read_text() == "{again" and (keep / "f").read_text() == "kept"


@pytest.mark.parametrize(
    "content", ["{not json", "", '["a", "list"]', "3"], ids=["bad-json", "empty", "list", "int"]
)
def test_a_damaged_record_is_moved_aside_and_rerun(tmp_path, content):
    rec = write(tmp_path / "fct.json", content)
    assert is_current(rec, "h1", "s1", "sc / fct") is False
    assert not rec.exists()
    assert rec.with_name("fct.json.corrupt").read_text() == content
    # A second damaged record replaces the first one set aside.
    write(rec, "{again")
    assert is_current(rec, "h1", "s1", "sc / fct") is False
    assert rec.with_name("fct.json.corrupt").read_text() == "{again"


# --- record_digest: what a record's hash covers ------------------------------------------------------


def test_the_record_hash_covers_the_scenario_the_method_and_the_seed():
    bct = SC.method("bct")
    base = record_digest(SC, bct, 0)
    assert base == record_digest(SC, SC.method("bct"), 0)  # stable
    assert record_digest(SC, bct, 1) != base
    assert record_digest(SC, SC.method("independent"), 0) != base
    for part, change in (
        ("old", {"lr": 0.04}),
        ("new", {"epochs": 4}),
        ("side", {"embedding_dim": 8}),
        ("transformation", {"hidden": 64}),
    ):
        other = dataclasses.replace(SC, **{part: dataclasses.replace(getattr(SC, part), **change)})
        assert record_digest(other, other.method("bct"), 0) != base, part
    heavier = type(bct)(BCTSettings(weight=2.0))
    assert record_digest(SC, heavier, 0) != base
    # Adding a method to the scenario reruns nothing else.
    more = dataclasses.replace(SC, description="another description")
    assert record_digest(more, more.method("bct"), 0) == base


def test_the_committed_reference_records_hashes_are_current():
    """The house rule: results/reference's records stay valid. Their config hashes are what
    record_digest gives today for their suite, scenario, method and seed (a change of what a
    hash covers, or of its keys' names, would rerun every user's records)."""
    root = Path(__file__).resolve().parents[2] / "results" / "reference"
    checked = 0
    for suite_dir in sorted(p for p in root.iterdir() if (p / "runs").is_dir()):
        suite = load_suite(suite_dir.name)
        scenarios = {sc.name: sc for sc in suite.scenarios}
        for path in sorted((suite_dir / "runs").glob("*/*.json")):
            rec = json.loads(path.read_text())
            sc = scenarios[rec["scenario"]]
            digest = record_digest(sc, sc.method(rec["method"]), rec["seed"])
            assert digest == rec["config_hash"], path
            checked += 1
    assert checked >= 50


# --- cache keys ----------------------------------------------------------------------------------------


def test_model_names_and_keys():
    assert builders.model_name(SC.old) == "test_resnet-synthetic-0-9-ce-32"
    assert builders.model_name(SC.new, "-bct") == "test_resnet-synthetic-all-ce-32-bct"
    key = builders.model_key(SC.new, 3, {"name": "bct"})
    assert key == {"spec": SC.new.as_dict(), "seed": 3, "extra": {"name": "bct"}, "trainer": 1}
    assert config_hash(builders.model_key(SC.new, 0)) != config_hash(builders.model_key(SC.old, 0))


def _old(digest: str):
    return SimpleNamespace(digest=digest)


def _ctx(digest: str):
    return SimpleNamespace(old_model=lambda: _old(digest))


@pytest.mark.parametrize(
    "make",
    [
        lambda: BCTInfluence(BCTSettings()),
        lambda: RACTRegularizer(),
        lambda: L2Compatibility(1.0),
    ],
    ids=["bct", "ract", "l2_bct"],
)
def test_a_terms_key_names_the_old_model_and_its_settings(make):
    """The new model a term shapes is retrained when the old model changes: the term's key
    (part of the new model's cache key) carries the old model's digest."""
    a, b = make().bind(_ctx("old-a")), make().bind(_ctx("old-b"))
    assert a.key()["old"] == "old-a"
    assert a.key() != b.key()
    assert config_hash(a.key()) == config_hash(make().bind(_ctx("old-a")).key())


def test_term_keys_are_exactly_their_settings_and_the_old_model():
    """The keys' names are part of every cached new model's key: renaming one retrains all."""
    ctx = _ctx("d")
    assert L2Compatibility(0.5).bind(ctx).key() == {
        "weight": 0.5,
        "form": "normalized-mse",
        "old": "d",
    }
    assert RACTRegularizer(2.0, 0.05, 3).bind(ctx).key() == {
        "weight": 2.0,
        "temperature": 0.05,
        "topk": 3,
        "old": "d",
    }
    settings = BCTSettings(weight=3.0)
    assert BCTInfluence(settings).bind(ctx).key() == {**settings.hashed(), "old": "d", "form": 2}


def test_term_keys_follow_their_settings():
    assert RACTRegularizer(1.0, 0.01, 10).key() != RACTRegularizer(1.0, 0.02, 10).key()
    assert RACTRegularizer(1.0, 0.01, 10).key() != RACTRegularizer(1.0, 0.01, 5).key()
    assert RACTRegularizer(1.0).key() != RACTRegularizer(2.0).key()
    assert L2Compatibility(1.0).key() != L2Compatibility(0.5).key()
    assert L2Compatibility(1.0).key()["form"] == "normalized-mse"
    assert BCTInfluence(BCTSettings()).key() != BCTInfluence(BCTSettings(rows="means")).key()


def _h_key(monkeypatch, tmp_path, old="o", new="n", side="s", seed=0, **kw) -> dict:
    """The cache key and entry name train_transformation gives h."""
    session = Session(Cache(tmp_path / "cache"), seed=seed)
    got = {}

    def entry(kind, name, key):
        got.update(kind=kind, name=name, key=key)
        return SimpleNamespace(digest=config_hash(key))

    monkeypatch.setattr(session, "entry", entry)
    monkeypatch.setattr(builders, "load_or_train", lambda *a: None)

    def trained(digest, spec, name):
        return SimpleNamespace(digest=digest, spec=spec, name=name)

    models = (
        trained(old, SC.old, "old"),
        trained(new, SC.new, "newname"),
        trained(side, SC.side, "side") if side else None,
    )
    builders.train_transformation(session, None, SC.transformation, models, **kw)
    return got


def _own_loss(h, o, s, t):
    return ((h(o, s) - t) ** 2).mean()


def test_hs_key_names_every_model_it_is_fitted_on(monkeypatch, tmp_path):
    base = _h_key(monkeypatch, tmp_path)
    assert base["kind"] == "transformations" and base["name"] == "h-newname-side"
    key = base["key"]
    assert (key["old"], key["new"], key["side"], key["seed"]) == ("o", "n", "s", 0)
    assert key["h"] == SC.transformation.as_dict() and key["trainer"] == 1
    for change in ({"old": "o2"}, {"new": "n2"}, {"side": "s2"}, {"seed": 1}):
        assert _h_key(monkeypatch, tmp_path, **change)["key"] != key, change
    no_side = _h_key(monkeypatch, tmp_path, side=None)
    assert no_side["name"] == "h-newname" and no_side["key"]["side"] is None
    named = _h_key(monkeypatch, tmp_path, name="fastfill", extra_key={"v": 1}, loss=_own_loss)
    assert named["name"] == "fastfill-newname-side"
    # A method's own loss: its source file is part of the key.
    assert named["key"]["extra"]["v"] == 1 and named["key"]["extra"]["source"] is not None


def test_the_new_models_key_carries_the_terms_key_and_source(monkeypatch, tmp_path):
    from fct.context import Context

    ctx = Context(SC, Cache(tmp_path / "cache"))
    got = []
    monkeypatch.setattr(
        "fct.context.train_backbone", lambda s, spec, entry, extra, c: got.append(entry)
    )
    monkeypatch.setattr(Context, "old_model", lambda self: _old("old-digest"))
    ctx.new_model()
    ctx.new_model(extra=L2Compatibility(1.0).bind(ctx), tag="l2_bct")
    plain, own = got
    assert plain.name == "test_resnet-synthetic-all-ce-32"
    assert own.name == "test_resnet-synthetic-all-ce-32-l2_bct"
    assert plain.digest != own.digest
    assert own.key["extra"]["old"] == "old-digest" and own.key["extra"]["source"]
