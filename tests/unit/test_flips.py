"""Flip rates (fct.flips) and the per-query hits they are made from
(fct.retrieval.evaluate(hits=True), the curves' points) against a brute-force loop on tie-heavy
data: small-integer vectors, many exact duplicates, several classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fct.curve_grid import fast_curve_points
from fct.curves import (
    backfill_counts,
    backfill_curves,
    curve_orders,
    curve_points,
    curves_record,
    point_flips,
)
from fct.errors import FCTError
from fct.flips import flip_rates
from fct.retrieval import FeatureSet, evaluate

OPTS = {"distance": "l2", "backend": "torch", "device": "cpu"}


def tie_heavy(n: int, classes: int, seed: int, dim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of 0..2 (exact float32 distances, many exact ties) with duplicated rows."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (n, dim)).astype(np.float32)
    x[n // 2 : n // 2 + n // 6] = x[: n // 6]  # exact duplicates at other indices
    return x, rng.integers(0, classes, n).astype(np.int64)


def brute_hits(q, ql, g, gl, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per query: whether the first gallery item in (distance, gallery index) order is of its
    class, and whether it was scored (a same-class item is left in the gallery)."""
    hits, scored = np.zeros(len(q), bool), np.zeros(len(q), bool)
    for i in range(len(q)):
        best, best_j, any_pos = None, None, False
        for j in range(len(g)):
            if exclude_self and i == j:
                continue
            any_pos |= bool(gl[j] == ql[i])
            d = float(((q[i].astype(np.float64) - g[j]) ** 2).sum())
            if best is None or d < best:  # strictly closer: an equal one keeps the lower index
                best, best_j = d, j
        scored[i] = any_pos
        hits[i] = any_pos and gl[best_j] == ql[i]
    return hits, scored


def brute_flips(before, after, valid) -> dict[str, float]:
    n = nfr = pfr = 0
    for b, a, v in zip(before, after, valid, strict=True):
        if not v:
            continue
        n += 1
        nfr += bool(b and not a)
        pfr += bool(a and not b)
    return {"nfr": 100.0 * nfr / n, "pfr": 100.0 * pfr / n}


