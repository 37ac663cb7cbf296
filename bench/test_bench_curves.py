"""Backfilling-curve cost: a whole curve (22 points) against one cross evaluation of the same
size, at the quickstart's evaluation size (10,000 items, 128-d, 10 classes of 1,000).

Two updated galleries: a compatible one (the new embedding plus noise, like FCT's h(old))
and an incompatible one (an unrelated embedding, like an independently trained model). The
evaluation and the curves are timed interleaved, best of ``REPEATS`` (the machine may be
shared), in wall and process CPU time; the curve's first point is asserted equal to the
evaluation. Figures go to results/bench/curves.{json,md}.

Run with ``nox -s bench -- -k curves`` or ``python bench/test_bench_curves.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from fct import curves, retrieval
from fct.io import write_json, write_text
from fct.provenance import provenance

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"
N, DIM, CLASSES = 10_000, 128, 10
REPEATS = 2
OPTS = {"distance": "l2", "backend": "torch", "device": "cpu"}


def galleries(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels, new-model embeddings and the two updated galleries. Tuned to the quickstart's
    figures: new/new mAP about 79 (quickstart 78), compatible cross about 76 (FCT 76)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), N // CLASSES)[rng.permutation(N)]
    centres = rng.normal(size=(CLASSES, DIM)) * 0.055
    new = (centres[labels] + 0.1 * rng.normal(size=(N, DIM))).astype(np.float32)
    compatible = (new + 0.03 * rng.normal(size=(N, DIM))).astype(np.float32)
    other = rng.normal(size=(CLASSES, DIM)) * 0.055
    incompatible = (other[labels] + 0.1 * rng.normal(size=(N, DIM))).astype(np.float32)
    return labels, new, {"compatible": compatible, "incompatible": incompatible}


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(repeats: int = REPEATS) -> dict:
    labels, new, updated = galleries()
    counts = curves.backfill_counts(N)
    one = {"random": curves.random_order(N, 0)}
    two = {**one, "reversed": np.arange(N)[::-1].copy()}
    query = retrieval.FeatureSet(new, labels)
    out = {}
    for name, gallery in updated.items():
        g = retrieval.FeatureSet(gallery, labels)
        ev, c1, c2 = [], [], []
        for _ in range(repeats):
            result, *t = _timed(lambda g=g: retrieval.evaluate(query, g, paired=True, **OPTS))
            ev.append(t)
            pts, *t = _timed(
                lambda gallery=gallery: curves.fast_curve_points(
                    new, gallery, labels, one, counts, OPTS
                )
            )
            c1.append(t)
            assert pts["random"][0]["mAP"] == result["mAP"]
            assert pts["random"][0]["top1"] == result["top1"]
            _, *t = _timed(
                lambda gallery=gallery: curves.fast_curve_points(
                    new, gallery, labels, two, counts, OPTS
                )
            )
            c2.append(t)
        e_w, e_c = min(t[0] for t in ev), min(t[1] for t in ev)
        one_w, one_c = min(t[0] for t in c1), min(t[1] for t in c1)
        two_w, two_c = min(t[0] for t in c2), min(t[1] for t in c2)
        out[name] = {
            "cross_mAP": round(result["mAP"], 4),
            "evaluation_seconds": round(e_w, 3),
            "evaluation_cpu_seconds": round(e_c, 3),
            "curve_1_order_seconds": round(one_w, 3),
            "curve_1_order_cpu_seconds": round(one_c, 3),
            "curve_2_orders_seconds": round(two_w, 3),
            "curve_2_orders_cpu_seconds": round(two_c, 3),
            "ratio_1_order": round(one_w / e_w, 2),
            "ratio_1_order_cpu": round(one_c / e_c, 2),
            "ratio_per_order_2_orders": round(two_w / 2 / e_w, 2),
            "reference_path_evaluations_per_order": len(counts),
        }
    return out


def run() -> dict:
    from fct.threads import configure_threads

    threads = configure_threads()  # as `fct run` does: one thread per core others leave free
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cases = measure()
    result = {
        "task": (
            f"backfilling curve ({len(curves.backfill_counts(N))} points) vs one paired cross "
            f"evaluation: {N} items, {DIM}-d, {CLASSES} classes, torch backend"
        ),
        "cases": cases,
        "threads": {"torch": threads.threads, "why": threads.reason},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance(),
    }
    write_json(OUT / "curves.json", result)
    lines = [
        "# Backfilling-curve cost",
        "",
        f"{result['task']}, on {result['provenance']['device']} ({threads.reason}); "
        "load average before "
        f"{result['load_average_before']}, after {result['load_average_after']}. Best of "
        f"{REPEATS}, interleaved. The reference path costs one evaluation per point (22 per "
        "order).",
        "",
        "| updated gallery | cross mAP | 1 evaluation s | curve, 1 order s | ratio | "
        "ratio (CPU s) | curve, 2 orders s | ratio per order |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in cases.items():
        lines.append(
            f"| {name} | {c['cross_mAP']:.2f} | {c['evaluation_seconds']:.2f} | "
            f"{c['curve_1_order_seconds']:.2f} | {c['ratio_1_order']:.2f}x | "
            f"{c['ratio_1_order_cpu']:.2f}x | {c['curve_2_orders_seconds']:.2f} | "
            f"{c['ratio_per_order_2_orders']:.2f}x |"
        )
    lines += [
        "",
        "Command: `nox -s bench -- -k curves` (or `python bench/test_bench_curves.py`).",
        "",
    ]
    write_text(OUT / "curves.md", "\n".join(lines))
    return result


def test_curve_cost_vs_one_evaluation() -> None:
    result = run()
    for c in result["cases"].values():
        assert c["ratio_1_order"] > 0  # reported, not asserted: the machine may be shared


if __name__ == "__main__":
    import json

    print(json.dumps(run()["cases"], indent=1))
