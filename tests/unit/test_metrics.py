"""Oracle tests: the fast metrics against scikit-learn, pytorch-metric-learning and a
brute-force per-query loop, on data full of ties and duplicate vectors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import return_results
from sklearn.metrics import average_precision_score

from fct import metrics, retrieval
from fct.models import onednn_linear_available
from fct.retrieval import FeatureSet, evaluate


def tie_heavy(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer features: many exact distance ties and duplicate vectors, and distances
    that float32 computes exactly, so every oracle sees the same numbers."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (n, dim)).astype(np.float32)
    x[n // 2 : n // 2 + 10] = x[:10]  # exact duplicates at other indices
    return x, rng.integers(0, classes, n)


def brute_force(q, ql, g, gl, exclude_self: bool):
    """Per-query reference loop: sklearn AP over the full ranking, stable-sorted CMC and AP@R."""
    d = ((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(-1)
    ap, top1, top5, apr = [], [], [], []
    for i in range(len(q)):
        keep = np.ones(len(g), bool)
        if exclude_self:
            keep[i] = False
        rel = (gl == ql[i])[keep]
        if not rel.any():
            continue
        ap.append(average_precision_score(rel, -d[i][keep]))
        ranked = rel[np.argsort(d[i][keep], kind="stable")]
        first = int(np.argmax(ranked))
        top1.append(first < 1)
        top5.append(first < 5)
        r = int(rel.sum())
        head = ranked[:r]
        apr.append(float((np.cumsum(head) / np.arange(1, r + 1) * head).sum() / r))
    return {
        "mAP": 100 * np.mean(ap),
        "top1": 100 * np.mean(top1),
        "top5": 100 * np.mean(top5),
        "mAP@R": 100 * np.mean(apr),
        "n_query": len(ap),
    }


def stable_knn(query, k, reference, ref_includes_query=False):
    """kNN for pytorch-metric-learning with our tie rule: ties broken by reference index."""
    if ref_includes_query:
        k = k + 1
    d = torch.cdist(query.double(), reference.double())
    idx = torch.from_numpy(np.argsort(d.numpy(), axis=1, kind="stable")[:, :k].copy())
    return return_results(torch.gather(d, 1, idx), idx, ref_includes_query)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_leave_one_out_matches_oracles(seed, backend):
    x, y = tie_heavy(240, 5, 7, seed)
    got = evaluate(FeatureSet(x, y), backend=backend)
    ref = brute_force(x, y, x, y, exclude_self=True)
    for key in ("mAP", "top1", "top5", "mAP@R"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert got["n_query"] == ref["n_query"]


def test_matches_pytorch_metric_learning():
    x, y = tie_heavy(300, 4, 9, 5)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        knn_func=stable_knn,
        device=torch.device("cpu"),
    )
    pml = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    got = evaluate(FeatureSet(x, y))
    assert got["top1"] == pytest.approx(100 * pml["precision_at_1"], abs=1e-9)
    assert got["mAP@R"] == pytest.approx(100 * pml["mean_average_precision_at_r"], abs=1e-9)


def test_separate_gallery_matches_oracle():
    q, ql = tie_heavy(120, 4, 6, 3)
    g, gl = tie_heavy(200, 4, 6, 4)
    got = evaluate(FeatureSet(q, ql), FeatureSet(g, gl))
    ref = brute_force(q, ql, g, gl, exclude_self=False)
    for key in ("mAP", "top1", "top5", "mAP@R"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key


def test_paired_excludes_each_querys_own_item():
    rng = np.random.default_rng(7)
    q = rng.normal(size=(150, 4)).astype(np.float32)
    y = rng.integers(0, 5, 150)
    g = q.copy()  # the "other model" encodes every item identically: own item at distance 0
    got = evaluate(FeatureSet(q, y), FeatureSet(g, y), paired=True)
    assert got == evaluate(FeatureSet(q, y)) | {"n_gallery": 150}
    unpaired = evaluate(FeatureSet(q, y), FeatureSet(g, y))
    assert unpaired["top1"] == 100.0  # the own item would always be first
    assert got["top1"] < 100.0


def test_leave_one_out_excludes_by_index_not_distance():
    # Two identical vectors of class 0; excluding by distance 0 would drop both.
    x = np.array([[0, 0], [0, 0], [5, 5], [5, 6]], np.float32)
    y = np.array([0, 0, 1, 1])
    got = evaluate(FeatureSet(x, y))
    assert got["top1"] == 100.0 and got["mAP"] == 100.0 and got["n_query"] == 4


def test_queries_without_positive_are_skipped_and_counted():
    x = np.array([[0, 0], [0, 1], [9, 9], [3, 3]], np.float32)
    y = np.array([0, 0, 1, 2])  # classes 1 and 2 have a single item each
    got = evaluate(FeatureSet(x, y))
    assert got["n_skipped"] == 2 and got["n_query"] == 2 and got["top1"] == 100.0


def test_ties_give_the_same_result_whatever_the_gallery_order():
    x, y = tie_heavy(200, 3, 4, 11)
    perm = np.random.default_rng(0).permutation(200)
    a = evaluate(FeatureSet(x, y))
    b = evaluate(FeatureSet(x[perm], y[perm]))
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-9)  # tie groups are order-free


def test_cosine_normalises_with_l2_norm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    y = rng.integers(0, 4, 100)
    scaled = x * rng.uniform(0.1, 10, (100, 1)).astype(np.float32)
    a = evaluate(FeatureSet(x, y), distance="cosine")
    b = evaluate(FeatureSet(scaled, y), distance="cosine")
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-6)
    cos = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert a["mAP"] == pytest.approx(evaluate(FeatureSet(cos, y))["mAP"], abs=1e-6)


def test_torch_and_faiss_agree_on_real_valued_data():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(20, 32))
    y = rng.integers(0, 20, 2000)
    x = (c[y] + rng.normal(size=(2000, 32))).astype(np.float32)
    x[1000:1050] = x[:50]
    a = evaluate(FeatureSet(x, y), backend="torch")
    b = evaluate(FeatureSet(x, y), backend="faiss")
    for key in ("top1", "top5", "mAP", "mAP@R"):
        assert abs(a[key] - b[key]) < 1e-6 * 100, key


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("dedup", [False, True])
def test_small_blocks_give_identical_results(backend, dedup):
    """37 blocks through the prefetching thread and the ring of reused buffers, with and
    without duplicate gallery rows, equal one block."""
    x, y = tie_heavy(257, 4, 6, 9)
    if not dedup:
        x = x + np.arange(len(x), dtype=np.float32)[:, None] * 1e-3  # every row distinct
    a = evaluate(FeatureSet(x, y), backend=backend)
    b = evaluate(FeatureSet(x, y), backend=backend, block_bytes=16 * 257 * 7)  # 7 per block
    assert a == b


def test_an_error_while_computing_distances_reaches_the_caller(monkeypatch):
    import fct.retrieval as retrieval

    def broken(*args, **kwargs):
        yield 0, torch.zeros((7, 257))
        raise RuntimeError("GEMM failed")

    monkeypatch.setattr(retrieval, "distance_blocks", broken)
    x, y = tie_heavy(257, 4, 6, 9)
    with pytest.raises(RuntimeError, match="GEMM failed"):
        evaluate(FeatureSet(x, y), block_bytes=16 * 257 * 7)


def clustered(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tie-heavy classes along a line, each overlapping its neighbours: a query's farthest
    same-class item is mostly nearer than most of the gallery, so the metrics mostly take the
    partial-sort path (partition, then sort the prefix), with exact ties between classes and
    duplicates."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = np.stack([2 * y + rng.integers(0, 4, n), rng.integers(0, 2, n)], 1).astype(np.float32)
    x[n // 2 : n // 2 + 10] = x[:10]
    return x, y


# The ways fct.metrics._closer_counts can rank a block: the default (sampled estimates, partial
# sorts where they pay), every row sorted whole, and every estimate too short, so that every row
# is redone from its exact count after the partition's completeness check fails.
RANKING_PATHS = {
    "default": {},
    "whole_rows": {"PARTIAL_MAX_FRACTION": 0.0},
    "estimate_short": {"PARTIAL_MAX_FRACTION": 2.0, "SAMPLE_MARGIN": -1e9},
}


def use_path(monkeypatch, path: str) -> None:
    for name, value in RANKING_PATHS[path].items():
        monkeypatch.setattr(metrics, name, value)


def test_clustered_data_takes_both_default_paths():
    x, y = clustered(400, 30, 0)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    far = np.array([d[i][(y == y[i]) & (np.arange(400) != i)].max(initial=-1) for i in range(400)])
    within = (d <= far[:, None]).sum(1)
    # Mostly short prefixes (partitioned); the duplicated rows put some items among another
    # class, so some rows reach past half the gallery (their groups are sorted whole).
    assert np.median(within) < 0.2 * 400 and (within > 0.5 * 400).sum() >= 10


@functools.cache
def oracle_cases(seed: int) -> tuple:
    """The data of test_every_ranking_path_matches_oracles and their brute-force metrics,
    computed once per seed (the same for every path and backend)."""
    loo = []
    for x, y in (clustered(400, 30, seed), tie_heavy(240, 5, 7, seed)):
        loo.append((x, y, brute_force(x, y, x, y, exclude_self=True)))
    q, ql = clustered(150, 30, seed + 10)
    g, gl = clustered(300, 30, seed + 20)
    return loo, (q, ql, g, gl, brute_force(q, ql, g, gl, exclude_self=False))


@pytest.mark.parametrize("path", sorted(RANKING_PATHS))
@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_ranking_path_matches_oracles(monkeypatch, path, backend, seed):
    use_path(monkeypatch, path)
    loo, (q, ql, g, gl, ref) = oracle_cases(seed)
    for x, y, loo_ref in loo:
        got = evaluate(FeatureSet(x, y), backend=backend, block_bytes=16 * len(x) * 64)
        for key in ("mAP", "top1", "top5", "mAP@R"):
            assert got[key] == pytest.approx(loo_ref[key], abs=1e-9), key
        assert got["n_query"] == loo_ref["n_query"]
    got = evaluate(FeatureSet(q, ql), FeatureSet(g, gl), backend=backend)
    for key in ("mAP", "top1", "top5", "mAP@R"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key


@pytest.mark.parametrize("path", sorted(RANKING_PATHS))
def test_closer_counts_are_exact(monkeypatch, path):
    """lt/le against direct counting, on rows where positives tie each other and negatives."""
    use_path(monkeypatch, path)
    rng = np.random.default_rng(3)
    b, n, r = 70, 300, 12
    dist = rng.integers(0, 40, (b, n)).astype(np.float32)
    dist[:, :5] = np.inf  # excluded own items, or distances that overflowed float32
    n_pos = rng.integers(0, r + 1, b)
    pos = np.full((b, r), np.inf, np.float32)  # padded with +inf
    for i in range(b):
        cols = rng.choice(np.arange(5, n), n_pos[i], replace=False)
        cols[: i % 3 == 0] = i % 5  # an infinite positive
        pos[i, : n_pos[i]] = dist[i, cols]
    pos.sort(axis=1)
    lo, hi = metrics._tie_runs(pos)
    for threads in (1, 3):
        lt, le = metrics._closer_counts(dist, pos, hi - lo, n_pos, threads)
        for i in range(b):
            k = n_pos[i]
            assert (lt[i, :k] == (dist[i][None, :] < pos[i, :k, None]).sum(1)).all()
            assert (le[i, :k] == (dist[i][None, :] <= pos[i, :k, None]).sum(1)).all()


def test_tie_runs_match_searchsorted():
    rows = np.sort(np.random.default_rng(0).integers(0, 5, (50, 9)).astype(np.float32), axis=1)
    rows[:, -2:] = np.inf
    lo, hi = metrics._tie_runs(rows)
    for row, lo_i, hi_i in zip(rows, lo, hi):
        assert (lo_i == np.searchsorted(row, row, "left")).all()
        assert (hi_i == np.searchsorted(row, row, "right")).all()


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_distance_blocks_are_exact_with_and_without_buffer_reuse(monkeypatch, backend):
    x, _ = tie_heavy(100, 6, 3, 4)  # small integers: float32 distances are exact
    ref = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    gemms = [False] + ([True] if onednn_linear_available() and backend == "torch" else [])
    for onednn in gemms:  # MKL's GEMM (addmm) and oneDNN's, whatever the CPU's vendor
        monkeypatch.setattr(retrieval, "_use_onednn_gemm", lambda onednn=onednn: onednn)
        for pool in (None, retrieval.BufferPool(2, 32, len(x))):
            got = []
            for _, d in retrieval.distance_blocks(x, x, backend, block_rows=32, pool=pool):
                got.append(d.clone())
                if pool is not None:
                    pool.give(d)  # two buffers for four blocks: each is reused
            assert (torch.cat(got).numpy() == ref).all()


@pytest.mark.skipif(not onednn_linear_available(), reason="torch built without oneDNN")
def test_gemm_libraries_agree_on_real_valued_data(monkeypatch):
    rng = np.random.default_rng(5)
    c = rng.normal(size=(20, 32))
    y = rng.integers(0, 20, 1500)
    x = (c[y] + rng.normal(size=(1500, 32))).astype(np.float32)
    monkeypatch.setattr(retrieval, "_use_onednn_gemm", lambda: True)
    a = evaluate(FeatureSet(x, y))
    monkeypatch.setattr(retrieval, "_use_onednn_gemm", lambda: False)
    b = evaluate(FeatureSet(x, y))
    for key in ("top1", "top5", "mAP", "mAP@R"):
        assert abs(a[key] - b[key]) < 1e-6 * 100, key


@pytest.mark.parametrize("chunk", [1 << 22, 250, 1])
def test_tied_negatives_before_each_positive_match_a_loop(monkeypatch, chunk):
    """fct.metrics._negative_ties_before (the stable order's tie-break between a positive and
    the negatives at its distance) against a plain loop, on distances with few values (-0.0
    among them, equal to 0.0), in one chunk, five (row, distance) groups per chunk (a gallery
    of 50), and one group per chunk."""
    monkeypatch.setattr(metrics, "TIE_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(5)
    b, n = 30, 50
    dist = rng.integers(0, 4, (b, n)).astype(np.float32)
    dist[rng.random((b, n)) < 0.1] = -0.0
    orig = rng.permutation(n)  # the original gallery index of each column
    labels = rng.integers(0, 3, n)
    row_labels = rng.integers(0, 3, b)
    r, c = np.nonzero(labels[None, :] == row_labels[:, None])  # every (row, positive) pair
    want = [
        sum(
            dist[i, j] == dist[i, k] and labels[j] != row_labels[i] and orig[j] < orig[k]
            for j in range(n)
        )
        for i, k in zip(r, c, strict=True)
    ]
    got = metrics._negative_ties_before(
        torch.from_numpy(dist),
        torch.from_numpy(r),
        torch.from_numpy(dist[r, c]),
        torch.from_numpy(orig[c]),
        torch.from_numpy(orig),
        torch.from_numpy(labels),
        torch.from_numpy(row_labels[r]),
    )
    assert got.tolist() == want
    assert sum(want) > len(want)  # ties with negatives everywhere, not a trivial case
