"""Backfilling curves: cross retrieval while the gallery is progressively re-encoded.

After a model update the gallery holds the method's updated embeddings (the old ones, or
h(old) for the FCT family). Backfilling re-encodes it with the new model item by item; FastFill
(Jaeckle et al., ICLR 2023) measures a method over that whole process: the cross case is
evaluated with 0 %, 20 intermediate steps and 100 % of the gallery backfilled (22 points,
fractions k/21), and the curve's mean is reported as its AUC.

At step k the gallery holds the new model's embeddings for the first ``n_k`` items of an order
and the method's updated embeddings for the rest; queries are always the new model's, and the
query's own gallery entry is excluded (paired), as in the cross case (when the scenario names a
query set apart from the gallery, the queries are that set and nothing is excluded). So the
first point is the cross case and the last one the new/new case, exactly. Each point also has
its flip rates against old/old (NFR, PFR: fct.flips).

Orders: ``random`` for every method (seeded by the run seed only, so every method of a run
backfills the same items in the same order), plus the method's own when its Deployment has a
``backfill_order`` (FastFill: decreasing uncertainty).

Every point of every order comes from one pass over the queries (``fast_curve_points``, about
3-4 evaluations' time per curve: docs/speed.md), equal to the last bit to evaluating each point
(``curve_points``, the reference, still used where the one pass cannot promise that).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from fct import retrieval
from fct.curve_grid import _Fallback, fast_curve_points
from fct.errors import FCTError
from fct.flips import flip_rates
from fct.seeding import derive_seed

log = logging.getLogger(__name__)

#: Intervals of a curve: 21 steps give 22 points (0 %, 20 intermediate, 100 %), as FastFill.
STEPS = 21
#: The metric stored under the record's ``curves``/``auc`` keys (the report plots these).
CURVE_METRIC = "mAP"
#: Metrics kept per point; ``top1`` goes to the record's ``backfill_curves`` block.
METRICS = ("mAP", "top1")
#: Name of the order every method gets.
RANDOM = "random"


def backfill_fractions(steps: int = STEPS) -> list[float]:
    """The fractions of the gallery backfilled at each point: k / steps for k = 0..steps."""
    return [k / steps for k in range(steps + 1)]


def backfill_counts(n: int, steps: int = STEPS) -> list[int]:
    """Items backfilled at each point: round(k n / steps), in integers (0 first, n last)."""
    # Integer arithmetic: float rounding must not make a step depend on the platform.
    return [(2 * k * n + steps) // (2 * steps) for k in range(steps + 1)]


def random_order(n: int, seed: int) -> np.ndarray:
    """The random backfilling order of a run: a permutation of ``range(n)`` from ``seed``."""
    return np.random.default_rng(seed).permutation(n)


def check_order(order: Any, n: int, name: str) -> np.ndarray:
    """``order`` as an int64 array, or FCTError unless it is a permutation of ``range(n)``."""
    arr = order.detach().cpu().numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
    if arr.ndim != 1 or len(arr) != n or not np.issubdtype(arr.dtype, np.integer):
        raise FCTError(
            f"backfill order '{name}' must be a 1-d integer permutation of the {n} gallery "
            f"items, got shape {arr.shape} and dtype {arr.dtype}; fix the method's backfill_order"
        )
    arr = arr.astype(np.int64)
    if not np.array_equal(np.sort(arr), np.arange(n)):
        raise FCTError(
            f"backfill order '{name}' is not a permutation of 0..{n - 1} (repeated or missing "
            "indices); fix the method's backfill_order"
        )
    return arr


def mixed_gallery(
    new: np.ndarray, updated: np.ndarray, order: np.ndarray, count: int
) -> np.ndarray:
    """The gallery with the first ``count`` items of ``order`` re-encoded by the new model."""
    out = updated.copy()
    idx = order[:count]
    out[idx] = new[idx]
    return out


def curve_points(
    new: np.ndarray,
    updated: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    counts: list[int],
    opts: dict[str, Any],
    done: dict[int, dict] | None = None,
    *,
    query: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    hits: bool = False,
) -> list[dict]:
    """The cross-case metrics at each count of ``counts`` along ``order``.

    ``new``: new-model embeddings of the gallery (the backfilled items), ``updated``: the
    method's updated gallery, both ``[n, d]`` in the gallery's order. The queries are ``new``
    itself, each query's own gallery entry excluded (paired), or, with ``query`` and
    ``query_labels``, a set apart (nothing excluded). ``hits`` adds each query's top-1 hit and
    scored flag (``fct.retrieval.evaluate(hits=True)``). ``done`` maps a count to a result
    already computed for it, for the points that do not depend on the order (0 and n): they
    are evaluated once per deployment, not once per order.
    """
    done = {} if done is None else done
    n = len(labels)
    paired = query is None
    q = retrieval.FeatureSet(
        new if paired else query, labels if paired else query_labels, name="query"
    )
    out = []
    for count in counts:
        if count in (0, n) and count in done:
            out.append(done[count])
            continue
        gallery = retrieval.FeatureSet(
            mixed_gallery(new, updated, order, count), labels, name="gallery"
        )
        result = retrieval.evaluate(q, gallery, paired=paired, hits=hits, **opts)
        if count in (0, n):
            done[count] = result
        out.append(result)
    return out


def curves_record(
    points: dict[str, list[dict]], steps: int = STEPS, before: dict | None = None
) -> dict[str, Any]:
    """Run-record keys from the points of each order.

    ``curves``/``auc`` hold the cross mAP curve and its mean (what fct.report reads and plots);
    ``backfill_curves`` says which metric that is and holds the top-1 curves and their means,
    and, given ``before`` (the old/old evaluation with ``hits``; the points with theirs), the
    negative and positive flip rates of every point against old/old (``nfr``, ``pfr``, see
    fct.flips). Values in percent, rounded as the cases are (4 decimals); the means are of
    unrounded values.
    """

    def curve(order: str, metric: str) -> list[float]:
        return [round(float(p[metric]), 4) for p in points[order]]

    def mean(order: str, metric: str) -> float:
        return round(float(np.mean([float(p[metric]) for p in points[order]])), 4)

    block: dict[str, Any] = {
        "metric": CURVE_METRIC,
        "fractions": [round(f, 6) for f in backfill_fractions(steps)],
        "top1": {o: curve(o, "top1") for o in points},
        "auc_top1": {o: mean(o, "top1") for o in points},
    }
    if before is not None:
        flips = {
            o: [point_flips(before, p) for p in points[o]] for o in points
        }  # per order, per point: {"nfr", "pfr"}
        for key in ("nfr", "pfr"):
            block[key] = {o: [round(f[key], 4) for f in flips[o]] for o in points}
    return {
        "curves": {o: curve(o, CURVE_METRIC) for o in points},
        "auc": {o: mean(o, CURVE_METRIC) for o in points},
        "backfill_curves": block,
    }


def point_flips(before: dict, after: dict) -> dict[str, float]:
    """NFR and PFR (percent) of the evaluation ``after`` against ``before``, both made with
    ``hits`` over the same queries; a query skipped by either is left out."""
    return flip_rates(before["hits"], after["hits"], before["scored"] & after["scored"])


def curve_orders(n: int, seed: int, own: tuple[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The backfilling orders of ``n`` gallery items: ``random`` (from the run's ``seed``
    only, so every method of a run backfills the same items in the same order), and the
    method's own ``(name, order)`` when it has one (checked to be a permutation)."""
    orders = {RANDOM: random_order(n, derive_seed("curves", seed))}
    if own is not None:
        name, order = own
        if name == RANDOM:
            raise FCTError(
                f"a method's own backfill order may not be named '{RANDOM}' (every method gets "
                "that one); set another backfill_order_name"
            )
        orders[name] = check_order(order, n, name)
    return orders


