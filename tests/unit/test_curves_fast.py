"""The one-pass backfilling curves (fct.curves.fast_curve_points) against the reference path
(fct.curves.curve_points: one fct.retrieval.evaluate per point), to the last bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fct import curve_grid, retrieval
from fct.curves import (
    _Fallback,
    backfill_counts,
    backfill_curves,
    curve_orders,
    curve_points,
    fast_curve_points,
    random_order,
)
from fct.errors import FCTError

OPTS = {"distance": "l2", "backend": "torch", "device": "cpu"}
KEYS = ("mAP", "top1", "n_query", "n_skipped")


def _reference(new, updated, labels, orders, counts, opts):
    done: dict[int, dict] = {}
    return {
        name: curve_points(new, updated, labels, order, counts, opts, done)
        for name, order in orders.items()
    }


def _assert_identical(new, updated, labels, orders, opts=OPTS, counts=None, **fast_kw):
    counts = backfill_counts(len(labels)) if counts is None else counts
    fast = fast_curve_points(new, updated, labels, orders, counts, opts, **fast_kw)
    ref = _reference(new, updated, labels, orders, counts, opts)
    assert set(fast) == set(orders)
    for name in orders:
        assert len(fast[name]) == len(counts)
        for k, (a, b) in enumerate(zip(fast[name], ref[name], strict=True)):
            for key in KEYS:
                # Exactly equal: == on floats, no tolerance.
                assert a[key] == b[key], (name, k, key, a[key], b[key])
    return fast


def _clustered(n, d, classes, seed, noise=1.0, drift=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 2
    new = (centres[labels] + noise * rng.normal(size=(n, d))).astype(np.float32)
    updated = (new + drift * rng.normal(size=(n, d))).astype(np.float32)
    return new, updated, labels.astype(np.int64)


def _orders(n, seed=0):
    return {"random": random_order(n, seed), "reversed": np.arange(n)[::-1].copy()}


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_features_give_identical_points(distance, seed) -> None:
    new, updated, labels = _clustered(333, 8, 7, seed)
    _assert_identical(new, updated, labels, _orders(len(labels)), {**OPTS, "distance": distance})


def test_an_incompatible_gallery_gives_identical_points() -> None:
    """The updated gallery unrelated to the queries (independent models): most first-ranked
    items lie deep in the sorted rows."""
    new, _, labels = _clustered(300, 8, 5, 2)
    updated = np.random.default_rng(9).normal(size=new.shape).astype(np.float32) * 5 + 20
    _assert_identical(new, updated, labels, _orders(len(labels)))


def test_tie_heavy_features_give_identical_points() -> None:
    """Few distinct distances: ties among positives, between positives and negatives, and
    exact duplicate vectors within and across the two galleries."""
    rng = np.random.default_rng(3)
    n = 260
    labels = rng.integers(0, 4, n).astype(np.int64)
    new = rng.integers(0, 3, (n, 3)).astype(np.float32)
    updated = rng.integers(0, 3, (n, 3)).astype(np.float32)
    updated[: n // 3] = new[: n // 3]  # re-encoded items equal to the new ones
    for distance in ("l2", "cosine"):
        _assert_identical(new, updated, labels, _orders(n), {**OPTS, "distance": distance})


@pytest.mark.parametrize("drop", [0.0, 100.0])
def test_identical_whether_far_items_are_dropped_or_sorted(monkeypatch, drop) -> None:
    """Dropping the items beyond each row's farthest positive (partition) or sorting them all
    gives the same points: on well separated classes, on overlapping ones, and with ties."""
    monkeypatch.setattr(curve_grid, "DROP_MAX_FRACTION", drop)
    separated = _clustered(240, 8, 6, 12, noise=0.3, drift=0.2)
    overlapping = _clustered(240, 8, 6, 13, noise=3.0, drift=2.0)
    rng = np.random.default_rng(14)
    ties = (
        rng.integers(0, 3, (240, 3)).astype(np.float32),
        rng.integers(0, 3, (240, 3)).astype(np.float32),
        rng.integers(0, 4, 240).astype(np.int64),
    )
    for new, updated, labels in (separated, overlapping, ties):
        _assert_identical(new, updated, labels, _orders(240))


def test_identical_across_blocks_sub_blocks_and_threads() -> None:
    """Several query blocks with different class sizes (so different padded widths), split
    into sub-blocks scored by two threads."""
    rng = np.random.default_rng(4)
    n = 400
    labels = np.repeat(np.arange(6), [150, 90, 70, 50, 30, 10])[rng.permutation(n)]
    new, updated, _ = _clustered(n, 6, 6, 4)
    opts = {**OPTS, "block_bytes": 16 * n * 60}  # about 60 queries per block
    _assert_identical(new, updated, labels, _orders(n), opts, sub_block_bytes=200_000, workers=2)


def test_skipped_queries_and_fewer_items_than_steps() -> None:
    """Singleton classes (their queries are skipped at every point), and 15 items for 22
    points (repeated counts)."""
    new, updated, labels = _clustered(15, 4, 3, 5)
    labels[:3] = [10, 11, 12]
    fast = _assert_identical(new, updated, labels, _orders(15))
    assert fast["random"][0]["n_skipped"] == 3


def test_custom_counts_any_sorted_list() -> None:
    new, updated, labels = _clustered(120, 5, 4, 6)
    _assert_identical(new, updated, labels, _orders(120), counts=[0, 0, 7, 60, 60, 119, 120])


def test_unsorted_counts_and_non_finite_distances_fall_back() -> None:
    new, updated, labels = _clustered(60, 4, 3, 7)
    with pytest.raises(_Fallback):
        fast_curve_points(new, updated, labels, _orders(60), [0, 30, 10, 60], OPTS)
    big = new.copy()
    big[0] = 3e19  # its squared norm overflows float32: an infinite distance
    with pytest.raises(_Fallback):
        fast_curve_points(big, updated, labels, _orders(60), backfill_counts(60), OPTS)
    # backfill_curves then evaluates each point instead.
    rec = backfill_curves(
        curve_orders(60, 0),
        torch.from_numpy(big),
        torch.from_numpy(updated),
        torch.from_numpy(labels),
        OPTS,
    )
    ref = _reference(
        big, updated, labels, {"random": random_order(60, 0)}, backfill_counts(60), OPTS
    )
    assert rec["curves"]["random"] == [round(p["mAP"], 4) for p in ref["random"]]


def test_no_scorable_query_is_refused_as_evaluate_does() -> None:
    new, updated, _ = _clustered(10, 4, 3, 8)
    with pytest.raises(FCTError, match="no query has a same-class item"):
        fast_curve_points(new, updated, np.arange(10), _orders(10), backfill_counts(10), OPTS)


def test_backfill_curves_records_the_fast_points() -> None:
    new, updated, labels = _clustered(250, 6, 5, 9)
    order = np.argsort(np.linalg.norm(new - updated, axis=1))[::-1].copy()
    rec = backfill_curves(
        curve_orders(250, 3, ("worst", torch.from_numpy(order))),
        torch.from_numpy(new),
        torch.from_numpy(updated),
        torch.from_numpy(labels),
        OPTS,
    )
    orders = {"random": random_order(250, 3), "worst": order}
    ref = _reference(new, updated, labels, orders, backfill_counts(250), OPTS)
    for name in orders:
        assert rec["curves"][name] == [round(p["mAP"], 4) for p in ref[name]]
        assert rec["backfill_curves"]["top1"][name] == [round(p["top1"], 4) for p in ref[name]]


def test_faiss_backend_agrees_to_float_rounding() -> None:
    pytest.importorskip("faiss")
    new, updated, labels = _clustered(300, 8, 6, 10)
    opts = {**OPTS, "backend": "faiss"}
    orders = {"random": random_order(300, 0)}
    fast = fast_curve_points(new, updated, labels, orders, backfill_counts(300), opts)
    ref = _reference(new, updated, labels, orders, backfill_counts(300), opts)
    for a, b in zip(fast["random"], ref["random"], strict=True):
        assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-3)
        assert a["top1"] == pytest.approx(b["top1"], abs=1e-3)


def test_one_pass_is_much_cheaper_than_a_point_per_evaluation(monkeypatch) -> None:
    """22 points of two orders in one pass: the distances it computes are far fewer than the
    reference's 43 evaluations need (work counted, not timed: timings are bench/'s job)."""
    n = 800
    new, updated, labels = _clustered(n, 32, 10, 11)
    orders = _orders(n)
    counts = backfill_counts(n)
    pairs = [0]
    real = retrieval.distance_blocks

    def counted(query, gallery, *args, **kwargs):
        for s, block in real(query, gallery, *args, **kwargs):
            pairs[0] += block.shape[0] * block.shape[1]
            yield s, block

    monkeypatch.setattr(retrieval, "distance_blocks", counted)
    fast_curve_points(new, updated, labels, orders, counts, OPTS)
    fast_pairs, pairs[0] = pairs[0], 0
    _reference(new, updated, labels, orders, counts, OPTS)
    ref_pairs = pairs[0]
    # One pass scores every query against the new and the updated gallery once (2 x n x n);
    # the reference scores n x n per point (43 distinct points here).
    assert fast_pairs <= 2 * n * n, fast_pairs
    assert ref_pairs >= 40 * n * n, ref_pairs


def test_buckets_are_the_first_point_an_item_is_backfilled() -> None:
    order = np.array([3, 0, 2, 1])
    b = curve_grid._buckets(order, np.array([0, 1, 3, 4]))
    # positions: item 3 -> 0, item 0 -> 1, item 2 -> 2, item 1 -> 3
    assert b.tolist() == [2, 3, 2, 1]


@pytest.mark.parametrize("drop", [0.0, 100.0])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_a_query_set_apart_gives_identical_points(monkeypatch, drop, distance) -> None:
    """Queries apart from the gallery (nothing excluded by index; a query class the gallery
    lacks is skipped), whether far items are dropped or sorted, in several query blocks."""
    monkeypatch.setattr(curve_grid, "DROP_MAX_FRACTION", drop)
    new, updated, labels = _clustered(200, 6, 5, 21)
    query, _, q_labels = _clustered(90, 6, 6, 22)  # class 5: not in the gallery
    sets = {"query": query, "query_labels": q_labels}
    opts = {**OPTS, "distance": distance, "block_bytes": 16 * 200 * 40}  # ~40 queries a block
    counts = backfill_counts(200)
    orders = _orders(200)
    fast = fast_curve_points(new, updated, labels, orders, counts, opts, **sets)
    for name, order in orders.items():
        ref = curve_points(new, updated, labels, order, counts, opts, **sets)
        for a, b in zip(fast[name], ref, strict=True):
            for key in KEYS:
                assert a[key] == b[key], (name, key, a[key], b[key])
    assert fast["random"][0]["n_skipped"] == int((q_labels == 5).sum()) > 0
    assert fast["random"][0]["n_query"] + fast["random"][0]["n_skipped"] == 90
