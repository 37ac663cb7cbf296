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

Per block, no per-query Python runs: for each query only the gallery items no farther than its
farthest same-class item can change a metric, so a linear-time partition (numpy's SIMD
``partition``) moves those to the front of a copy of the row, only they are sorted, and the R
same-class distances are binary-searched into them (see ``_closer_counts``; rows where they are
most of the gallery are sorted whole). Rows are split over threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

METRIC_KEYS = ("top1", "top5", "mAP", "mAP@R")
#: Ranking metrics a scenario may ask for (``[eval] metrics``), for data where a query has few
#: relevant items (text retrieval): see ``ranking_summary``.
RANKING_METRICS = ("recall@1", "recall@10", "recall@100", "mrr@10")
#: The cut-offs whose hit counts every block keeps (Recall@k).
RECALL_KS = (1, 10, 100)


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


# How `_closer_counts` picks each row's prefix: it estimates the row's count from every
# SAMPLE_STRIDE-th column, rows of similar estimates share one partition width (GROUP_ROWS rows
# per group), and a group whose width reaches past PARTIAL_MAX_FRACTION of the gallery sorts its
# rows whole instead (partition + prefix sort only pays when the prefix is short).
SAMPLE_STRIDE = 8
SAMPLE_MARGIN = 3.0
GROUP_ROWS = 32
PARTIAL_MAX_FRACTION = 0.5


