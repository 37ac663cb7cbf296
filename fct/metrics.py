"""Retrieval metrics from blocks of query-to-gallery distances.

Definitions (see docs/metrics.md):

- The ranking of a query is the gallery in ascending distance; ties are broken by gallery index
  (a stable sort), so the order never depends on the kNN backend's internals.
- CMC top-k: fraction of queries with a same-class item among the k first of that ranking.
- mAP: mean over queries of the average precision over the *entire* gallery, with tied
  distances grouped as scikit-learn's ``average_precision_score`` groups tied scores.
- mAP@R: pytorch-metric-learning's ``mean_average_precision_at_r``, R = the query's number of
  same-class gallery items.
- A query's own gallery entry (leave-one-out, or the paired item in the cross-model case) is
  excluded by index; queries with no same-class item left are skipped and counted.

The work per block is one full-row sort (numpy's SIMD sort, rows split over threads) plus binary
searches of the R positive distances into it, so no per-query Python runs.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

METRIC_KEYS = ("top1", "top5", "mAP", "mAP@R")


@dataclass
class GalleryIndex:
    """The gallery's labels reordered by class, so each class is one contiguous column block.

    ``perm[j]`` is the original gallery index of sorted column ``j``; ``inv`` maps back.
    """

    labels: np.ndarray
    perm: np.ndarray = field(init=False)
    inv: np.ndarray = field(init=False)
    start: dict[int, int] = field(init=False)
    count: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        self.perm = np.argsort(labels, kind="stable")
        self.inv = np.empty_like(self.perm)
        self.inv[self.perm] = np.arange(len(labels))
        classes, starts, counts = np.unique(
            labels[self.perm], return_index=True, return_counts=True
        )
        self.start = dict(zip(classes.tolist(), starts.tolist()))
        self.count = dict(zip(classes.tolist(), counts.tolist()))

    def blocks(self, query_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start column and size of each query's same-class block (size 0 if absent)."""
        start = np.array([self.start.get(int(c), 0) for c in query_labels], dtype=np.int64)
        count = np.array([self.count.get(int(c), 0) for c in query_labels], dtype=np.int64)
        return start, count


def _sort_rows(dist: np.ndarray, threads: int) -> np.ndarray:
    """Row-wise ascending sort; numpy releases the GIL, so threads split the rows."""
    if threads <= 1 or dist.shape[0] < 2 * threads:
        return np.sort(dist, axis=1)
    out = np.empty_like(dist)
    bounds = np.linspace(0, dist.shape[0], threads + 1).astype(int)

    def work(i: int) -> None:
        out[bounds[i] : bounds[i + 1]] = np.sort(dist[bounds[i] : bounds[i + 1]], axis=1)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return out


