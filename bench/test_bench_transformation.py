"""Throughput of the transformation step h over batch sizes, against its GEMM peak and
against backfilling, at the reference (paper) sizes and the quickstart sizes.

Run with ``nox -s bench`` (or ``nox -s bench -- -k transformation``); figures go to
results/bench/throughput.{json,md,png}. Every case first asserts that the folded module
(what the runner deploys) equals eager h on the benchmark's own input; speeds are reported,
never asserted.

Batch sizes: 256 to 16384 on CPU, to 65536 on GPU. On a 2-core CPU one call of eager h at
65536 takes ~15 s, so with the GEMM references and torch.compile a 65536 case would take
minutes on its own; the curve is flat well before 16384 anyway (docs/throughput.md).
The device is CUDA when available (``FCT_BENCH_DEVICE=cpu`` forces the CPU). On CPU every case
runs with 1 thread and with torch's default (one per core), or with the comma-separated
counts in ``FCT_BENCH_THREADS``: on a machine shared with other work, one thread gives the
steadier picture of the code, all cores the machine's. GPU runs add bfloat16.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from fct.io import write_json, write_text
from fct.provenance import provenance
from fct.throughput import (
    SIZES,
    attach_backfill,
    get_sizes,
    measure_backfill,
    measure_transformation,
    merge,
    plot,
    prepare_variants,
    resolve_device,
    resolve_dtype,
    timed_call,
    to_markdown,
    torch_threads,
    transformation_inputs,
    with_backoff,
)

OUT = Path(__file__).resolve().parent.parent / "results" / "bench"
DEVICE = resolve_device(
    os.environ.get("FCT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
if DEVICE.type == "cuda":
    THREADS = [None]
elif os.environ.get("FCT_BENCH_THREADS"):
    THREADS = [int(t) for t in os.environ["FCT_BENCH_THREADS"].split(",")]
else:
    THREADS = sorted({1, torch.get_num_threads()})
BATCHES = [256, 1024, 4096, 16384] + ([65536] if DEVICE.type == "cuda" else [])
DTYPES = ["float32"] + (["bfloat16"] if DEVICE.type == "cuda" else [])
# Seconds of interleaved timed rounds per case (at least 3 rounds, whatever it takes).
BUDGET_S = 12.0
# Folded vs eager: float32 differs by summation order only; bfloat16 rounds every layer.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


@pytest.fixture(scope="module")
def state():
    """Per-module caches (prepared h variants, backfill figures) and the collected records;
    the result files are written once every case has run."""
    data = {"prepared": {}, "backfill": {}, "records": []}
    t0 = time.perf_counter()
    yield data
    if data["records"]:
        _write(data["records"], time.perf_counter() - t0)


def _write(records: list[dict], wall_seconds: float) -> None:
    order = {name: i for i, name in enumerate(SIZES)}
    records = sorted(
        records, key=lambda r: (order[r["sizes"]], r["dtype"], r["threads"], r["batch"])
    )
    result = merge(
        [
            {
                "configurations": records,
                "sizes": {name: get_sizes(name).__dict__ for name in SIZES},
                "quick": False,
                "provenance": provenance(str(DEVICE), seed=0, wall_seconds=wall_seconds),
            }
        ]
    )
    result["bench"] = {
        "batches": BATCHES,
        "threads": THREADS,
        "budget_s_per_case": BUDGET_S,
        "note": "CPU runs stop at batch 16384 (see bench/test_bench_transformation.py)",
    }
    write_json(OUT / "throughput.json", result)
    write_text(OUT / "throughput.md", to_markdown(result, command="nox -s bench"))
    plot(result, OUT / "throughput.png")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", list(SIZES))
@pytest.mark.parametrize("batch", BATCHES)
def test_transformation_throughput(benchmark, state, sizes, dtype, batch, threads):
    spec, dt = get_sizes(sizes), resolve_dtype(dtype)
    with torch_threads(threads), torch.inference_mode():
        # Inductor's CPU kernels fix their thread count when compiled: one h per count.
        key = (sizes, dtype, threads)
        if key not in state["backfill"]:
            state["backfill"][key] = measure_backfill(spec, DEVICE, dt, budget_s=BUDGET_S)
        if key not in state["prepared"]:
            state["prepared"][key] = prepare_variants(spec, DEVICE, dt, compile=True)
        prepared = state["prepared"][key]

        old, side = transformation_inputs(spec, batch, DEVICE, dt)
        expected = prepared.eager(old, side).float()
        got = prepared.folded(old, side).float()
        scale = expected.abs().max()
        assert scale > 0.1
        assert (got - expected).abs().max() <= TOLERANCE[dtype] * scale

        # pytest-benchmark's own statistics of the deployed path (device synchronised).
        rounds = max(3, min(20, 200_000 // batch))
        benchmark.pedantic(
            lambda: timed_call(lambda: prepared.folded(old, side), DEVICE),
            rounds=rounds,
            warmup_rounds=1,
            iterations=1,
        )
        record = with_backoff(
            lambda b: measure_transformation(
                spec, DEVICE, dt, b, prepared, quick=False, budget_s=BUDGET_S
            ),
            batch,
            DEVICE,
        )
    attach_backfill(record, state["backfill"][key])
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when run with --benchmark-disable
        record["pytest_benchmark_median_s"] = stats.stats.median
    benchmark.extra_info.update(
        {k: record[k] for k in ("embeddings_per_s", "fraction_of_gemm_peak", "speedup_vs_backfill")}
    )
    state["records"].append(record)