def backfill_curves(
    orders: dict[str, np.ndarray],
    new_x: torch.Tensor,
    gallery: torch.Tensor,
    labels: torch.Tensor,
    opts: dict[str, Any],
    *,
    queries: tuple[torch.Tensor, torch.Tensor] | None = None,
    before: dict | None = None,
    steps: int = STEPS,
) -> dict[str, Any]:
    """Backfilling curves along ``orders`` (``curve_orders``), as run-record keys (see
    ``curves_record``).

    ``new_x``: the query model's embeddings of the gallery items; ``gallery``: the method's
    updated gallery (the cross case's); ``labels``: the gallery's classes; ``queries``: the
    query model's embeddings and labels of a query set apart from the gallery (None: the
    gallery items are the queries, each one's own item excluded); ``before``: the old/old
    evaluation made with ``hits`` over the same queries, for the points' flip rates;
    ``opts``: the cross case's evaluation options. Every point of every order comes from one
    pass over the queries (fct.curve_grid.fast_curve_points: about 4 evaluations' time for
    one order, and less per order for more), equal to the last bit to evaluating each point
    (``curve_points``, still used where the fast path cannot promise that: non-finite
    distances).
    """
    t0 = time.perf_counter()
    new = new_x.float().numpy()
    updated = gallery.float().numpy()
    y = labels.numpy().astype(np.int64)
    n = len(y)
    counts = backfill_counts(n, steps)
    sets: dict[str, Any] = {"hits": before is not None}
    if queries is not None:
        sets["query"] = queries[0].float().numpy()
        sets["query_labels"] = queries[1].numpy().astype(np.int64)
    try:
        points = fast_curve_points(new, updated, y, orders, counts, opts, **sets)
    except _Fallback as why:  # the reference path: one evaluation per point
        log.info("backfilling curves: %s, evaluating each point", why)
        done: dict[int, dict] = {}
        points = {
            name: curve_points(new, updated, y, order, counts, opts, done, **sets)
            for name, order in orders.items()
        }
    record = curves_record(points, steps, before)
    seconds = time.perf_counter() - t0
    record["backfill_curves"]["seconds"] = round(seconds, 2)
    log.info(
        "backfilling curves (%s): AUC (%s) %s in %.1f s",
        ", ".join(orders),
        CURVE_METRIC,
        ", ".join(f"{o} {v:.2f}" for o, v in record["auc"].items()),
        seconds,
    )
    return record
