"""The one-pass backfilling curves: every point of every backfilling order from one pass over
the queries (``fast_curve_points``), equal to the last bit to evaluating each point
(fct.curves.curve_points, the reference).

Per block of queries, the distances to both galleries (the new model's and the method's
updated one) are computed once; per query row, one sort of all 2n item distances with the
query's positives' distances ("needles"); per order, the items' contributions to the needles'
counts as a small [points, needles] grid (``_Rows``); per point, the counts of the positives
active at that point. See docs/speed.md.
"""

from __future__ import annotations

import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from fct import metrics, retrieval
from fct.errors import FCTError

# Between points only the backfilled gallery items change, so one pass over blocks of queries
# computes every point of every order: per block, the distances to both galleries (the new
# model's, D_n, and the method's updated one, D_u) once; per query row, one sort of all 2n item
# distances together with the query's positives' 2R distances ("needles"); per order, the
# items' contributions to the needles' counts as a small [points, needles] grid; per point, the
# counts of the positives active at that point. See docs/speed.md.

#: Distance bits of unused needle slots: a NaN pattern, above every distance (+inf included).
_PAD_BITS = 0x7FFFFFFE
#: Distance bits of dropped items: above the padding needles too, so they count for none.
_DROP_BITS = 0x7FFFFFFF
#: Memory for the per-row working arrays of one sub-block of queries (sort keys, count grids).
SUB_BLOCK_BYTES = 64 << 20
#: Far items are dropped before sorting when the kept ones are estimated below this share of
#: a row (a partition costs about a sort's quarter).
DROP_MAX_FRACTION = 0.75
#: Sorted entries first searched for the first-ranked item (top-1), then 4x as many at a time.
TOP1_PREFIX = 64


class _Fallback(Exception):
    """The fast path cannot reproduce the reference here (non-finite distances, unsorted counts)."""


