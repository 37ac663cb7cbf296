"""fct.record: the run record's one definition, shared by the runner and the report.

The typed record writes exactly the JSON it read (keys it does not know included), validates
with the report's messages, names its method's traits (and, for records written before them,
the rule by name, which must agree with what the built-ins declare), and sits on the ground
floor: it imports nothing of fct but errors and io.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
from report_records import make_record

from fct import record, runner
from fct.errors import FCTError
from fct.io import write_json
from fct.methods import METHODS
from fct.record import (
    BASELINE,
    MethodTraits,
    RunRecord,
    label_of_older_record,
    method_traits,
    traits_of_older_record,
    validate_record,
)
from fct.report import records as report_records

ROOT = Path(__file__).resolve().parents[2]

#: Every key the runner writes (fct.runner.run_one), with curves.
RUNNER_KEYS = {
    "schema",
    "suite",
    "scenario",
    "method",
    "label",
    "seed",
    "smoke",
    "config_hash",
    "method_source",
    "scenario_config",
    "method_config",
    "cases",
    "costs",
    "curves",
    "auc",
    "backfill_curves",
    "cases_cosine",
    "diagnostics",
    "artifacts",
    "artifact_weights",
    "models",
    "notes",
    "provenance",
}


def full_record() -> dict:
    """A record with every key the runner writes."""
    rec = make_record("a", "fct", (45.0, 25.0), label="FCT")
    rec.update(
        label="FCT",
        smoke=False,
        config_hash="0123456789abcdef",
        method_source=None,  # a method defined interactively: written as null
        curves={"random": [1.0, 2.0]},
        auc={"random": 1.5},
        backfill_curves={"metric": "mAP", "fractions": [0.0, 1.0], "auc_top1": {"random": 2.0}},
        cases_cosine={},
        diagnostics={"cross_norm_ratio": None},
        artifacts={"models/old": "abc"},
        artifact_weights={"models/old": None},
        models={"old": "models/old"},
        notes={},
    )
    return rec


def test_a_record_round_trips_to_the_same_bytes(tmp_path: Path) -> None:
    data = full_record()
    assert set(data) == RUNNER_KEYS
    rec = RunRecord.from_json(copy.deepcopy(data), "r.json")
    assert rec.to_json() == data and rec.as_dict() == data and not rec.extra
    ours, theirs = rec.write(tmp_path / "a.json"), write_json(tmp_path / "b.json", data)
    assert ours.read_bytes() == theirs.read_bytes()
    assert RunRecord.read(ours) == rec


def test_absent_curves_are_not_written_and_unknown_keys_are_kept() -> None:
    data = full_record()
    for key in ("curves", "auc", "backfill_curves"):
        del data[key]  # a scenario without backfilling curves
    data["from_the_future"] = {"x": 1}
    rec = RunRecord.from_json(copy.deepcopy(data))
    assert rec.curves is None and rec.extra == {"from_the_future": {"x": 1}}
    assert rec.to_json() == data
    assert rec.to_json()["method_source"] is None  # null stays null


def test_reading_refuses_with_the_validation_messages(tmp_path: Path) -> None:
    bad = full_record()
    bad["cases"]["cross"]["mAP"] = "high"
    with pytest.raises(FCTError) as direct:
        validate_record(copy.deepcopy(bad), "r.json")
    with pytest.raises(FCTError) as typed:
        RunRecord.from_json(copy.deepcopy(bad), "r.json")
    assert str(typed.value) == str(direct.value)
    assert "r.json: key 'cases.cross.mAP' must be a finite number" in str(typed.value)
    path = write_json(tmp_path / "x.json", [1, 2])
    with pytest.raises(FCTError, match="a run record must be a JSON object"):
        RunRecord.read(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("report_order", "first", "key 'method_config.report_order' must be an integer"),
        ("role", 3, "key 'method_config.role' must be a string"),
        ("keeps_new_model", "yes", "key 'method_config.keeps_new_model' must be true or false"),
        ("role", "x" * 201, "key 'method_config.role' is 201 characters"),
    ],
)
def test_bad_traits_are_refused_naming_the_key(key, value, message) -> None:
    rec = full_record()
    rec["method_config"][key] = value
    with pytest.raises(FCTError, match=message):
        validate_record(rec, "r.json")


def test_one_definition_for_runner_and_report() -> None:
    assert runner.record_path is record.record_path
    assert runner.SCHEMA == record.SCHEMA
    assert report_records.validate_record is record.validate_record
    assert not hasattr(runner, "CASES")


def test_the_record_module_is_on_the_ground_floor() -> None:
    tree = ast.parse((ROOT / "fct" / "record.py").read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fct")
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("fct")
    }
    assert imported == {"fct.errors", "fct.io", "fct.record_schema"}


def test_traits_come_from_the_record_else_from_the_name() -> None:
    rec = full_record()
    assert method_traits(rec) == traits_of_older_record("fct")  # no trait keys: by name
    rec["method_config"].update(report_order=None, role="method", keeps_new_model=None)
    assert method_traits(rec) == MethodTraits()  # declared: the name plays no part
    rec["method_config"] = {"name": "x", "base": "independent", "role": BASELINE}
    assert method_traits(rec) == MethodTraits(None, BASELINE, None)
    assert traits_of_older_record("my_plugin") == MethodTraits()


@pytest.mark.parametrize(
    "name",
    ["independent", "bct", "fct", "fct_side", "fastfill", "fastfill_side", "ract", "l2_bct"],
)
def test_built_ins_declare_what_the_report_used_to_decide_by_name(name: str) -> None:
    """Old and new records of a built-in read alike: the rule for records written before the
    traits gives exactly what the method declares now, and the same label."""
    cls = METHODS.get(name)
    config = cls().config()
    assert json.loads(json.dumps(config)) == config
    declared = method_traits({"method": name, "method_config": config})
    assert declared == traits_of_older_record(name)
    assert label_of_older_record(name) == cls.label


def test_a_plugin_declares_nothing_by_default() -> None:
    from fct.methods import Method

    class Plugin(Method):
        name = "plugin_x"

    config = Plugin().config()
    assert (config["report_order"], config["role"], config["keeps_new_model"]) == (
        None,
        "method",
        None,
    )
    assert set(Plugin().hash_config()) == {"name", "base", "settings"}  # hashes unchanged
