"""Losses against hand-computed values and naive loop implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fct.errors import FCTError
from fct.losses import (
    LOSSES,
    arcface_loss,
    bct_influence_loss,
    cosface_loss,
    make_loss,
    nt_xent,
    supcon_loss,
    synthesize_old_classifier,
    transformation_loss,
)

# ------------------------------------------------------------------------------ naive oracles


def naive_nt_xent(z1, z2, temperature):
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    b = len(z1)
    total = 0.0
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        denom = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * b) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / temperature) / denom)
    return total / (2 * b)


def naive_supcon(embedding, labels, temperature):
    z = [F.normalize(v, dim=0) for v in embedding]
    n = len(z)
    losses = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(n) if a != i)
        terms = [-math.log(math.exp(float(z[i] @ z[p]) / temperature) / denom) for p in positives]
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def smoothed_ce(logits, label, smoothing):
    """Label-smoothed cross-entropy of one row, written out."""
    log_z = math.log(sum(math.exp(v) for v in logits))
    log_p = [v - log_z for v in logits]
    c = len(logits)
    return -sum(((1 - smoothing) * (k == label) + smoothing / c) * log_p[k] for k in range(c))


# ------------------------------------------------------------------------------ registry


def test_registry_holds_the_backbone_losses():
    assert {"ce", "cosface", "arcface", "supcon"} <= set(LOSSES.names())


@pytest.mark.parametrize("name", ["ce", "cosface", "arcface", "supcon"])
def test_every_loss_has_the_common_signature(name):
    torch.manual_seed(0)
    embedding = torch.randn(8, 5, requires_grad=True)
    weight = torch.randn(3, 5, requires_grad=True)
    logits = embedding @ weight.T
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = LOSSES.get(name)()(embedding, logits, labels, weight)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert embedding.grad is not None and torch.isfinite(embedding.grad).all()


def test_unknown_loss_argument_names_allowed_ones():
    with pytest.raises(FCTError, match="unknown argument.*smoothin.*allowed: smoothing"):
        make_loss("ce", smoothin=0.2)
    with pytest.raises(FCTError, match="allowed: scale, margin"):
        make_loss("cosface", temperature=0.1)
    with pytest.raises(FCTError, match="did you mean 'cosface'"):
        make_loss("cosfase")
    with pytest.raises(FCTError, match="temperature"):
        make_loss("supcon", temperature=0)


def test_ce_uses_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    labels = torch.tensor([0])
    loss = make_loss("ce", smoothing=0.1)(None, logits, labels, None)
    assert loss.item() == pytest.approx(smoothed_ce([2.0, 0.0, -1.0], 0, 0.1), rel=1e-6)


# ------------------------------------------------------------------------------ margin losses


def test_cosface_and_arcface_reduce_to_ce_at_zero_margin():
    torch.manual_seed(1)
    embedding = F.normalize(torch.randn(6, 4), dim=1)
    weight = F.normalize(torch.randn(5, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = F.cross_entropy(embedding @ weight.T, labels)
    torch.testing.assert_close(cosface_loss(embedding, weight, labels, scale=1, margin=0), plain)
    torch.testing.assert_close(
        arcface_loss(embedding, weight, labels, scale=1, margin=0), plain, rtol=1e-5, atol=1e-6
    )


def test_margin_losses_normalise_and_apply_margin():
    # Unnormalised inputs: the losses see cosines. Embedding at 60 degrees from class 0.
    embedding = torch.tensor([[3.0, 3.0 * math.sqrt(3)]])
    weight = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0])
    cos0, cos1 = 0.5, math.sqrt(3) / 2
    s, m = 30.0, 0.35

    def ce_two(target, other):
        return -target + math.log(math.exp(target) + math.exp(other))

    expected_cos = ce_two(s * (cos0 - m), s * cos1)
    assert cosface_loss(embedding, weight, labels, s, m).item() == pytest.approx(
        expected_cos, rel=1e-5
    )
    m = 0.5
    expected_arc = ce_two(s * math.cos(math.pi / 3 + m), s * cos1)
    assert arcface_loss(embedding, weight, labels, s, m).item() == pytest.approx(
        expected_arc, rel=1e-5
    )


def test_margin_losses_defaults_are_the_suites_defaults():
    """The functions' defaults are the registered losses' (CosFace s=30, m=0.35; ArcFace
    s=30, m=0.5): the same value whichever way a loss is called."""
    embedding = torch.tensor([[3.0, 3.0 * math.sqrt(3)], [1.0, -2.0]])
    weight = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1])
    for fn, name, s, m in (
        (cosface_loss, "cosface", 30.0, 0.35),
        (arcface_loss, "arcface", 30.0, 0.5),
    ):
        explicit = fn(embedding, weight, labels, s, m)
        assert fn(embedding, weight, labels).item() == pytest.approx(explicit.item(), rel=1e-6)
        made = make_loss(name)(embedding, None, labels, weight)
        assert made.item() == pytest.approx(explicit.item(), rel=1e-6)


def test_arcface_gradient_is_finite_at_the_poles():
    """An embedding exactly on (or opposite to) its class row: cos = +-1, where sin = sqrt(1 -
    cos^2) has an infinite derivative; the clamp keeps the gradient finite."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for row in ([1.0, 0.0], [-1.0, 0.0]):
        embedding = torch.tensor([row], requires_grad=True)
        arcface_loss(embedding, weight, torch.tensor([0])).backward()
        assert torch.isfinite(embedding.grad).all(), row