def _backends() -> list[str]:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return ["torch"]
    return ["torch", "faiss"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("mode", ["leave-one-out", "paired", "separate"])
def test_hits_match_a_brute_force_loop(mode, backend) -> None:
    old, labels = tie_heavy(150, 5, 1)
    new, _ = tie_heavy(150, 5, 2)
    labels[:2] = [7, 8]  # classes of one item: skipped in leave-one-out and paired
    opts = {**OPTS, "backend": backend}
    if mode == "leave-one-out":
        got = evaluate(FeatureSet(old, labels), hits=True, **opts)
        want = brute_hits(old, labels, old, labels, exclude_self=True)
    elif mode == "paired":
        got = evaluate(
            FeatureSet(new, labels), FeatureSet(old, labels), paired=True, hits=True, **opts
        )
        want = brute_hits(new, labels, old, labels, exclude_self=True)
    else:
        q, ql = tie_heavy(70, 6, 3)  # class 5: no gallery item, skipped
        got = evaluate(FeatureSet(q, ql), FeatureSet(old, labels), hits=True, **opts)
        want = brute_hits(q, ql, old, labels, exclude_self=False)
    assert got["hits"].dtype == bool and got["hits"].shape == (len(want[0]),)
    assert np.array_equal(got["hits"], want[0])
    assert np.array_equal(got["scored"], want[1])
    assert int(got["scored"].sum()) == got["n_query"] and got["n_skipped"] > 0
    # top-1 is the share of hits among the scored queries: one tie rule for both.
    assert got["top1"] == pytest.approx(100 * got["hits"][got["scored"]].mean(), abs=1e-12)


def test_hits_are_left_out_unless_asked() -> None:
    x, y = tie_heavy(40, 3, 4)
    assert "hits" not in evaluate(FeatureSet(x, y), **OPTS)


@pytest.mark.parametrize("backend", _backends())
def test_flip_rates_match_the_loop_and_the_top1_difference(backend) -> None:
    old, labels = tie_heavy(160, 4, 5)
    new, _ = tie_heavy(160, 4, 6)
    labels[:3] = [9, 10, 11]
    opts = {**OPTS, "backend": backend}
    before = evaluate(FeatureSet(old, labels), hits=True, **opts)
    after = evaluate(
        FeatureSet(new, labels), FeatureSet(old, labels), paired=True, hits=True, **opts
    )
    got = point_flips(before, after)
    bh, bs = brute_hits(old, labels, old, labels, exclude_self=True)
    ah, as_ = brute_hits(new, labels, old, labels, exclude_self=True)
    want = brute_flips(bh, ah, bs & as_)
    assert got == pytest.approx(want, abs=1e-12)
    assert got["nfr"] > 0 and got["pfr"] > 0
    # Over the same queries: top1(after) - top1(before) == pfr - nfr.
    assert after["top1"] - before["top1"] == pytest.approx(got["pfr"] - got["nfr"], abs=1e-9)


def test_flip_rates_by_hand_and_bad_inputs() -> None:
    before = np.array([1, 1, 0, 0, 1, 0], bool)
    after = np.array([1, 0, 1, 0, 0, 1], bool)
    assert flip_rates(before, after) == pytest.approx({"nfr": 200 / 6, "pfr": 200 / 6})
    valid = np.array([1, 1, 1, 1, 0, 0], bool)  # the last two skipped: 1 negative, 1 positive
    assert flip_rates(before, after, valid) == pytest.approx({"nfr": 25.0, "pfr": 25.0})
    with pytest.raises(FCTError, match="one hit per query"):
        flip_rates(before, after[:5])
    with pytest.raises(FCTError, match="valid mask"):
        flip_rates(before, after, valid[:3])


def _curve_case(seed: int, separate: bool):
    new, labels = tie_heavy(120, 4, seed)
    updated, _ = tie_heavy(120, 4, seed + 1)
    labels[0] = 9  # a gallery class of one item
    if not separate:
        return new, updated, labels, {}
    q, ql = tie_heavy(50, 5, seed + 2)  # class 4: not in the gallery (skipped)
    return new, updated, labels, {"query": q, "query_labels": ql}


@pytest.mark.parametrize("separate", [False, True])
def test_curve_points_hits_are_the_reference_hits(separate) -> None:
    """The one pass gives every point's per-query hits exactly as one evaluation per point."""
    new, updated, labels, sets = _curve_case(10, separate)
    orders = curve_orders(len(labels), 0, ("reverse", np.arange(len(labels))[::-1].copy()))
    counts = backfill_counts(len(labels))
    fast = fast_curve_points(new, updated, labels, orders, counts, OPTS, hits=True, **sets)
    for name, order in orders.items():
        ref = curve_points(new, updated, labels, order, counts, OPTS, hits=True, **sets)
        for f, r in zip(fast[name], ref, strict=True):
            for key in ("mAP", "top1", "n_query", "n_skipped"):
                assert f[key] == r[key], key
            assert np.array_equal(f["hits"], r["hits"]) and np.array_equal(f["scored"], r["scored"])


@pytest.mark.parametrize("separate", [False, True])
def test_curve_flip_rates_match_a_brute_force_loop(separate) -> None:
    new, updated, labels, sets = _curve_case(20, separate)
    old, _ = tie_heavy(120, 4, 99)
    if separate:
        q_old, _ = tie_heavy(50, 5, 98)
        before = evaluate(
            FeatureSet(q_old, sets["query_labels"]), FeatureSet(old, labels), hits=True, **OPTS
        )
        queries = (torch.from_numpy(sets["query"]), torch.from_numpy(sets["query_labels"]))
        bh, bs = brute_hits(q_old, sets["query_labels"], old, labels, exclude_self=False)
    else:
        before = evaluate(FeatureSet(old, labels), hits=True, **OPTS)
        queries = None
        bh, bs = brute_hits(old, labels, old, labels, exclude_self=True)
    orders = curve_orders(len(labels), 3)
    rec = backfill_curves(
        orders,
        torch.from_numpy(new),
        torch.from_numpy(updated),
        torch.from_numpy(labels),
        OPTS,
        queries=queries,
        before=before,
    )
    nfr, pfr = rec["backfill_curves"]["nfr"]["random"], rec["backfill_curves"]["pfr"]["random"]
    assert len(nfr) == len(pfr) == 22
    counts = backfill_counts(len(labels))
    q, ql = (sets["query"], sets["query_labels"]) if separate else (new, labels)
    for k in (0, 7, 21):  # the cross case, a mixed gallery, the fully backfilled one
        gallery = updated.copy()
        idx = orders["random"][: counts[k]]
        gallery[idx] = new[idx]
        ah, as_ = brute_hits(q, ql, gallery, labels, exclude_self=not separate)
        want = brute_flips(bh, ah, bs & as_)
        assert nfr[k] == pytest.approx(want["nfr"], abs=1e-4)
        assert pfr[k] == pytest.approx(want["pfr"], abs=1e-4)
        top1 = rec["backfill_curves"]["top1"]["random"][k]
        assert top1 - before["top1"] == pytest.approx(pfr[k] - nfr[k], abs=2e-4)


def test_curves_record_has_no_flips_without_old_old() -> None:
    new, updated, labels, _ = _curve_case(30, False)
    counts = backfill_counts(len(labels))
    points = fast_curve_points(new, updated, labels, curve_orders(len(labels), 0), counts, OPTS)
    block = curves_record(points)["backfill_curves"]
    assert "nfr" not in block and "pfr" not in block
