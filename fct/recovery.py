"""What a run record says about how much of a full re-embedding a method recovers, and what
its update costs per query: the record's ``recovery`` key.

- ``top1``, ``mAP``: recall recovery, the cross case's metric over the new/new case's (1.0:
  the compatible search is as good as re-embedding the whole gallery with the new model; the
  measure Drift-Adapter, Vejendla, EMNLP 2025, reports as the share of recall recovered).
- ``direction``: where the method's map acts: ``gallery`` (stored old embeddings mapped into
  the new space: FCT, FastFill, gallery-side adapters), ``query`` (new queries mapped into the
  old space, the gallery never touched) or ``none`` (Independent, BCT and the others that
  train a compatible new model).
- ``fit_seconds``: the method's own fit (its adapter's or its h's training; not the shared
  old and new models).
- ``query_latency_us``: for a query-side map, the added time per query in microseconds at
  batch 1 and at batch 1024 (``{"1": ..., "1024": ...}``), measured on the CPU with the
  run's thread count: warm-up calls, then timed repeats, the median per call over the batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

LATENCY_BATCHES = (1, 1024)
#: Timed repeats of each batch: at least MIN_REPEATS and about MIN_SECONDS in all.
MIN_REPEATS = 7
MIN_SECONDS = 0.2
WARMUP = 3


def ratio(cross: float | None, new: float | None) -> float | None:
    """cross / new/new, None when new/new is not positive."""
    if cross is None or new is None or not new > 0:
        return None
    return round(cross / new, 4)


@torch.inference_mode()
def query_latency_us(fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> dict[str, float]:
    """Microseconds per query that ``fn`` adds, at each batch of LATENCY_BATCHES (CPU)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for batch in LATENCY_BATCHES:
        x = torch.randn(batch, dim, generator=gen)
        for _ in range(WARMUP):
            fn(x)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
            if len(times) >= 10_000:
                break
        out[str(batch)] = round(1e6 * statistics.median(times) / batch, 3)
    return out


def direction(dep: Any) -> str:
    """``query``, ``gallery`` or ``none``: where the deployment's map acts."""
    if dep.query_update is not None:
        return "query"
    if dep.transformation is not None or dep.gallery_update is not None:
        return "gallery"
    return "none"


def recovery(
    cases: dict[str, dict], dep: Any, own_train_seconds: float | None, query_dim: int
) -> dict[str, Any]:
    """The record's ``recovery`` key for a deployment and its evaluated cases."""
    cross, new = cases["cross"], cases["new/new"]
    fit = dep.fit_seconds if dep.fit_seconds is not None else own_train_seconds
    return {
        "top1": ratio(cross.get("top1"), new.get("top1")),
        "mAP": ratio(cross.get("mAP"), new.get("mAP")),
        "direction": direction(dep),
        "fit_seconds": None if fit is None else round(float(fit), 4),
        "query_latency_us": (
            query_latency_us(dep.query_update, query_dim) if dep.query_update else None
        ),
    }
