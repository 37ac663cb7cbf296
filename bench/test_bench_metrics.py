"""Metric speed: 10,000 leave-one-out queries of 128-d, fct.retrieval against the
per-query scikit-learn loop the FCT reference code uses, on identical features.

Run with ``nox -s bench``; figures go to results/bench/metrics.{json,md}. The values of the
two implementations are asserted equal; the speed-up is reported, not asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from fct.io import write_json, write_text
from fct.provenance import provenance
from fct.retrieval import FeatureSet, evaluate

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"
N, DIM, CLASSES = 10_000, 128, 100


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, N)
    centers = rng.normal(size=(CLASSES, DIM))
    x = (centers[y] + 1.5 * rng.normal(size=(N, DIM))).astype(np.float32)
    return x, y


def reference_loop(x: np.ndarray, y: np.ndarray) -> dict:
    """The straightforward way: full distance matrix, then per query a stable argsort for
    CMC and scikit-learn's average_precision_score over the whole ranking, self excluded."""
    t = torch.from_numpy(x)
    d = torch.cdist(t, t).numpy()
    aps, top1, top5 = [], [], []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        rel = y[keep] == y[i]
        if not rel.any():
            continue
        row = d[i][keep]
        aps.append(average_precision_score(rel, -row))
        first = int(np.argmax(rel[np.argsort(row, kind="stable")]))
        top1.append(first < 1)
        top5.append(first < 5)
    return {
        "mAP": 100 * float(np.mean(aps)),
        "top1": 100 * float(np.mean(top1)),
        "top5": 100 * float(np.mean(top5)),
    }


def test_metrics_speed_vs_reference_loop(benchmark, features):
    x, y = features
    fs = FeatureSet(x, y)
    ours = benchmark.pedantic(lambda: evaluate(fs), rounds=5, iterations=1, warmup_rounds=1)
    t0 = time.perf_counter()
    ref = reference_loop(x, y)
    loop_s = time.perf_counter() - t0
    # Identical values (up to float32 vs float64 distance rounding on near ties).
    for key in ("mAP", "top1", "top5"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-3), key
    ours_s = benchmark.stats.stats.median
    faiss_s = min(_timed(lambda: evaluate(fs, backend="faiss")) for _ in range(3))
    result = {
        "task": f"{N} leave-one-out queries, {DIM}-d, {CLASSES} classes, top1/top5/mAP/mAP@R",
        "fct_torch_seconds": round(ours_s, 4),
        "fct_faiss_seconds": round(faiss_s, 4),
        "reference_loop_seconds": round(loop_s, 3),
        "speedup": round(loop_s / ours_s, 1),
        "values": {k: round(ours[k], 4) for k in ("top1", "top5", "mAP", "mAP@R")},
        "provenance": provenance(),
    }
    write_json(OUT / "metrics.json", result)
    write_text(
        OUT / "metrics.md",
        (
            "# Metric speed\n\n"
            f"{result['task']}, on {result['provenance']['device']}.\n\n"
            "| implementation | seconds | speed-up |\n|---|---:|---:|\n"
            f"| per-query scikit-learn loop (reference code's way) | {loop_s:.2f} | 1 |\n"
            f"| fct.retrieval, torch backend (median of 5) | {ours_s:.3f} | {loop_s / ours_s:.0f}x |\n"
            f"| fct.retrieval, faiss backend (best of 3) | {faiss_s:.3f} | {loop_s / faiss_s:.0f}x |\n\n"
            f"Command: `nox -s bench -- -k metrics`. Values agree: mAP {ours['mAP']:.4f} vs {ref['mAP']:.4f}.\n"
        ),
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
