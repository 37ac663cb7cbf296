"""Backfilling curves and the methods beyond the baselines: FastFill, RACT, L2-BCT."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fct import retrieval
from fct.artifacts import Cache
from fct.builders import Batch, accepts_labels
from fct.cli import main
from fct.context import Context
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
from fct.methods import METHODS
from fct.methods.base import Deployment
from fct.methods.fastfill import FastFill, UncertainTransformation, fastfill_loss
from fct.methods.l2_bct import L2BCT, L2Compatibility, l2_compat_loss
from fct.methods.ract import RACT, RACTRegularizer, ract_loss
from fct.scenarios import load_suite

OPTS = {"distance": "l2", "backend": "torch", "device": "cpu"}
NEW_METHODS = ("fastfill", "fastfill_side", "ract", "l2_bct")


# --- backfilling curves ---------------------------------------------------------------------


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


# --- FastFill -------------------------------------------------------------------------------


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


# --- RACT and L2-BCT --------------------------------------------------------------------------


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


# --- end to end on `tiny` -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_new(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-more")
    out, cache = base / "results", base / "cache"
    methods = ",".join(("fct", *NEW_METHODS))
    argv = ["run", "tiny", "--out", str(out), "--cache", str(cache), "--device", "cpu"]
    assert main([*argv, "--methods", methods]) == 0
    recs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))}
    return out, cache, recs


def test_every_new_method_writes_curves_and_auc(tiny_new) -> None:
    out, _, recs = tiny_new
    assert set(recs) == {"fct", *NEW_METHODS}
    for name, r in recs.items():
        # FastFill (sigma) and RACT (old-classifier entropy) have their own order
        own = name.startswith("fastfill") or name == "ract"
        orders = {"random", "uncertainty"} if own else {"random"}
        assert set(r["curves"]) == orders and set(r["auc"]) == orders
        for order in orders:
            curve = r["curves"][order]
            assert len(curve) == 22
            # The ends are the cross case (nothing backfilled) and new/new (all of it).
            assert curve[0] == r["cases"]["cross"]["mAP"]
            assert curve[-1] == r["cases"]["new/new"]["mAP"]
            top1 = r["backfill_curves"]["top1"][order]
            assert top1[0] == r["cases"]["cross"]["top1"]
            assert top1[-1] == r["cases"]["new/new"]["top1"]
            assert r["auc"][order] == pytest.approx(sum(curve) / 22, abs=1e-3)
    assert (out / "plots" / "curves_half-classes.png").stat().st_size > 1000
    header = (out / "leaderboard.csv").read_text().splitlines()[0]
    assert "half-classes/auc_random" in header and "half-classes/auc_uncertainty" in header


def test_new_methods_train_their_own_models(tiny_new) -> None:
    _, _, recs = tiny_new
    # FastFill uses FCT's new model; RACT and L2-BCT train their own.
    assert recs["fastfill"]["cases"]["new/new"] == recs["fct"]["cases"]["new/new"]
    for name in ("ract", "l2_bct"):
        assert recs[name]["cases"]["new/new"] != recs["fct"]["cases"]["new/new"]
        assert recs[name]["costs"]["transform_embeddings_per_s"] is None  # old gallery kept
    assert recs["fastfill"]["costs"]["transform_embeddings_per_s"] > 0
    assert recs["fastfill_side"]["artifacts"].keys() != recs["fastfill"]["artifacts"].keys()


def test_fastfill_backfills_by_decreasing_uncertainty(tiny_new) -> None:
    _, cache, recs = tiny_new
    ctx = Context(load_suite("tiny").scenarios[0], Cache(cache), seed=0)
    dep = FastFill().fit(ctx)  # everything comes from the cache
    module = dep.transformation.module
    old_x, labels = ctx.embed(ctx.old_model(), "eval")
    with torch.no_grad():
        sigma = module.eval().sigma(old_x)
    assert torch.equal(dep.backfill_order, torch.argsort(-sigma, stable=True))
    # The recorded uncertainty curve follows that order: its second point is the gallery with
    # the most uncertain n/21 items backfilled.
    new_x, _ = ctx.embed(dep.query_model, "eval")
    with torch.no_grad():
        gallery = module.folded()(old_x, None)
    n = len(labels)
    mixed = mixed_gallery(
        new_x.numpy(), gallery.numpy(), dep.backfill_order.numpy(), backfill_counts(n)[1]
    )
    y = labels.numpy().astype(np.int64)
    point = retrieval.evaluate(
        retrieval.FeatureSet(new_x.numpy(), y), retrieval.FeatureSet(mixed, y), paired=True, **OPTS
    )
    assert recs["fastfill"]["curves"]["uncertainty"][1] == pytest.approx(point["mAP"], abs=1e-3)


def test_curves_report_plot_reads_records(tiny_new) -> None:
    out, _, _ = tiny_new
    html = (out / "index.html").read_text()
    assert "backfilling curves" in html
    assert Path(out / "plots" / "curves_half-classes.pdf").stat().st_size > 1000
