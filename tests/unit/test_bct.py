"""BCT's influence term as the method builds it: frozen old classifier, synthesised rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fct.builders import Batch
from fct.methods.baselines import BCTInfluence, BCTSettings


def fake_ctx(old_dataset="d", new_dataset="d"):
    old_module = SimpleNamespace(
        classifier=SimpleNamespace(weight=torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    )
    old = SimpleNamespace(
        module=old_module, digest="abc", classifier_weight=lambda: old_module.classifier.weight
    )
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [3.0, 4.0]])
    labels = torch.tensor([0, 1, 2, 2])
    scenario = SimpleNamespace(
        old=SimpleNamespace(dataset=old_dataset, loss="ce", loss_args=(("smoothing", 0.0),)),
        new=SimpleNamespace(dataset=new_dataset),
    )
    return SimpleNamespace(
        old_model=lambda: old,
        embed=lambda m, d: (feats, labels),
        device=torch.device("cpu"),
        scenario=scenario,
    )


def test_new_class_rows_are_scaled_class_means():
    term = BCTInfluence(BCTSettings(rows="old+scaled-means")).bind(fake_ctx())
    term.prepare(fake_ctx(), SimpleNamespace(num_classes=3))
    w = term.old_weight
    assert torch.equal(w[:2], torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # old rows copied, frozen
    # class 2's mean is (3, 4): its direction at the old rows' mean norm (1.5)
    assert torch.allclose(w[2], torch.tensor([0.6, 0.8]) * 1.5)


def test_raw_means_and_cross_dataset_rows():
    term = BCTInfluence(BCTSettings()).bind(fake_ctx())
    term.prepare(fake_ctx(), SimpleNamespace(num_classes=3))
    assert torch.allclose(term.old_weight[2], torch.tensor([3.0, 4.0]))
    cross = BCTInfluence(BCTSettings()).bind(fake_ctx("a", "b"))
    cross.prepare(fake_ctx("a", "b"), SimpleNamespace(num_classes=3))
    # another dataset: no class is an old class, every row is a class mean
    assert torch.allclose(cross.old_weight[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(cross.old_weight[2], torch.tensor([3.0, 4.0]))


def test_influence_value_on_a_hand_made_case():
    term = BCTInfluence(BCTSettings(weight=2.0)).bind(fake_ctx())
    term.prepare(fake_ctx(), SimpleNamespace(num_classes=3))
    emb = torch.tensor([[1.0, 1.0]])
    logits = emb @ term.old_weight.T  # [1, 2, 7]
    expected = 2.0 * (torch.logsumexp(logits, 1) - logits[0, 1])
    got = term(Batch(emb, None, torch.tensor([1]), None))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert term.key()["old"] == "abc" and term.key()["rows"] == "old+means"
