"""Baselines as their authors define them: each loss pinned on small fixed tensors against the
paper's formula worked out here with plain arithmetic, and the method settings mechanism."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fct.builders import Batch
from fct.errors import FCTError
from fct.methods.baselines import BCTInfluence, BCTSettings
from fct.methods.l2_bct import l2_compat_loss
from fct.methods.ract import old_entropy_order, ract_loss
from fct.scenarios import load_suite, parse_set, parse_suite

OLD_W = [[1.0, 0.0], [0.0, 2.0]]  # the frozen old classifier: 2 old classes, d = 2
FEATS = [[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [3.0, 4.0]]  # old embeddings of the new train set
LABELS = [0, 1, 2, 2]


def _ctx(loss="ce", loss_args=(("smoothing", 0.1),)):
    old = SimpleNamespace(
        module=SimpleNamespace(classifier=SimpleNamespace(weight=torch.tensor(OLD_W))),
        digest="old-digest",
        classifier_weight=lambda: torch.tensor(OLD_W),
    )
    scenario = SimpleNamespace(
        old=SimpleNamespace(dataset="d", loss=loss, loss_args=loss_args),
        new=SimpleNamespace(dataset="d"),
    )
    return SimpleNamespace(
        old_model=lambda: old,
        embed=lambda m, d: (torch.tensor(FEATS), torch.tensor(LABELS)),
        device=torch.device("cpu"),
        scenario=scenario,
    )


def _term(settings: BCTSettings, **ctx_kwargs) -> BCTInfluence:
    ctx = _ctx(**ctx_kwargs)
    term = BCTInfluence(settings).bind(ctx)
    term.prepare(ctx, SimpleNamespace(num_classes=3))
    return term


def _smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    """-sum_c q_c log p_c with q = (1 - eps) onehot + eps / C (Szegedy et al. 2016)."""
    lse = math.log(sum(math.exp(v) for v in logits))
    c = len(logits)
    return -sum(((1 - eps) * (k == target) + eps / c) * (v - lse) for k, v in enumerate(logits))


def test_bct_influence_is_the_old_models_smoothed_cross_entropy() -> None:
    # Paper form: rows = old classifier + the raw class mean (3, 4) for new class 2, and the
    # old model's own loss (cross-entropy at its smoothing 0.1). e = (1, 1): logits 1, 2, 7.
    term = _term(BCTSettings())
    assert term.old_weight.tolist() == [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]
    got = term(Batch(torch.tensor([[1.0, 1.0]]), None, torch.tensor([1]), None)).item()
    assert got == pytest.approx(_smoothed_ce([1.0, 2.0, 7.0], 1, 0.1), rel=1e-5)


def test_bct_weight_and_smoothing_setting() -> None:
    term = _term(BCTSettings(weight=2.5, smoothing=0.0))
    got = term(Batch(torch.tensor([[1.0, 1.0]]), None, torch.tensor([2]), None)).item()
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(7))
    assert got == pytest.approx(2.5 * (lse - 7.0), rel=1e-5)


def test_bct_cosface_old_model_gives_the_margin_form() -> None:
    # Old model trained with CosFace (s = 10, m = 0.2): the influence term is CosFace on the
    # extended classifier. e = (1, 0): cosines to rows (1,0), (0,2), (3,4) are 1, 0, 0.6.
    term = _term(BCTSettings(), loss="cosface", loss_args=(("margin", 0.2), ("scale", 10.0)))
    got = term(Batch(torch.tensor([[1.0, 0.0]]), None, torch.tensor([2]), None)).item()
    logits = [10 * 1.0, 10 * 0.0, 10 * (0.6 - 0.2)]
    assert got == pytest.approx(_smoothed_ce(logits, 2, 0.0), rel=1e-5)


def test_bct_bt2_form_means_for_every_class_on_normalised_features() -> None:
    # BT-2: pseudo-classifier rows = class means of L2-normalised old features, all classes.
    term = _term(BCTSettings(rows="means", normalize=True, weight=10.0))
    assert torch.allclose(term.old_weight, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    # e = (0, 5) normalised to (0, 1): logits 0, 1, 0.8; smoothing 0.1 from the old model.
    got = term(Batch(torch.tensor([[0.0, 5.0]]), None, torch.tensor([0]), None)).item()
    assert got == pytest.approx(10 * _smoothed_ce([0.0, 1.0, 0.8], 0, 0.1), rel=1e-5)


def test_bct_scaled_rows_ablation() -> None:
    term = _term(BCTSettings(rows="old+scaled-means"))
    # class 2's mean (3, 4) keeps its direction at the old rows' mean norm (1 + 2) / 2.
    assert torch.allclose(term.old_weight[2], torch.tensor([0.6, 0.8]) * 1.5)


def test_bct_check_refuses_what_it_cannot_do() -> None:
    sc = load_suite("tiny").scenarios[0]
    import dataclasses

    from fct.methods.baselines import BCT

    supcon = dataclasses.replace(sc, old=dataclasses.replace(sc.old, loss="supcon"))
    with pytest.raises(FCTError, match="trains none"):
        BCT().check(supcon)
    cos = dataclasses.replace(sc, old=dataclasses.replace(sc.old, loss="cosface"))
    with pytest.raises(FCTError, match="remove the setting"):
        BCT(BCTSettings(smoothing=0.1)).check(cos)


def test_ract_keeps_the_k_hardest_negatives_of_each_kind() -> None:
    g = torch.Generator().manual_seed(3)
    new, old = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    t, k = 0.01, 2
    total = 0.0
    for i in range(6):
        ni = new[i] / new[i].norm()
        sims_old, sims_new = [], []
        for j in range(6):
            if labels[j] != labels[i]:
                sims_old.append(float(ni @ (old[j] / old[j].norm())) / t)
                sims_new.append(float(ni @ (new[j] / new[j].norm())) / t)
        negs = sorted(sims_old, reverse=True)[:k] + sorted(sims_new, reverse=True)[:k]
        pos = float(ni @ (old[i] / old[i].norm())) / t
        m = max([pos] + negs)  # log-sum-exp by hand, shifted: the logits are ~100
        lse = m + math.log(sum(math.exp(v - m) for v in [pos] + negs))
        total += lse - pos
    assert ract_loss(new, old, labels, t, k).item() == pytest.approx(total / 6, rel=1e-5)


def test_ract_default_is_the_reference() -> None:
    from fct.methods.ract import RACT

    st = RACT().settings
    assert (st.temperature, st.topk, st.weight) == (0.01, 10, 1.0)


def test_l2_bct_is_mse_of_normalised_embeddings() -> None:
    new = torch.tensor([[0.0, 3.0, 4.0]])
    old = torch.tensor([[2.0, 0.0, 0.0]])
    # (0, 0.6, 0.8) vs (1, 0, 0): (1 + 0.36 + 0.64) / 3 dimensions
    assert l2_compat_loss(new, old).item() == pytest.approx(2.0 / 3.0)
    # the old model's scale does not matter, the new model's neither
    assert l2_compat_loss(7 * new, 0.1 * old).item() == pytest.approx(2.0 / 3.0)


def test_ract_uncertainty_order_is_by_old_classifier_entropy() -> None:
    # Classifier rows (1, 0) and (0, 1): (10, 0) is certain, (0, 0) uniform (most uncertain),
    # (1, 0.5) in between.
    x = torch.tensor([[10.0, 0.0], [0.0, 0.0], [1.0, 0.5]])
    old = SimpleNamespace(
        module=SimpleNamespace(classifier=SimpleNamespace(weight=torch.eye(2))),
        digest="o",
        classifier_weight=lambda: torch.eye(2),
    )
    ctx = SimpleNamespace(old_model=lambda: old, embed=lambda m, d: (x, torch.zeros(3)))
    assert old_entropy_order(ctx).tolist() == [1, 2, 0]


# --- settings from a suite --------------------------------------------------------------------

SUITE = """
[suite]
name = "s"
methods = ["independent", "bct", "bct_norm"]
[methods.bct]
weight = 2.0
[methods.bct_norm]
base = "bct"
label = "BCT, normalised"
normalize = true
[[scenario]]
name = "a"
[[scenario]]
name = "b"
settings.bct = { weight = 0.5 }
"""


def test_settings_come_from_the_suite_per_scenario_and_set(tmp_path: Path) -> None:
    suite = parse_suite(SUITE, "s", tmp_path / "s.toml")
    a, b = suite.scenarios
    assert a.method("bct").settings.weight == 2.0
    assert b.method("bct").settings.weight == 0.5
    variant = a.method("bct_norm")
    assert variant.settings.normalize and variant.settings.weight == 1.0
    assert variant.run_name == "bct_norm" and variant.display_label == "BCT, normalised"
    assert a.method("fct").config()["settings"] == {}
    # --set wins over the suite and the scenario
    over = parse_suite(SUITE, "s", tmp_path / "s.toml", parse_set(["bct.weight=3"]))
    assert [sc.method("bct").settings.weight for sc in over.scenarios] == [3.0, 3.0]


def test_record_hash_covers_settings_not_the_label(tmp_path: Path) -> None:
    from fct.runner import record_digest

    sc = parse_suite(SUITE, "s", tmp_path / "s.toml").scenarios[0]
    base = record_digest(sc, sc.method("bct_norm"), 0)
    relabelled = parse_suite(
        SUITE.replace('"BCT, normalised"', '"another label"'), "s", tmp_path / "s.toml"
    ).scenarios[0]
    assert record_digest(relabelled, relabelled.method("bct_norm"), 0) == base
    reweighted = parse_suite(
        SUITE, "s", tmp_path / "s.toml", parse_set(["bct_norm.weight=0.5"])
    ).scenarios[0]
    assert record_digest(reweighted, reweighted.method("bct_norm"), 0) != base
    # adding a method to the suite reruns nothing else
    more = parse_suite(
        SUITE.replace('"bct_norm"]', '"bct_norm", "fct"]'), "s", tmp_path / "s.toml"
    ).scenarios[0]
    assert record_digest(more, more.method("bct"), 0) == record_digest(sc, sc.method("bct"), 0)


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ("[methods.bctt]\nweight = 1.0", "unknown method 'bctt' (did you mean 'bct'?)"),
        ("[methods.bct]\nwieght = 1.0", "unknown setting 'wieght' (did you mean 'weight'?)"),
        ('[methods.bct]\nweight = "big"', "setting 'weight' must be a finite number"),
        ("[methods.bct]\nweight = -1.0", "setting 'weight' must be >= 0"),
        ("[methods.bct]\nsmoothing = 5.0", "setting 'smoothing' must be in [0, 1)"),
        ('[methods.bct]\nrows = "mean"', "setting 'rows' must be one of 'old+means'"),
        ("[methods.ract]\ntopk = 1.5", "setting 'topk' must be an integer"),
        ("[methods.ract]\ntemperature = 0.0", "setting 'temperature' must be > 0"),
        ('[methods.fct]\nbase = "bct"', "'fct' is a registered method"),
        ("[methods]\nbct = 5", "[methods.bct] must be a table"),
        ("[defaults]\nbct = { weight = 2.0 }", "set in a [methods.bct] table"),
    ],
)
def test_bad_settings_are_one_line(patch: str, needle: str, tmp_path: Path) -> None:
    text = SUITE.replace("[methods.bct]\nweight = 2.0\n", "") + "\n" + patch + "\n"
    with pytest.raises(FCTError) as e:
        parse_suite(text, "s", tmp_path / "s.toml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_set_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FCTError, match="--set takes METHOD.SETTING=VALUE"):
        parse_set(["bct.weight"])
    with pytest.raises(FCTError, match="unknown method 'bctx'"):
        parse_suite(SUITE, "s", tmp_path / "s.toml", parse_set(["bctx.weight=1"]))


def test_cli_refuses_bad_settings_before_training(tmp_path: Path, capsys) -> None:
    from fct.cli import main

    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    rc = main(["run", str(suite), "--set", "bct.weight=-2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "setting 'weight' must be >= 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_plugins_settings_are_set_from_the_suite(tmp_path: Path) -> None:
    from fct.methods import load_plugin

    load_plugin(str(Path(__file__).resolve().parents[2] / "examples" / "linear_map.py"))
    text = SUITE.replace('methods = ["independent", "bct", "bct_norm"]', 'methods = ["linear_map"]')
    suite = parse_suite(text + "\n[methods.linear_map]\nridge = 0.25\n", "s", tmp_path / "s.toml")
    assert suite.scenarios[0].method("linear_map").settings.ridge == 0.25
    with pytest.raises(FCTError, match="setting 'ridge' must be >= 0"):
        parse_suite(text, "s", tmp_path / "s.toml", parse_set(["linear_map.ridge=-1"]))


def test_a_plugin_file_leaves_no_bytecode_beside_it(tmp_path: Path, monkeypatch) -> None:
    """`--plugin FILE.py` writes nothing beside the user's file (no __pycache__), even where
    Python would cache bytecode, and leaves that setting as it was; a plugin that fails to
    import neither."""
    import sys

    from fct.errors import FCTError
    from fct.methods import load_plugin

    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    good, bad = tmp_path / "good_plugin.py", tmp_path / "bad_plugin.py"
    good.write_text("X = 1\n")
    bad.write_text("import no_such_module_here\n")
    load_plugin(str(good))
    with pytest.raises(FCTError, match="failed to import"):
        load_plugin(str(bad))
    monkeypatch.delitem(sys.modules, "fct_plugin_good_plugin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_plugin.py", "good_plugin.py"]
    assert sys.dont_write_bytecode is False
