"""Recall@k and MRR@10 (fct.metrics.ranking_summary) against a brute-force per-query loop, on
data full of exact ties and duplicate vectors (the tie rule: gallery index), both backends,
leave-one-out and with a separate gallery; and the hand-worked values of one small case."""

from __future__ import annotations

import numpy as np
import pytest

from fct.metrics import RANKING_METRICS
from fct.retrieval import FeatureSet, evaluate


def tie_heavy(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (n, dim)).astype(np.float32)
    x[n // 2 : n // 2 + 10] = x[:10]  # exact duplicates at other indices
    return x, rng.integers(0, classes, n)


def brute_force(q, ql, g, gl, exclude_self: bool) -> dict[str, float]:
    """Per query: the gallery ranked by (float64 distance, gallery index); Recall@k = relevant
    items in the first k / all relevant items; MRR@10 = 1/rank of the first relevant, 0 past 10."""
    d = ((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(-1)
    rec = {1: [], 10: [], 100: []}
    rr = []
    for i in range(len(q)):
        idx = np.arange(len(g))
        if exclude_self:
            idx = idx[idx != i]
        order = idx[np.lexsort((idx, d[i][idx]))]
        rel = gl[order] == ql[i]
        if not rel.any():
            continue
        for k in rec:
            rec[k].append(rel[:k].sum() / rel.sum())
        first = int(np.argmax(rel)) + 1
        rr.append(1 / first if first <= 10 else 0.0)
    out = {f"recall@{k}": 100 * float(np.mean(v)) for k, v in rec.items()}
    out["mrr@10"] = 100 * float(np.mean(rr))
    return out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_leave_one_out_matches_brute_force(backend):
    x, y = tie_heavy(300, 6, 40, seed=1)  # few relevant items per query, many ties
    got = evaluate(FeatureSet(x, y), backend=backend, ranking=RANKING_METRICS)
    want = brute_force(x, y, x, y, exclude_self=True)
    for m in RANKING_METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-9), m


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_separate_gallery_and_paired_match_brute_force(backend):
    q, ql = tie_heavy(120, 5, 15, seed=2)
    g, gl = tie_heavy(400, 5, 15, seed=3)
    got = evaluate(FeatureSet(q, ql), FeatureSet(g, gl), backend=backend, ranking=RANKING_METRICS)
    want = brute_force(q, ql, g, gl, exclude_self=False)
    for m in RANKING_METRICS:
        assert got[m] == pytest.approx(want[m], abs=1e-9), m
    g2 = g[:120] + 1  # paired: query i and gallery i are one item, excluded
    got = evaluate(
        FeatureSet(q, ql), FeatureSet(g2, ql), paired=True, backend=backend, ranking=("mrr@10",)
    )
    assert got["mrr@10"] == pytest.approx(
        brute_force(q, ql, g2, ql, exclude_self=True)["mrr@10"], abs=1e-9
    )


def test_hand_worked_case():
    # Gallery on a line; query at 0 with label 1. Distances 1, 2, 3, 4 to items labelled
    # 0, 1, 0, 1: the relevant items rank 2nd and 4th.
    q = np.array([[0.0]], dtype=np.float32)
    g = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    got = evaluate(
        FeatureSet(q, np.array([1])),
        FeatureSet(g, np.array([0, 1, 0, 1])),
        ranking=RANKING_METRICS,
    )
    assert got["recall@1"] == 0.0
    assert got["recall@10"] == 100.0 and got["recall@100"] == 100.0
    assert got["mrr@10"] == pytest.approx(50.0)
    # A tie: items 0 and 1 both at distance 1; the lower gallery index ranks first.
    g = np.array([[1.0], [-1.0]], dtype=np.float32)
    got = evaluate(
        FeatureSet(q, np.array([1])), FeatureSet(g, np.array([0, 1])), ranking=("mrr@10",)
    )
    assert got["mrr@10"] == pytest.approx(50.0)


def test_not_asked_not_computed():
    x, y = tie_heavy(50, 4, 5, seed=4)
    assert not set(RANKING_METRICS) & set(evaluate(FeatureSet(x, y)))