def _negative_ties_before(
    dist: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    pos_orig: torch.Tensor,
    gallery_orig: torch.Tensor,
    negative: torch.Tensor,
) -> torch.Tensor:
    """For (row, positive) pairs whose distance ties a negative's: count the tied negatives
    with a smaller gallery index (they rank first under the stable order). Rare outside
    synthetic data, so a direct comparison is fine."""
    out = torch.zeros(len(rows), dtype=torch.long)
    step = max(1, (1 << 24) // max(1, dist.shape[1]))
    for s in range(0, len(rows), step):
        r = rows[s : s + step]
        hit = (dist[r] == values[s : s + step, None]) & negative[r]
        hit &= gallery_orig[None, :] < pos_orig[s : s + step, None]
        out[s : s + step] = hit.sum(1)
    return out


@dataclass
class BlockResult:
    """Per-query results of one block: -1 rank / NaN AP marks a skipped query."""

    first_rank: np.ndarray  # 1-based rank of the first same-class item
    ap: np.ndarray  # average precision over the full ranking
    ap_at_r: np.ndarray  # average precision at R (pytorch-metric-learning)
    n_pos: np.ndarray  # R


def block_metrics(
    dist: torch.Tensor,
    query_labels: np.ndarray,
    self_index: np.ndarray | None,
    gallery: GalleryIndex,
    threads: int | None = None,
) -> BlockResult:
    """Metrics for a block of queries.

    ``dist`` is float32 [B, N] on the CPU with columns in ``gallery.perm`` order.
    ``self_index[i]`` is the original gallery index to exclude for query i (or -1); the
    tensor is modified in place (excluded entries set to +inf).
    """
    threads = threads or min(4, os.cpu_count() or 1)
    b, n = dist.shape
    query_labels = np.asarray(query_labels, dtype=np.int64)
    rows = torch.arange(b)
    has_self = np.zeros(b, dtype=bool)
    if self_index is not None:
        has_self = np.asarray(self_index) >= 0
        cols = torch.from_numpy(gallery.inv[np.asarray(self_index)[has_self]])
        dist[rows[torch.from_numpy(has_self)], cols] = float("inf")
    start, count = gallery.blocks(query_labels)
    n_pos = count - has_self.astype(np.int64)
    r_max = max(int(count.max(initial=0)), 1)

    # Same-class distances: a contiguous column block per query (gallery sorted by class).
    offs = torch.arange(r_max)
    col = torch.from_numpy(start)[:, None] + offs[None, :]
    in_block = offs[None, :] < torch.from_numpy(count)[:, None]
    col = torch.where(in_block, col, torch.zeros_like(col)).clamp_max(n - 1)
    pos = torch.where(
        in_block, dist.gather(1, col), torch.full_like(col, 0, dtype=dist.dtype) + float("inf")
    )
    # Stable sort keeps equal distances in column order = original gallery index order.
    pos_sorted, order = torch.sort(pos, dim=1, stable=True)
    pos_orig = torch.from_numpy(gallery.perm)[col.gather(1, order)]

    full = torch.from_numpy(_sort_rows(dist.numpy(), threads))
    le = torch.searchsorted(full, pos_sorted, right=True)  # items with d <= d_k
    lt = torch.searchsorted(full, pos_sorted, right=False)  # items with d < d_k
    pos_le = torch.searchsorted(pos_sorted, pos_sorted, right=True)
    pos_lt = torch.searchsorted(pos_sorted, pos_sorted, right=False)

    npos_t = torch.from_numpy(n_pos)
    valid = offs[None, :] < npos_t[:, None]  # the k-th positive exists (self excluded)

    # Stable-order rank (1-based) of the k-th positive: everything strictly closer, the tied
    # positives before it, and the tied negatives with a smaller gallery index.
    rank = lt + (offs[None, :] - pos_lt) + 1
    neg_ties = (le - lt) - (pos_le - pos_lt)
    need = valid & (neg_ties > 0)
    if bool(need.any()):
        r_idx, k_idx = need.nonzero(as_tuple=True)
        gl = torch.from_numpy(gallery.labels[gallery.perm])
        negative = gl[None, :] != torch.from_numpy(query_labels)[:, None]
        rank[r_idx, k_idx] += _negative_ties_before(
            dist,
            r_idx,
            pos_sorted[r_idx, k_idx],
            pos_orig[r_idx, k_idx],
            torch.from_numpy(gallery.perm),
            negative,
        )

    vf = valid.double()
    denom = npos_t.clamp_min(1).double()
    # Full-ranking AP with tie groups (scikit-learn): precision at each positive's threshold.
    ap = ((pos_le.double() / le.double()) * vf).sum(1) / denom
    # AP@R: only positives ranked within the first R count, precision = (k+1)/rank.
    within = valid & (rank <= npos_t[:, None])
    ap_r = (((offs[None, :] + 1).double() / rank.double()) * within.double()).sum(1) / denom

    skipped = n_pos <= 0
    first = rank[:, 0].numpy().copy()
    first[skipped] = -1
    ap_np, apr_np = ap.numpy().copy(), ap_r.numpy().copy()
    ap_np[skipped] = np.nan
    apr_np[skipped] = np.nan
    return BlockResult(first, ap_np, apr_np, n_pos)


def summarize(results: list[BlockResult]) -> dict[str, float | int]:
    """Reduce per-query results to the metrics (percent) and the query counts."""
    first = np.concatenate([r.first_rank for r in results])
    ap = np.concatenate([r.ap for r in results])
    apr = np.concatenate([r.ap_at_r for r in results])
    ok = first > 0
    n_ok = int(ok.sum())
    if n_ok == 0:
        return {
            "top1": float("nan"),
            "top5": float("nan"),
            "mAP": float("nan"),
            "mAP@R": float("nan"),
            "n_query": 0,
            "n_skipped": int(len(first)),
        }
    return {
        "top1": float(100.0 * np.mean(first[ok] <= 1)),
        "top5": float(100.0 * np.mean(first[ok] <= 5)),
        "mAP": float(100.0 * np.mean(ap[ok])),
        "mAP@R": float(100.0 * np.mean(apr[ok])),
        "n_query": n_ok,
        "n_skipped": int(len(first) - n_ok),
    }