def _block_rows(n_query: int, n_gallery: int, block_bytes: int) -> int:
    """The query block size fct.retrieval.evaluate uses for this size (its per-block ``r_max``,
    the padded width of the AP terms, decides their float summation, so it is mirrored)."""
    workers = max(1, min(4, torch.get_num_threads()))
    return int(max(1, min(n_query, 512, block_bytes // (16 * n_gallery * workers))))


def _buckets(order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per gallery item (original index): the first point at which it is backfilled, i.e. the
    number of points whose count does not exceed its position in the order (len(counts):
    never)."""
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return np.searchsorted(counts, position, side="right").astype(np.int16)


@functools.lru_cache(maxsize=8)
def _signed_weights(nb: int) -> np.ndarray:
    """By entry tag (items 2 g + track, then nb for the rest): +1 for an item of the new
    gallery, -1 for one of the updated gallery, 0 otherwise."""
    signed = np.zeros(nb + 1, dtype=np.float32)
    signed[1:nb:2], signed[0:nb:2] = 1.0, -1.0
    return signed


@functools.lru_cache(maxsize=8)
def _arange1(r: int) -> np.ndarray:
    """1.0 .. r as float64: the positives at or before each of r ascending distinct values."""
    return np.arange(1, r + 1, dtype=np.float64)


class _Rows:
    """The order-independent part of a sub-block of query rows: per row, every item's distance
    in both galleries and the 2R needles (the positives' distances in both), sorted once."""

    def __init__(
        self,
        d_n: np.ndarray,
        d_u: np.ndarray,
        self_col: np.ndarray,
        query_labels: np.ndarray,
        perm: np.ndarray,
        start: np.ndarray,
        count: np.ndarray,
        r_max: int,
        n_points: int,
    ) -> None:
        b, n = d_n.shape
        t_max = 2 * r_max
        t1, p1 = t_max + 1, n_points + 1
        self.b, self.r_max, self.t_max, self.n_points = b, r_max, t_max, n_points
        has_self = self_col >= 0  # -1: a query apart from the gallery excludes nothing
        self.n_pos = count - has_self
        self.query_labels = query_labels
        rows = np.arange(b)
        offs = np.arange(r_max)
        offs2 = np.arange(t_max)[None, :]
        in_block = offs[None, :] < count[:, None]
        cols = np.where(in_block, start[:, None] + offs[None, :], 0)
        usable = in_block & (cols != self_col[:, None])
        nb = 2 * n  # needle tags start here
        self.nb = nb
        # Sort keys: the float32 distance's bits above a 32-bit tag. Items: 2 g + track (g the
        # original gallery index, track 1 = new, 0 = updated), so equal distances sort by g,
        # the stable ranking's tie order. Needles: nb + 2 slot + track (slot: the positive's
        # place in its class block), after equal items. The needles of unused slots carry
        # _PAD_BITS, so every row has exactly t_max needles, the real ones first.
        keys = np.empty((b, nb + t_max), dtype=np.int64)
        slot2 = nb + 2 * np.arange(r_max, dtype=np.int64)
        parts = (
            (d_n, 2 * perm + 1, slice(0, n)),
            (d_u, 2 * perm, slice(n, nb)),
            (np.take_along_axis(d_n, cols, axis=1), slot2 + 1, slice(nb, nb + r_max)),
            (np.take_along_axis(d_u, cols, axis=1), slot2, slice(nb + r_max, None)),
        )
        for d, tags, at in parts:
            if sys.byteorder == "little":  # write both halves in place: bits high, tag low
                halves = keys[:, at].view(np.int32)
                np.maximum(d.view(np.int32), 0, out=halves[:, 1::2])  # -0.0 (sign bit) -> 0
                halves[:, 0::2] = tags
            else:
                k = keys[:, at]
                np.maximum(d.view(np.int32), 0, out=k, casting="unsafe")
                k <<= 32
                k |= tags
        both = np.concatenate([usable, usable], axis=1)
        # Only items no farther than the row's farthest positive (in either gallery) can count
        # for a positive, and the first-ranked item is never farther. Where those are few (a
        # sample of every 8th column says so), the rest are dropped (distance bits
        # _DROP_BITS: after every needle, counting for none) and a linear-time partition
        # brings the kept entries to the front, so only they are sorted.
        farthest = np.where(both, keys[:, nb:], 0).max(axis=1, initial=0) | 0xFFFFFFFF
        items = keys[:, :nb]
        keys[:, nb:] = np.where(
            both, keys[:, nb:], (_PAD_BITS << 32) | np.concatenate([slot2 + 1, slot2])
        )
        sampled = np.count_nonzero(items[:, ::8] <= farthest[:, None], axis=1).max(initial=0)
        if 8 * (sampled + 3 * np.sqrt(sampled + 1) + 1) + t_max < DROP_MAX_FRACTION * keys.shape[1]:
            far = items > farthest[:, None]
            far[rows[has_self], self_col[has_self]] = True
            far[rows[has_self], n + self_col[has_self]] = True
            np.bitwise_or(items, _DROP_BITS << 32, out=items, where=far)
            width = nb - int(np.count_nonzero(far, axis=1).min(initial=nb)) + t_max
            keys.partition(width - 1, axis=1)
            keys = np.ascontiguousarray(keys[:, :width])
        else:  # sorting the far items costs less than dropping them; the query's own: dropped
            keys[rows[has_self], self_col[has_self]] |= _DROP_BITS << 32
            keys[rows[has_self], n + self_col[has_self]] |= _DROP_BITS << 32
        keys.sort(axis=1)
        # Items keep their tag (kept or dropped); needles get nb.
        low = keys.view(np.uint32)[:, 0::2] if sys.byteorder == "little" else keys & 0xFFFFFFFF
        tag = np.empty(low.shape, dtype=np.intp)
        np.minimum(low, nb, out=tag)
        self.tag = tag
        is_needle = tag == nb
        # Needles ascending per row (their keys: distance and slot/track).
        flat_needle = is_needle.reshape(-1)
        nkeys = np.compress(flat_needle, keys.reshape(-1)).reshape(b, t_max)
        ntag = (nkeys & 0xFFFFFFFF) - nb
        self.needle_u = (ntag & 1) == 0
        real = (nkeys >> 32) != _PAD_BITS
        g = perm[np.minimum(start[:, None] + (ntag >> 1), n - 1)]
        self.needle_g = np.where(real, g, -1)  # padding: see _needle_buckets
        # Runs of needles at equal distances (float32 collisions are not rare): only there can
        # active needles tie (see points). Their members, grouped by run.
        bits = nkeys >> 32
        eq = (bits[:, 1:] == bits[:, :-1]) & real[:, 1:]  # needle t + 1 equals needle t
        member = np.zeros((b, t_max), dtype=bool)
        member[:, 1:] |= eq
        member[:, :-1] |= eq
        self.tie_row, self.tie_t = np.nonzero(member)
        run_start = ~eq[self.tie_row, np.maximum(self.tie_t - 1, 0)] | (self.tie_t == 0)
        self.tie_runs = np.flatnonzero(run_start)  # index of each run's first member
        # Per entry, the needles before it: an item counts for those at or after that index.
        before = torch.from_numpy(is_needle).to(torch.float32).cumsum_(1).numpy()
        self.index = np.empty(before.shape, dtype=np.int64)  # + the row's grid offset
        np.add(
            before, (rows * (p1 * t1)).astype(np.float64)[:, None], out=self.index, casting="unsafe"
        )
        self.weight = torch.from_numpy(_signed_weights(nb)[tag].reshape(-1))
        # Per needle, the updated-gallery items before it: its count at point 0, when they all
        # count. Items before needle t: its position - t; new minus updated ones: the running
        # sum of the weights. Padding needles get +inf, so their AP terms are 0.
        signed_before = torch.cumsum(self.weight.view(b, -1), dim=1).numpy().reshape(-1)
        at = np.flatnonzero(flat_needle)
        pos = (at.reshape(b, t_max) - (rows * keys.shape[1])[:, None]).astype(np.float32)
        s_at = np.take(signed_before, at).reshape(b, t_max)
        base = (pos - offs2 - s_at) * 0.5
        self.base = np.where(offs2 < 2 * self.n_pos[:, None], base, np.float32(np.inf))

    def points(self, bucket: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AP [points, b] (float64, NaN where a row is skipped) and top-1 [points, b] (bool)
        of the rows along one order (``bucket``: per original index, the item's first
        backfilled point)."""
        b, r_max, t_max, nb, P = self.b, self.r_max, self.t_max, self.nb, self.n_points
        t1 = t_max + 1
        # Count changes: an item of the new gallery starts counting at its bucket; one of the
        # updated gallery stops there. Grid [row, point, first needle index counting it];
        # bucket P (never backfilled) is dropped.
        table = np.zeros(nb + 1, dtype=np.int64)
        table[:nb] = np.repeat(bucket.astype(np.int64) * t1, 2)
        idx = np.take(table, self.tag)
        idx += self.index
        grid = torch.zeros(b * (P + 1) * t1, dtype=torch.float32)
        grid.index_add_(0, torch.from_numpy(idx.reshape(-1)), self.weight)
        grid = grid.view(b, P + 1, t1)[:, :P]
        # Counts per needle and point (exact integers below 2**24): over needles, then points,
        # plus the first point's.
        le_t = torch.cumsum(grid, dim=2)
        le_t[:, 0, :t_max] += torch.from_numpy(self.base)
        for k in range(1, P):
            le_t[:, k] += le_t[:, k - 1]
        le = le_t.numpy()
        # Active needles: a positive's new-gallery distance from its bucket on, its updated
        # one before; padding: the new track always, so every row has exactly r_max active
        # needles, its real ones first and ascending (the order of the reference's terms).
        nbk = self._needle_buckets(bucket)
        act = np.empty((b, P, t1), dtype=bool)
        ks = np.arange(P, dtype=np.int16)[None, :, None]  # int16 like the buckets: fast
        np.greater_equal(ks, nbk[:, None, :], out=act[:, :, :t_max])
        act[:, :, :t_max] ^= self.needle_u[:, None, :]
        act[:, :, t_max] = False
        le_act = np.compress(act.reshape(-1), le.reshape(-1)).reshape(b * P, r_max)
        # AP terms: positives <= / items <= (the reference's pos_le / le, as float64). Among
        # active needles the count grows strictly with the distance (each counts its own
        # item), so equal counts are tied distances: there the positives <= end at the run.
        terms = np.divide(_arange1(r_max), le_act, dtype=np.float64)
        tied = self._tied(act)
        if len(tied):
            pos_le = metrics._tie_runs(le_act[tied])[1]
            terms[tied] = pos_le / le_act[tied].astype(np.float64)
        ap = metrics.ap_from_terms(
            torch.from_numpy(terms), torch.from_numpy(np.repeat(self.n_pos, P))
        )
        ap = ap.numpy().reshape(b, P)
        ap[self.n_pos <= 0] = np.nan
        return ap.T, self._top1(bucket, labels).T

    def _top1(self, bucket: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[b, points]: whether the first active item in (distance, original index) order is
        of the query's class. At point k that is the earlier of the first updated-gallery item
        with bucket > k (running maximum of their buckets along the sorted entries) and the
        first new-gallery item with bucket <= k (running minimum). Searched in growing
        chunks: usually among the first few entries, but when one gallery is far from the
        queries (an incompatible update) its first item may lie deep in the row."""
        b, P, nb = self.b, self.n_points, self.nb
        width = self.tag.shape[1]
        top1 = np.zeros((b, P), dtype=bool)
        todo = np.ones((b, P), dtype=bool)
        rows = np.arange(b)
        ks = torch.arange(P, dtype=torch.int32)
        lo, size = 0, TOP1_PREFIX
        while len(rows) and lo < width:
            hi = min(width, lo + size)
            head = self.tag[rows, lo:hi]
            item = head < nb
            g = np.minimum(head, nb - 1) >> 1
            s = bucket[g].astype(np.int32)
            new = item & (head & 1 == 1)
            upd = np.maximum.accumulate(np.where(item & ~new, s, -1), axis=1)
            new_min = np.minimum.accumulate(np.where(new, s, P + 1), axis=1)
            k_rows = ks.expand(len(rows), P).contiguous()
            first_u = torch.searchsorted(torch.from_numpy(upd), k_rows, right=True).numpy()
            first_n = torch.searchsorted(torch.from_numpy(-new_min), -k_rows).numpy()
            first = np.minimum(first_u, first_n)  # hi - lo: not in this chunk
            found = (first < hi - lo) & todo[rows]
            g_first = np.take_along_axis(g, np.minimum(first, hi - lo - 1), axis=1)
            hit = labels[g_first] == self.query_labels[rows, None]
            top1[rows] |= found & hit
            todo[rows] &= ~found
            rows = rows[todo[rows].any(axis=1)]
            lo, size = hi, 4 * size
        return top1

    def _tied(self, act: np.ndarray) -> np.ndarray:
        """Rows of the [b * points, r_max] AP layout where two active needles tie."""
        if not len(self.tie_runs):
            return np.empty(0, dtype=np.int64)
        active = act[self.tie_row, :, self.tie_t].astype(np.int32)  # [members, points]
        per_run = np.add.reduceat(active, self.tie_runs, axis=0)  # [runs, points]
        run, k = np.nonzero(per_run >= 2)
        return np.unique(self.tie_row[self.tie_runs[run]] * self.n_points + k)

    def _needle_buckets(self, bucket: np.ndarray) -> np.ndarray:
        """Per needle, the point from which its new track is active; padding: -1 (the new
        track always, the updated one never)."""
        return np.where(self.needle_g >= 0, bucket[self.needle_g], np.int16(-1))


def fast_curve_points(
    new: np.ndarray,
    updated: np.ndarray,
    labels: np.ndarray,
    orders: dict[str, np.ndarray],
    counts: list[int],
    opts: dict[str, Any],
    *,
    query: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    hits: bool = False,
    sub_block_bytes: int = SUB_BLOCK_BYTES,
    workers: int | None = None,
) -> dict[str, list[dict]]:
    """The points of ``curve_points`` for every order at once, equal to its values (mAP,
    top-1, query counts, and with ``hits`` each query's top-1 hit and scored flag) to the last
    bit, at the cost of about two evaluations.

    ``new``, ``updated``, ``labels``: the gallery (the new model's and the method's updated
    embeddings, and the classes). Without ``query`` the queries are ``new`` itself, each
    query's own gallery item excluded (paired); with ``query`` (and ``query_labels``) they are
    a set apart from the gallery and nothing is excluded.

    Raises _Fallback where it cannot promise that (non-finite distances, decreasing counts).
    """
    if any(b < a for a, b in zip(counts, counts[1:])):
        raise _Fallback("counts are not sorted")
    if 4 * len(labels) >= 1 << 24 or len(counts) >= 1 << 15:  # float32 counts, int16 points
        raise _Fallback("more items or points than the one-pass path counts exactly")
    distance = opts.get("distance", "l2")
    backend = opts.get("backend", "torch")
    device = opts.get("device", "cpu")
    block_bytes = opts.get("block_bytes", retrieval.DEFAULT_BLOCK_BYTES)
    labels = np.asarray(labels, dtype=np.int64)
    paired = query is None
    if paired:
        query, query_labels = new, labels
    query_labels = np.asarray(query_labels, dtype=np.int64)
    retrieval.FeatureSet(query, query_labels, name="query")
    retrieval.FeatureSet(new, labels, name="gallery (new model)")
    retrieval.FeatureSet(updated, labels, name="gallery")
    n, m = len(labels), len(query_labels)
    n_points = len(counts)
    q = retrieval._prepare(query, distance)
    index = metrics.GalleryIndex(labels)
    g_new = (q if paired else retrieval._prepare(new, distance))[index.perm]
    g_upd = retrieval._prepare(updated, distance)[index.perm]
    # One distance computation against both galleries; exact duplicates (within or across the
    # two) are computed once and copied, as evaluate does within a gallery.
    both, expand = retrieval._unique_rows(np.concatenate([g_new, g_upd]))
    cols = np.arange(2 * n) if expand is None else expand.numpy()
    col_n, col_u = cols[:n], cols[n:]
    counts_arr = np.asarray(counts, dtype=np.int64)
    buckets = {name: _buckets(order, counts_arr) for name, order in orders.items()}
    rows_ref = _block_rows(m, n, block_bytes)
    if workers is None:
        workers = max(1, min(4, torch.get_num_threads()))
    start, count = index.blocks(query_labels)
    self_col = index.inv if paired else np.full(m, -1, dtype=np.int64)
    perm = index.perm.astype(np.int64)
    ap = {name: np.empty((n_points, m)) for name in orders}
    top1 = {name: np.empty((n_points, m), dtype=bool) for name in orders}
    identity = expand is None

    def score(a: int, z: int, blk: np.ndarray, r_max: int) -> None:
        """Every point of every order for the queries a..z (rows of ``blk``)."""
        if identity:  # the two galleries are the block's column halves
            d_n, d_u = blk[:, :n], blk[:, n:]
        else:
            d_n, d_u = blk[:, col_n], blk[:, col_u]
        rows = _Rows(
            d_n,
            d_u,
            self_col[a:z],
            query_labels[a:z],
            perm,
            start[a:z],
            count[a:z],
            r_max,
            n_points,
        )
        for name, bucket in buckets.items():
            ap[name][:, a:z], top1[name][:, a:z] = rows.points(bucket, labels)

    # Sub-blocks are scored by `workers` threads (numpy's sort, compress and arithmetic and
    # torch's kernels release the GIL); at most one sub-block per thread waits.
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fct-curves") as pool:
        pending: list = []
        for s, block in retrieval.distance_blocks(
            q, both, backend=backend, device=device, block_rows=rows_ref
        ):
            blk = block.numpy()
            if not np.isfinite(blk).all():
                raise _Fallback("non-finite distances")
            e = s + len(blk)
            r_max = max(int(count[s:e].max(initial=0)), 1)
            # Per row: the int64 sort keys and their companions, and the float32 count grids.
            per_row = 8 * (2 * n + 2 * r_max) * 4 + 4 * (n_points + 1) * (2 * r_max + 1) * 4
            step = max(1, sub_block_bytes // max(1, workers) // per_row)
            for a in range(s, e, step):
                z = min(e, a + step)
                while len(pending) > max(1, workers):
                    pending.pop(0).result()
                pending.append(pool.submit(score, a, z, blk[a - s : z - s], r_max))
        for f in pending:
            f.result()
    ok = count - (1 if paired else 0) > 0
    n_ok = int(ok.sum())
    if n_ok == 0:  # as evaluate says it
        raise FCTError(
            "no query has a same-class item in the gallery, so nothing can be scored; "
            "check that query and gallery labels use the same class ids"
        )
    out = {}
    for name in orders:
        pts = []
        for k in range(n_points):
            pts.append(
                {
                    "top1": float(100.0 * np.mean(top1[name][k][ok])),
                    "mAP": float(100.0 * np.mean(ap[name][k][ok])),
                    "n_query": n_ok,
                    "n_skipped": m - n_ok,
                }
            )
            if hits:
                pts[-1].update(hits=top1[name][k] & ok, scored=ok)
        out[name] = pts
    return out
