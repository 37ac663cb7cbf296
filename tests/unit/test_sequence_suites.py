"""Sequence scenarios in suite files: how generations are merged, the one-line errors for bad
specs (before anything trains), and that pair scenarios and BCT keep their hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fct.errors import FCTError
from fct.scenarios import load_suite, parse_suite
from fct.sequence import check_sequence, step_scenario

HEAD = """
[suite]
name = "s"
methods = ["independent", "bct", "fct"]
[defaults.model]
dataset = "synthetic"
arch = "test_resnet"
epochs = 2
[defaults.old]
classes = [0, 3]
"""


def parse(scenario: str, head: str = HEAD):
    return parse_suite(head + scenario, "s", Path("s.toml"))


def one_line_error(scenario: str, head: str = HEAD) -> str:
    with pytest.raises(FCTError) as e:
        parse(scenario, head)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_generations_merge_over_defaults_model_and_the_scenario_model():
    suite = parse(
        """
[[scenario]]
name = "seq"
kinds = ["sequence", "class-subset"]
model = { epochs = 3 }
models = [{ classes = [0, 4] }, { classes = [0, 7], lr = 0.2 }, {}]
"""
    )
    sc = suite.scenarios[0]
    assert sc.is_sequence and len(sc.models) == 3
    assert [m.classes for m in sc.models] == [(0, 4), (0, 7), None]
    assert [m.epochs for m in sc.models] == [3, 3, 3]  # the scenario's model table
    assert [m.lr for m in sc.models] == [0.1, 0.2, 0.1]
    assert all(m.dataset == "synthetic" for m in sc.models)  # defaults.model
    # defaults.old does not reach a sequence: its old end is the first generation
    assert sc.old == sc.models[0] and sc.new == sc.models[-1]
    # side-information on the first generation's data
    assert sc.side.classes == (0, 4)
    assert "models" in sc.as_dict() and len(sc.as_dict()["models"]) == 3
    step = step_scenario(sc, 1, 2)
    assert step.old == sc.models[1] and step.new == sc.models[2] and not step.is_sequence


@pytest.mark.parametrize(
    "scenario, expected",
    [
        (
            'kinds = ["sequence"]\nmodels = [{}, {}]',
            "a sequence needs 3 to 32 model generations, got 2",
        ),
        ('kinds = ["sequence"]', "a sequence scenario needs models = ["),
        ("models = [{}, {}, {}]", "'models' (a list of model generations) is for sequence"),
        ('kinds = ["sequence"]\nmodels = [{}, {}, 3]', "models must be a list of model tables"),
        (
            'kinds = ["sequence"]\nmodels = [{}, { clases = [0, 4] }, {}]',
            "models[1]: unknown key 'clases' (did you mean 'classes'?)",
        ),
        (
            'kinds = ["sequence"]\nmodels = [{}, {}, {}]\nnew = { epochs = 1 }',
            "a sequence scenario takes no [new] table",
        ),
        (
            'kinds = ["sequence"]\nmodels = [{}, { embedding_dim = 0 }, {}]',
            "models[1]",
        ),
    ],
)
def test_bad_sequence_specs_are_one_line(scenario, expected):
    msg = one_line_error(f'[[scenario]]\nname = "seq"\n{scenario}\n')
    assert expected in msg and "scenario 'seq'" in msg


def test_methods_that_cannot_run_an_update_are_refused_per_step():
    suite = parse(
        """
[[scenario]]
name = "seq"
kinds = ["sequence"]
models = [{}, { embedding_dim = 64 }, {}]
"""
    )
    sc = suite.scenarios[0]
    with pytest.raises(FCTError, match=r"update 0 -> 1: .*equal"):
        check_sequence(sc, sc.method("independent"))
    check_sequence(sc, sc.method("fct"))  # h maps between sizes: accepted


def test_pair_scenarios_and_bct_keep_their_hashes():
    # Digests of the committed suites before sequences existed (fct.scenarios on main).
    assert load_suite("tiny").scenarios[0].digest() == "a71cc9cd42b73038"
    quick = {sc.name: sc.digest() for sc in load_suite("quickstart").scenarios}
    assert quick["fmnist-half"] == "508486dbc21402f9"
    assert "models" not in load_suite("tiny").scenarios[0].as_dict()
    from fct.methods import METHODS

    bct = METHODS.get("bct")()
    assert "anchor" not in bct.hash_config()["settings"]
    first = METHODS.get("bct")(METHODS.get("bct").Settings(anchor="first"))
    assert first.hash_config()["settings"]["anchor"] == "first"
    assert first.sequence_anchor() == "first" and bct.sequence_anchor() == "previous"


def test_smoke_and_global_batch_shrink_every_generation():
    from fct.suite_variants import smoke, with_global_batch

    suite = load_suite("quickstart")
    sc = next(s for s in suite.scenarios if s.is_sequence)
    small = smoke(sc)
    assert [m.epochs for m in small.models] == [1, 1, 1]
    assert small.old == small.models[0] and small.new == small.models[-1]
    ends = [m.classes[1] for m in small.models]
    assert ends == sorted(set(ends)) and ends[-1] == 10  # still growing, onto 10 classes
    big = next(s for s in with_global_batch(suite, 512).scenarios if s.is_sequence)
    assert {m.batch_size for m in big.models} == {512}
    assert big.old == big.models[0] and big.new == big.models[-1]


@pytest.mark.parametrize(
    "method",
    ["independent", "bct", "fct", "fct_side", "fastfill", "fastfill_side", "ract", "l2_bct"],
)
def test_every_built_in_method_accepts_a_same_size_sequence(method):
    # Each deploys by the chain's rules: a transformation (carried update by update), or
    # the gallery as stored with the new model trained against the method's previous one.
    sc = parse(
        f"""
[[scenario]]
name = "seq"
kinds = ["sequence"]
methods = ["{method}"]
models = [{{ classes = [0, 4] }}, {{ classes = [0, 7] }}, {{}}]
"""
    ).scenarios[0]
    check_sequence(sc, sc.method(method))