def test_arcface_past_pi_uses_the_monotonic_fallback():
    """theta + m > pi: the target logit is cos(theta) - m sin(m) (InsightFace's fallback), not
    cos(theta + m), which would rise again. Embedding at 170 degrees from class 0, m = 0.5."""
    theta = math.radians(170)
    embedding = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    s, m = 30.0, 0.5
    target = math.cos(theta) - m * math.sin(m)
    other = math.sin(theta)  # cosine to class 1
    expected = -s * target + math.log(math.exp(s * target) + math.exp(s * other))
    got = arcface_loss(embedding, weight, torch.tensor([0]), s, m).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_cosface_margin_in_the_inputs_precision():
    """float64 in, float64 arithmetic throughout (the one-hot margin is not rounded to float32)."""
    embedding = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    s, m = 30.0, 0.35
    a, b = s * (0.6 - m), s * 0.8
    expected = -a + math.log(math.exp(a) + math.exp(b))
    got = cosface_loss(embedding, weight, torch.tensor([0]), s, m).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_nt_xent_default_temperature_and_shape_error():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z1, z2, 0.1).item(), rel=1e-6)
    with pytest.raises(FCTError, match=r"got \(4, 3\) and \(2, 3\)"):
        nt_xent(z1, z2[:2])
    with pytest.raises(FCTError, match="equal shape"):
        nt_xent(z1[0], z2[0])


def test_margin_losses_name_bad_shapes_and_arguments():
    w = torch.randn(4, 2)
    for fn in (cosface_loss, arcface_loss):
        with pytest.raises(FCTError, match=r"^cosine-margin losses expect embeddings \[N, d\]"):
            fn(torch.randn(2), w, torch.tensor([0]))
        with pytest.raises(FCTError, match=r"and a weight \[C, d\]$"):
            fn(torch.randn(1, 2), torch.randn(2), torch.tensor([0]))
        with pytest.raises(FCTError, match="^embedding size 3 does not match the classifier's 2$"):
            fn(torch.randn(1, 3), w, torch.tensor([0]))
    with pytest.raises(FCTError, match=r"^scale must be a number >= 0.0, got -1"):
        make_loss("cosface", scale=-1)
    with pytest.raises(FCTError, match="^scale must be > 0, got 0"):
        make_loss("arcface", scale=0)


@pytest.mark.parametrize(
    "value, message",
    [
        (1.0, r"^smoothing must be a number in \[0.0, 1.0\), got 1.0$"),
        (-0.1, r"^smoothing must be a number in \[0.0, 1.0\), got -0.1$"),
        (False, r"^smoothing must be a number in \[0.0, 1.0\), got False$"),
        ("0.1", r"^smoothing must be a number in \[0.0, 1.0\), got '0.1'$"),
    ],
)
def test_ce_smoothing_range_is_checked_in_one_line(value, message):
    with pytest.raises(FCTError, match=message):
        make_loss("ce", smoothing=value)
    assert make_loss("ce", smoothing=0.0) is not None  # closed at 0


# ------------------------------------------------------------------------------ supcon


