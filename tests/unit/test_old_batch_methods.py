"""RACT and L2-BCT: the terms that embed the batch images with the frozen old model
(fct.methods.old_batch), by hand and against naive loops; their checks and registrations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fct.builders import Batch
from fct.errors import FCTError
from fct.methods import METHODS
from fct.methods.l2_bct import L2BCT, L2Compatibility, l2_compat_loss
from fct.methods.ract import RACT, RACTRegularizer, ract_loss
from fct.scenarios import load_suite

NEW_METHODS = ("fastfill", "fastfill_side", "ract", "l2_bct")


def test_ract_loss_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    new, old = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 3])
    t = 0.1  # every negative (topk = 0), checked by hand below
    zn, zo = F.normalize(new, dim=1), F.normalize(old, dim=1)
    total = 0.0
    for i in range(7):
        pos = math.exp(float(zn[i] @ zo[i]) / t)
        den = pos
        for k in range(7):
            if labels[k] != labels[i]:
                den += math.exp(float(zn[i] @ zo[k]) / t) + math.exp(float(zn[i] @ zn[k]) / t)
        total += -math.log(pos / den)
    assert ract_loss(new, old, labels, t, topk=0).item() == pytest.approx(total / 7, rel=1e-5)


def test_ract_gradient_reaches_the_new_embeddings_only() -> None:
    new = torch.randn(5, 3, requires_grad=True)
    old = torch.randn(5, 3, requires_grad=True)
    ract_loss(new, old, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert old.grad is None


def test_l2_term_by_hand() -> None:
    new = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    old = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    # Normalised: (0.6, 0.8) vs (1, 0): 0.16 + 0.64; (0, 1) vs (1, 0): 1 + 1.
    # Mean over 2 items x 2 dimensions: (0.8 + 2) / 4 = 0.7.
    assert l2_compat_loss(new, old).item() == pytest.approx(0.7)


class _LinearOld(nn.Module):
    """A stand-in old model: flattens the images and applies a fixed linear map."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(12, d)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def test_extra_losses_embed_the_batch_images_with_the_old_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    new = torch.randn(6, 4, requires_grad=True)
    for extra, expected in (
        (
            RACTRegularizer(weight=2.0, temperature=0.2, topk=2),
            lambda n, o: 2.0 * ract_loss(n, o, labels, 0.2, 2),
        ),
        (L2Compatibility(weight=0.5), lambda n, o: 0.5 * l2_compat_loss(n, o)),
    ):
        old_model = _LinearOld(4)
        extra._old = old_model.eval()
        got = extra(Batch(new, None, labels, x))
        with torch.no_grad():
            old = old_model.embed(x)
        assert got.item() == pytest.approx(expected(new, old).item(), rel=1e-6)
        got.backward()
        assert all(p.grad is None for p in old_model.parameters())  # the old model is frozen


def test_equal_dims_are_required() -> None:
    sc = load_suite("tiny").scenarios[0]
    bad = dataclasses.replace(sc, new=dataclasses.replace(sc.new, embedding_dim=16))
    for method, name in ((RACT(), "RACT"), (L2BCT(), "L2-BCT")):
        method.check(sc)
        with pytest.raises(FCTError, match=f"{name} needs equal old and new embedding sizes"):
            method.check(bad)


def test_new_methods_are_registered_with_labels_and_configs() -> None:
    for name in NEW_METHODS:
        method = METHODS.get(name)()
        assert method.config()["name"] == name and method.label
    assert METHODS.get("ract")().config()["settings"] == {
        "weight": 1.0,
        "temperature": 0.01,
        "topk": 10,
    }
    assert METHODS.get("l2_bct")().config()["settings"] == {"weight": 1.0}
