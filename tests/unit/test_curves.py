"""Backfilling curves (fct.curves): the 22 fractions, the mixed gallery, the end points
equal to the cross and new/new cases, a method's own order, the seeded random order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fct import retrieval
from fct.curves import (
    backfill_counts,
    backfill_curves,
    backfill_fractions,
    check_order,
    curve_orders,
    curve_points,
    mixed_gallery,
    random_order,
)
from fct.errors import FCTError
from fct.methods.base import Deployment

OPTS = {"distance": "l2", "backend": "torch", "device": "cpu"}


def _features(n: int = 210, d: int = 8, classes: int = 6, bad: float = 0.3, seed: int = 0):
    """New embeddings (class centres + noise) and an updated gallery in which a ``bad`` share
    of the items are pure noise (badly transformed) and the rest near their new embedding."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = g.normal(size=(classes, d)) * 3
    new = (centres[labels] + g.normal(size=(n, d))).astype(np.float32)
    updated = (new + 0.3 * g.normal(size=(n, d))).astype(np.float32)
    worst = g.permutation(n)[: int(bad * n)]
    updated[worst] = g.normal(size=(len(worst), d)).astype(np.float32) * 3
    return new, updated, labels.astype(np.int64), worst


def test_fractions_and_counts_have_22_points() -> None:
    fractions = backfill_fractions()
    assert len(fractions) == 22 and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert fractions[1] == pytest.approx(1 / 21)
    counts = backfill_counts(1000)
    assert len(counts) == 22 and counts[0] == 0 and counts[-1] == 1000
    assert counts == sorted(counts) and counts[1] == round(1000 / 21)
    assert backfill_counts(10)[-1] == 10  # fewer items than steps still ends at all of them


def test_mixed_gallery_replaces_the_first_items_of_the_order() -> None:
    new, updated = np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32)
    out = mixed_gallery(new, updated, np.array([2, 0, 3, 1]), 2)
    assert out[:, 0].tolist() == [1, 0, 1, 0]
    assert updated.sum() == 0  # the method's gallery is not modified in place


def test_curve_endpoints_equal_the_cross_and_new_new_cases() -> None:
    new, updated, labels, _ = _features()
    points = curve_points(
        new, updated, labels, random_order(len(labels), 0), backfill_counts(len(labels)), OPTS
    )
    assert len(points) == 22
    cross = retrieval.evaluate(
        retrieval.FeatureSet(new, labels),
        retrieval.FeatureSet(updated, labels),
        paired=True,
        **OPTS,
    )
    new_new = retrieval.evaluate(retrieval.FeatureSet(new, labels), **OPTS)
    for key in ("top1", "top5", "mAP", "mAP@R"):
        assert points[0][key] == cross[key]  # exactly, not approximately
        assert points[-1][key] == new_new[key]


def _ctx(seed: int = 0):
    return SimpleNamespace(seed=seed)


def test_worst_first_order_gives_a_higher_curve_than_random() -> None:
    new, updated, labels, worst = _features()
    rest = np.setdiff1d(np.arange(len(labels)), worst)
    order = np.concatenate([worst, rest])
    dep = Deployment(
        query_model=None, backfill_order=torch.from_numpy(order), backfill_order_name="worst"
    )
    rec = backfill_curves(
        curve_orders(len(labels), _ctx().seed, (dep.backfill_order_name, dep.backfill_order)),
        torch.from_numpy(new),
        torch.from_numpy(updated),
        torch.from_numpy(labels),
        OPTS,
    )
    assert set(rec["curves"]) == {"random", "worst"}
    for order_name in ("random", "worst"):
        assert len(rec["curves"][order_name]) == 22
        assert len(rec["backfill_curves"]["top1"][order_name]) == 22
        assert rec["auc"][order_name] == pytest.approx(np.mean(rec["curves"][order_name]), abs=1e-3)
    worst_curve, random_curve = rec["curves"]["worst"], rec["curves"]["random"]
    assert worst_curve[0] == random_curve[0] and worst_curve[-1] == random_curve[-1]
    assert all(w >= r for w, r in zip(worst_curve[1:-1], random_curve[1:-1], strict=True))
    assert rec["auc"]["worst"] > rec["auc"]["random"] + 1
    assert rec["backfill_curves"]["metric"] == "mAP"
    assert len(rec["backfill_curves"]["fractions"]) == 22


def test_random_order_depends_on_the_run_seed_only() -> None:
    assert np.array_equal(random_order(50, 3), random_order(50, 3))
    assert not np.array_equal(random_order(50, 3), random_order(50, 4))


def test_a_bad_method_order_is_refused() -> None:
    with pytest.raises(FCTError, match="not a permutation"):
        check_order([0, 0, 1], 3, "mine")
    with pytest.raises(FCTError, match="permutation of the 3"):
        check_order([0, 1], 3, "mine")
    new, updated, labels, _ = _features(n=30)
    dep = Deployment(
        query_model=None, backfill_order=torch.arange(30), backfill_order_name="random"
    )
    with pytest.raises(FCTError, match="may not be named 'random'"):
        backfill_curves(
            curve_orders(30, _ctx().seed, (dep.backfill_order_name, dep.backfill_order)),
            torch.from_numpy(new),
            torch.from_numpy(updated),
            torch.from_numpy(labels),
            OPTS,
        )
