"""FastFill (Jaeckle et al. 2023): its loss by hand, the uncertainty head beside h, and the
labels a transformation loss gets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fct.builders import accepts_labels
from fct.errors import FCTError
from fct.methods.fastfill import UncertainTransformation, classifier_logits, fastfill_loss


def test_fastfill_loss_by_hand() -> None:
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    sigma = torch.tensor([0.0, math.log(2.0)])
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    # Per-item squared error, averaged over the 2 dimensions: 0.5 and 1.0.
    mse = [0.5, 1.0]
    # Label-smoothed (0.1, 2 classes) CE: 0.95 * -log p_y + 0.05 * -log p_other.
    p0 = math.exp(2) / (math.exp(2) + 1)
    ce = [0.95 * -math.log(p0) + 0.05 * -math.log(1 - p0), math.log(2.0)]
    loss_items = [m + c for m, c in zip(mse, ce, strict=True)]
    # 0.5 exp(-sigma) L + 0.5 sigma, averaged: exp(-0) = 1, exp(-log 2) = 1/2.
    expected = (0.5 * loss_items[0] + (0.25 * loss_items[1] + 0.5 * math.log(2.0))) / 2
    got = fastfill_loss(pred, sigma, target, logits, labels, smoothing=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Without the classification term only the squared error is weighted.
    no_ce = (0.5 * mse[0] + 0.25 * mse[1] + 0.5 * math.log(2.0)) / 2
    assert fastfill_loss(pred, sigma, target, None, None).item() == pytest.approx(no_ce, rel=1e-6)


def test_uncertain_transformation_drops_in_for_h() -> None:
    torch.manual_seed(0)
    for d_side in (0, 4):
        m = UncertainTransformation(6, 5, d_side, hidden=16)
        old = torch.randn(32, 6)
        side = torch.randn(32, 4) if d_side else None
        m.train()
        m(old, side).sum().backward()  # one step so BatchNorm has statistics to fold
        m.eval()
        with torch.no_grad():
            out, sigma = m.with_sigma(old, side)
            assert out.shape == (32, 5) and sigma.shape == (32,)
            assert torch.equal(m(old, side), out)
            assert torch.allclose(m.folded()(old, side), out, atol=1e-5)
        m.freeze_bn()
        m.train()
        assert all(not b.training for b in m.modules() if isinstance(b, nn.BatchNorm1d))


def test_transformation_losses_get_labels_only_when_they_ask() -> None:
    assert accepts_labels(lambda h, o, s, t, labels=None: 0)
    assert accepts_labels(lambda h, o, s, t, **kw: 0)
    assert not accepts_labels(lambda h, o, s, t: 0)


def test_fastfill_loss_defaults_and_shape_error() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    sigma, logits = torch.randn(3, generator=g), torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 3, 1])
    smoothed = fastfill_loss(pred, sigma, target, logits, labels, smoothing=0.1)
    assert fastfill_loss(pred, sigma, target, logits, labels).item() == pytest.approx(
        smoothed.item(), rel=1e-6
    )  # the paper's label smoothing, 0.1
    with pytest.raises(
        FCTError, match=r"^h's output \(3, 2\) does not match the new embeddings \(3, 5\)$"
    ):
        fastfill_loss(pred, sigma, torch.randn(3, 5), None, None)


def test_classifier_logits_as_the_new_model_was_trained_to_read_them() -> None:
    """A linear classifier for cross-entropy; scale * cosine for CosFace / ArcFace (their rows
    are class centres on the sphere), at the loss's scale (30 unless the suite sets one)."""
    emb = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ce = SimpleNamespace(loss="ce", loss_args=())
    assert classifier_logits(ce, weight, emb).tolist() == [[3.0, 8.0, 7.0], [0.0, 4.0, 2.0]]
    r = 1 / math.sqrt(2)
    cosines = [[0.6, 0.8, 1.4 * r], [0.0, 1.0, r]]
    for loss in ("cosface", "arcface"):
        for args, scale in (((), 30.0), ((("scale", 10.0), ("margin", 0.2)), 10.0)):
            spec = SimpleNamespace(loss=loss, loss_args=args)
            got = classifier_logits(spec, weight, emb)
            expected = torch.tensor(cosines) * scale
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
