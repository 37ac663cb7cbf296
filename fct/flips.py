"""Flip rates of a model update: which queries the update breaks and which it fixes.

A query is *right* when its nearest gallery item is of its class: CMC top-1 with the ranking's
tie rule (ascending distance, exact ties by gallery index), the ``hits`` that
``fct.retrieval.evaluate(..., hits=True)`` returns. Over the queries scored in both
evaluations (those with a same-class gallery item; skipped queries are left out of flips as
they are of top-1):

- negative flip rate, NFR: the share of queries right before and wrong after (Yan et al.,
  "Positive-Congruent Training: Towards Regression-Free Model Updates", CVPR 2021; the
  regressions RACT sets out to reduce);
- positive flip rate, PFR: the share wrong before and right after.

Both in percent. Over the same queries, ``top1(after) - top1(before) == pfr - nfr`` exactly.
"""

from __future__ import annotations

import numpy as np

from fct.errors import FCTError


def flip_rates(
    before_hits: np.ndarray, after_hits: np.ndarray, valid: np.ndarray | None = None
) -> dict[str, float]:
    """``{"nfr": x, "pfr": y}`` in percent, over the queries where ``valid`` is true (all when
    None): one bool per query in both hit arrays, in the same query order. Queries skipped by
    either evaluation must be marked invalid (``result["scored"]`` of both)."""
    before = np.asarray(before_hits, dtype=bool)
    after = np.asarray(after_hits, dtype=bool)
    if before.shape != after.shape or before.ndim != 1:
        raise FCTError(
            f"flip rates need one hit per query in both evaluations, got shapes "
            f"{before.shape} and {after.shape}; evaluate the same queries before and after"
        )
    mask = np.ones(len(before), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if mask.shape != before.shape:
        raise FCTError(
            f"flip rates: the valid mask has shape {mask.shape}, the hits {before.shape}; "
            "pass one flag per query"
        )
    n = int(mask.sum())
    if n == 0:
        return {"nfr": float("nan"), "pfr": float("nan")}
    nfr = np.count_nonzero(before & ~after & mask)
    pfr = np.count_nonzero(~before & after & mask)
    return {"nfr": 100.0 * nfr / n, "pfr": 100.0 * pfr / n}
