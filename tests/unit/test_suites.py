"""The suite files' validation and listing (the paper suites' smoke runs end to end are in
tests/e2e/test_paper_suites.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fct.cli import main
from fct.scenarios import KINDS, list_suites, load_suite, parse_suite
from fct.suite_variants import smoke


def test_registry_has_every_kind_and_enough_scenarios():
    scenarios = [sc for name in list_suites() for sc in load_suite(name).scenarios]
    assert len(scenarios) >= 12
    assert {k for sc in scenarios for k in sc.kinds} == set(KINDS)
    assert len({sc.name for sc in scenarios}) == len(scenarios)


def test_list_scenarios_cli(capsys):
    assert main(["list", "scenarios"]) == 0
    out = capsys.readouterr().out
    assert "imagenet/imagenet-half" in out and "cross-architecture" in out
    assert main(["list", "suites"]) == 0
    assert "quickstart" in capsys.readouterr().out


def test_smoke_keeps_class_proportions():
    sc = load_suite("imagenet").scenarios[0]
    s = smoke(sc)
    assert s.old.classes == (0, 5) and s.new.classes == (0, 10) and s.eval.classes == (0, 10)
    assert s.old.epochs == 1 and s.old.max_per_class == 4 and s.new.image_size == 32
    assert smoke(load_suite("quickstart").scenarios[0]).old.classes == (0, 5)


SUITE = """
[suite]
name = "t"
[defaults.model]
dataset = "synthetic"
arch = "test_resnet"
[[scenario]]
name = "a"
"""


@pytest.mark.parametrize(
    "patch, needle",
    [
        (
            '[[scenario]]\nname = "b"\nold = { archh = "resnet18" }',
            "unknown key 'archh' (did you mean 'arch'?)",
        ),
        (
            '[[scenario]]\nname = "b"\nold = { arch = "resnet05" }',
            "unknown timm architecture 'resnet05'",
        ),
        (
            '[[scenario]]\nname = "b"\nnew = { dataset = "cifar10" }',
            "unknown dataset 'cifar10' (did you mean 'cifar100'?)",
        ),
        (
            '[[scenario]]\nname = "b"\nmethods = ["fct_sidee"]',
            "unknown method 'fct_sidee' (did you mean 'fct_side'?)",
        ),
        (
            '[[scenario]]\nname = "b"\nnew = { loss = "arcfac" }',
            "unknown loss 'arcfac' (did you mean 'arcface'?)",
        ),
        ('[[scenario]]\nname = "b"\nkinds = ["cross-arch"]', "unknown kind 'cross-arch'"),
        ('[[scenario]]\nname = "b"\nold = { classes = [5, 2] }', "classes must be [first, end)"),
        ('[[scenario]]\nname = "b"\nold = { epochs = "ten" }', "'epochs' must be an integer"),
        ('[[scenario]]\nname = "a"', "duplicate scenario name"),
        (
            '[[scenario]]\nname = "b"\nside_info = false\nmethods = ["fct_side"]',
            "fct_side needs side-information",
        ),
    ],
)
def test_suite_validation_errors(patch, needle, tmp_path):
    from fct.errors import FCTError

    with pytest.raises(FCTError) as e:
        parse_suite(SUITE + patch, "t", tmp_path / "t.toml")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_syntax_error_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(SUITE + "\n[[scenario]\nname = 'x'\n")
    assert main(["run", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TOML error" in err and "line 10" in err


@pytest.mark.slow  # end to end: a whole `fct` command
def test_curves_can_be_switched_off_per_scenario(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "fct" / "suites" / "tiny.toml").read_text()
    suite = tmp_path / "nocurves.toml"
    suite.write_text(
        text.replace('name = "tiny"', 'name = "nocurves"') + "eval = { curves = false }\n"
    )
    assert load_suite(str(suite)).scenarios[0].eval.curves is False
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                str(suite),
                "--methods",
                "fct",
                "--out",
                str(out),
                "--cache",
                str(tmp_path / "c"),
                "--device",
                "cpu",
                "--no-plots",
            ]
        )
        == 0
    )
    rec = json.loads((out / "runs" / "half-classes" / "fct.json").read_text())
    assert "curves" not in rec and "auc" not in rec and rec["cases"]["cross"]["mAP"] > 0