def _tie_runs(sorted_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted ascending: per entry, the first index of its run of equal values and
    one past the last (what searchsorted left / right of each entry into its own row give)."""
    b, r = sorted_rows.shape
    k = np.broadcast_to(np.arange(r), (b, r))
    step = sorted_rows[:, 1:] != sorted_rows[:, :-1]  # a new value starts at k + 1
    starts = np.where(np.pad(step, ((0, 0), (1, 0)), constant_values=True), k, 0)
    ends = np.where(np.pad(step, ((0, 0), (0, 1)), constant_values=True), k + 1, r)
    lo = np.maximum.accumulate(starts, axis=1)
    hi = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1].copy()  # no negative strides
    return lo, hi


def _closer_counts(
    dist: np.ndarray,
    pos_sorted: np.ndarray,
    pos_run: np.ndarray,
    n_pos: np.ndarray,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Count, for each query row i and each of its positives k (the distances ``pos_sorted[i]``,
    ascending, valid for k < ``n_pos[i]``; ``pos_run`` = how many positives share that
    distance), the gallery items at a distance ``<`` and ``<=`` that positive's: ``lt`` and
    ``le``, [B, R] int64 (entries past ``n_pos`` are meaningless).

    Only the row's ``c`` items no farther than its farthest positive matter, and on a useful
    embedding they are a small part of the gallery (about a fifth in bench/test_bench_metrics).
    So instead of sorting whole rows, a linear-time partition moves each row's ``w >= c``
    closest items to the front, only those are sorted, and the positives are binary-searched
    into them. ``c`` is not counted (a full pass over the row) but estimated from a sample of
    the columns with a margin; after the partition the prefix is checked to be complete (its
    largest item is farther than the farthest positive), and the rare rows where the
    estimate fell short are redone with their exact count. Groups of rows too wide for a
    partition to pay are sorted whole. Every path gives exact counts.
    """
    b, n = dist.shape
    r_max = pos_sorted.shape[1]
    last = np.maximum(n_pos - 1, 0)
    thr = np.where(n_pos > 0, pos_sorted[np.arange(b), last], -np.inf).astype(dist.dtype)
    overflow = np.isposinf(thr)
    # Columns are sorted by class, so a strided sample draws evenly from every class; the
    # margin is SAMPLE_MARGIN standard deviations of the sampled count (binomial, at most
    # its square root).
    hits = np.count_nonzero(dist[:, ::SAMPLE_STRIDE] <= thr[:, None], axis=1)
    guess = SAMPLE_STRIDE * (hits + SAMPLE_MARGIN * np.sqrt(hits + 1) + 1)
    lt = np.empty((b, r_max), dtype=np.int64)
    le = np.empty((b, r_max), dtype=np.int64)

    def count_group(rows: np.ndarray, width: int, exact: bool) -> np.ndarray:
        """Fill lt/le for ``rows``, whose items within their farthest positive number at
        most ``width`` (``exact``) or probably so; return the rows where that failed."""
        short = np.zeros(len(rows), dtype=bool)
        sub = dist[rows]  # a copy: dist itself keeps column order for the tie counts
        if width < PARTIAL_MAX_FRACTION * n:
            sub.partition(width - 1, axis=1)  # the `width` smallest first, in any order
            cand = np.sort(sub[:, :width], axis=1)
            if not exact:
                # The prefix is complete iff the items left out (all >= its last) are
                # farther than the farthest positive.
                short = cand[:, -1] <= thr[rows]
        else:
            sub.sort(axis=1)
            cand = sub
        pos = pos_sorted[rows]
        le_g = torch.searchsorted(torch.from_numpy(cand), torch.from_numpy(pos), right=True)
        le_g = le_g.numpy()
        # The items equal to a positive end at le_g; its run of tied positives is among them.
        # Unless a negative ties too (the item before the run equals it), lt = le - run, which
        # saves a second binary search per positive. Rows whose farthest positive is +inf
        # (float32 overflow) are searched too, since the +inf padding of `pos` joins its run.
        lt_g = le_g - pos_run[rows]
        before = np.take_along_axis(cand, np.clip(lt_g - 1, 0, cand.shape[1] - 1), axis=1)
        tied = np.flatnonzero(((lt_g > 0) & (before == pos)).any(axis=1) | overflow[rows])
        if len(tied):
            lt_g[tied] = torch.searchsorted(
                torch.from_numpy(cand[tied]), torch.from_numpy(pos[tied]), right=False
            ).numpy()
        lt[rows], le[rows] = lt_g, le_g
        return rows[short]

    def count_rows(rows: np.ndarray, widths: np.ndarray, exact: bool) -> np.ndarray:
        order = np.argsort(widths, kind="stable")
        groups = [order[i : i + GROUP_ROWS] for i in range(0, len(order), GROUP_ROWS)]

        def work(g: np.ndarray) -> np.ndarray:
            return count_group(rows[g], max(1, min(n, int(widths[g].max()))), exact)

        if threads > 1 and len(groups) > 1:
            # numpy's partition/sort and torch's searchsorted release the GIL.
            with ThreadPoolExecutor(min(threads, len(groups))) as pool:
                failed = list(pool.map(work, groups))
        else:
            failed = [work(g) for g in groups]
        return np.concatenate(failed)

    retry = count_rows(np.arange(b), np.ceil(guess), exact=False)
    if len(retry):  # the estimate fell short: count these rows' items exactly
        within = np.count_nonzero(dist[retry] <= thr[retry, None], axis=1)
        count_rows(retry, within, exact=True)
    return lt, le


#: Elements of the (groups x gallery) comparison made at once in _negative_ties_before.
TIE_CHUNK_ELEMENTS = 1 << 22


def _negative_ties_before(
    dist: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    pos_orig: torch.Tensor,
    gallery_orig: torch.Tensor,
    gallery_labels: torch.Tensor,
    row_labels: torch.Tensor,
) -> torch.Tensor:
    """For (row, positive) pairs whose distance ties a negative's: count the tied negatives
    (gallery label != ``row_labels``) with a smaller gallery index (they rank first under the
    stable order).

    The pairs of one row at one distance share their tied negatives, so each such group is
    compared with its row once, and a running count of those negatives in original gallery
    order answers every positive of the group: work in (rows x distinct tied distances x
    gallery), not (pairs x gallery). A few pairs per block on real-valued data; many on
    quantised or duplicated embeddings, where the groups are few.
    """
    out = torch.zeros(len(rows), dtype=torch.long)
    if not len(rows):
        return out
    # A group per (row, distance): the distance by its float32 bits in the key's low half.
    bits = values.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    groups, inv = torch.unique(rows.long() << 32 | bits, return_inverse=True)
    g_rows = groups >> 32
    g_values = torch.empty(len(groups), dtype=torch.float32)
    g_values[inv] = values.float()
    g_labels = torch.empty(len(groups), dtype=row_labels.dtype)
    g_labels[inv] = row_labels  # one query per row: the same label for a group's pairs
    by_orig = torch.argsort(gallery_orig)  # the column of each original gallery index
    by_group = torch.argsort(inv)  # the pairs in group order: a chunk's pairs are a slice
    step = max(1, TIE_CHUNK_ELEMENTS // max(1, dist.shape[1]))
    starts = torch.arange(0, len(groups) + step, step)
    bounds = torch.searchsorted(inv[by_group], starts).tolist()
    for k, s in enumerate(starts[:-1].tolist()):
        hit = dist[g_rows[s : s + step]] == g_values[s : s + step, None]
        hit &= gallery_labels[None, :] != g_labels[s : s + step, None]
        # tied negatives with an original index <= i, for every i
        upto = hit[:, by_orig].to(torch.int32).cumsum(1, dtype=torch.int32)
        pairs = by_group[bounds[k] : bounds[k + 1]]
        # <= the positive's own index is < it: the positive is no negative
        out[pairs] = upto[inv[pairs] - s, pos_orig[pairs]].long()
    return out


def average_precision(pos_le: torch.Tensor, le: torch.Tensor, n_pos: torch.Tensor) -> torch.Tensor:
    """Full-ranking AP per query row, with tie groups as scikit-learn's: the mean over a row's
    positives (ascending distance, the first ``n_pos`` columns) of the precision at each
    positive's threshold, ``pos_le / le`` (positives / items at a distance ``<=`` its own).

    ``pos_le``, ``le``: int64 [B, R]; ``n_pos``: int64 [B]. One expression for every caller
    (block_metrics, the backfilling curves), so equal counts give bit-identical APs.
    """
    valid = torch.arange(le.shape[1])[None, :] < n_pos[:, None]
    terms = torch.where(valid, pos_le.double() / le.clamp_min(1).double(), 0.0)
    return ap_from_terms(terms, n_pos)


def ap_from_terms(terms: torch.Tensor, n_pos: torch.Tensor) -> torch.Tensor:
    """AP per row from its precision terms (float64 [B, R], 0 past the row's ``n_pos``): their
    sum, in this layout (a float sum's rounding depends on it), over ``n_pos``."""
    return terms.sum(1) / n_pos.clamp_min(1).double()


@dataclass
class BlockResult:
    """Per-query results of one block: -1 rank / NaN AP marks a skipped query."""

    first_rank: np.ndarray  # 1-based rank of the first same-class item
    ap: np.ndarray  # average precision over the full ranking
    ap_at_r: np.ndarray  # average precision at R (pytorch-metric-learning)
    n_pos: np.ndarray  # R
    #: Per query, how many of its positives rank within the first k, for k in RECALL_KS
    #: ([B, len(RECALL_KS)]; None from callers that do not count them).
    hits: np.ndarray | None = None


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
    # Default: torch's thread count, which fct.threads sets from the cores others leave free.
    threads = threads or max(1, min(4, torch.get_num_threads()))
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
    pos_sorted = torch.from_numpy(np.sort(pos.numpy(), axis=1))

    pos_lt_np, pos_le_np = _tie_runs(pos_sorted.numpy())  # positives at d < / <= d_k
    lt_np, le_np = _closer_counts(
        dist.numpy(), pos_sorted.numpy(), pos_le_np - pos_lt_np, n_pos, threads
    )
    lt, le = torch.from_numpy(lt_np), torch.from_numpy(le_np)  # items with d < / <= d_k
    pos_lt, pos_le = torch.from_numpy(pos_lt_np), torch.from_numpy(pos_le_np)

    npos_t = torch.from_numpy(n_pos)
    valid = offs[None, :] < npos_t[:, None]  # the k-th positive exists (self excluded)

    # Stable-order rank (1-based) of the k-th positive: everything strictly closer, the tied
    # positives before it, and the tied negatives with a smaller gallery index.
    rank = lt + (offs[None, :] - pos_lt) + 1
    neg_ties = (le - lt) - (pos_le - pos_lt)
    need = valid & (neg_ties > 0)
    if bool(need.any()):
        r_idx, k_idx = need.nonzero(as_tuple=True)
        # Which positive is k-th: a stable sort keeps equal distances in column order, which
        # is original gallery index order (needed only for these rows).
        tie_rows, r_pos = torch.unique(r_idx, return_inverse=True)
        order = torch.sort(pos[tie_rows], dim=1, stable=True).indices
        pos_orig = torch.from_numpy(gallery.perm)[col[tie_rows].gather(1, order)]
        rank[r_idx, k_idx] += _negative_ties_before(
            dist,
            r_idx,
            pos_sorted[r_idx, k_idx],
            pos_orig[r_pos, k_idx],
            torch.from_numpy(gallery.perm),
            torch.from_numpy(gallery.labels[gallery.perm]),
            torch.from_numpy(query_labels)[r_idx],
        )

    denom = npos_t.clamp_min(1).double()
    ap = average_precision(pos_le, le, npos_t)
    # AP@R: only positives ranked within the first R count, precision = (k+1)/rank.
    within = valid & (rank <= npos_t[:, None])
    ap_r = (((offs[None, :] + 1).double() / rank.double()) * within.double()).sum(1) / denom

    hits = recall_hits(rank, valid)
    skipped = n_pos <= 0
    first = rank[:, 0].numpy().copy()
    first[skipped] = -1
    ap_np, apr_np = ap.numpy().copy(), ap_r.numpy().copy()
    ap_np[skipped] = np.nan
    apr_np[skipped] = np.nan
    return BlockResult(first, ap_np, apr_np, n_pos, hits)


def recall_hits(rank: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Per row, the number of its positives (``valid`` entries of the stable-order ``rank``
    [B, R], 1-based) ranked within the first k, for each k of RECALL_KS: [B, len(RECALL_KS)]."""
    return np.stack([((rank <= k) & valid).sum(1).numpy() for k in RECALL_KS], axis=1).astype(
        np.int64
    )


def ranking_summary(results: list[BlockResult], asked: tuple[str, ...]) -> dict[str, float]:
    """The ranking metrics ``asked`` (of RANKING_METRICS), in percent, over the scored queries
    (those with at least one positive; the same queries as the other metrics).

    - ``recall@k``: the mean over queries of (positives in the first k) / (all the query's
      positives): BEIR's Recall@k (Thakur et al., NeurIPS 2021 Datasets and Benchmarks; the
      ``recall_k`` of trec_eval / pytrec_eval), not capped at k, so with more than k
      positives a query's recall@k is below 1 even for a perfect ranking.
    - ``mrr@10``: the mean over queries of 1 / (rank of the first positive) when that rank
      is at most 10, else 0 (MS MARCO's MRR@10, Nguyen et al. 2016).

    Ranks are those of the CMC: ascending distance, ties by gallery index (a stable sort).
    """
    first = np.concatenate([r.first_rank for r in results])
    n_pos = np.concatenate([r.n_pos for r in results])
    ok = first > 0
    out: dict[str, float] = {}
    if not ok.any():
        return {m: float("nan") for m in asked}
    for m in asked:
        if m == "mrr@10":
            rr = np.where(first[ok] <= 10, 1.0 / np.maximum(first[ok], 1), 0.0)
            out[m] = float(100.0 * rr.mean())
        else:
            k = int(m.split("@")[1])
            col = RECALL_KS.index(k)
            hits = np.concatenate([r.hits[:, col] for r in results])
            out[m] = float(100.0 * np.mean(hits[ok] / n_pos[ok]))
    return out


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