def test_supcon_matches_naive_loop():
    torch.manual_seed(2)
    embedding = torch.randn(9, 6)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1])  # class 3 has a single item: no positive
    got = supcon_loss(embedding, labels, temperature=0.1)
    assert got.item() == pytest.approx(naive_supcon(embedding, labels, 0.1), rel=1e-5)
    via_registry = make_loss("supcon", temperature=0.1)(embedding, None, labels, None)
    torch.testing.assert_close(via_registry, got)


def test_supcon_default_temperature_is_the_papers():
    g = torch.Generator().manual_seed(0)
    e, y = torch.randn(6, 3, generator=g), torch.tensor([0, 0, 1, 1, 2, 2])
    assert supcon_loss(e, y).item() == pytest.approx(supcon_loss(e, y, 0.1).item(), rel=1e-6)
    assert supcon_loss(e, y).item() != pytest.approx(supcon_loss(e, y, 1.1).item(), rel=1e-3)


def test_supcon_without_positive_pairs_is_zero():
    embedding = torch.randn(3, 4, requires_grad=True)
    loss = supcon_loss(embedding, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


# ------------------------------------------------------------------------------ BCT


def test_bct_influence_hand_case():
    new = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w_ext = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 2])
    # logits: [1, 0, 1] and [0, 2, 2]
    e = math.e
    hand = (-math.log(e / (2 * e + 1)) - math.log(e**2 / (1 + 2 * e**2))) / 2
    got = bct_influence_loss(new, w_ext, labels, smoothing=0.0)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    smoothed = (smoothed_ce([1, 0, 1], 0, 0.1) + smoothed_ce([0, 2, 2], 2, 0.1)) / 2
    assert bct_influence_loss(new, w_ext, labels).item() == pytest.approx(smoothed, rel=1e-6)


def test_bct_rejects_cross_dimension():
    with pytest.raises(FCTError) as info:
        bct_influence_loss(torch.randn(2, 256), torch.randn(5, 128), torch.tensor([0, 1]))
    assert str(info.value) == (
        "BCT needs equal old and new embedding sizes (old 128, new 256); "
        "use fct or fct_side for cross-dimension scenarios"
    )


def test_synthesize_old_classifier_rows():
    old_weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    embeddings = torch.tensor(
        [[9.0, 9.0], [1.0, 1.0], [3.0, 5.0], [10.0, 0.0], [-2.0, 4.0], [7.0, 7.0]]
    )
    labels = torch.tensor([0, 2, 2, 3, 3, 1])
    with pytest.warns(UserWarning, match="classes 4 have no training items"):
        w = synthesize_old_classifier(old_weight, embeddings, labels, num_classes=5)
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 3.0], [4.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad


def test_synthesize_checks_shapes():
    with pytest.raises(FCTError, match=r"\[N, 2\]"):
        synthesize_old_classifier(
            torch.randn(2, 2), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 3
        )
    with pytest.raises(FCTError, match="labels must lie"):
        synthesize_old_classifier(torch.randn(2, 2), torch.randn(1, 2), torch.tensor([5]), 3)


# ------------------------------------------------------------------------------ NT-Xent, MSE


def test_nt_xent_matches_naive_loop_and_prefers_aligned_views():
    torch.manual_seed(3)
    z1 = torch.randn(6, 5)
    z2 = z1 + 0.05 * torch.randn(6, 5)
    aligned = nt_xent(z1, z2, temperature=0.1)
    assert aligned.item() == pytest.approx(naive_nt_xent(z1, z2, 0.1), rel=1e-5)
    shuffled = nt_xent(z1, z2[torch.tensor([1, 2, 3, 4, 5, 0])], temperature=0.1)
    assert shuffled.item() == pytest.approx(
        naive_nt_xent(z1, z2[torch.tensor([1, 2, 3, 4, 5, 0])], 0.1), rel=1e-5
    )
    assert aligned < shuffled


def test_nt_xent_single_pair_is_zero():
    # One item, two views: each view's only candidate is its positive, so softmax is 1.
    assert nt_xent(torch.randn(1, 3), torch.randn(1, 3)).item() == pytest.approx(0.0, abs=1e-7)


def test_transformation_loss_is_elementwise_mse():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert transformation_loss(pred, target).item() == pytest.approx((1 + 0 + 4 + 16) / 4)
    with pytest.raises(FCTError, match="does not match"):
        transformation_loss(pred, target[:, :1])
