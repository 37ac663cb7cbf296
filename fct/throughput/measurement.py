"""Throughput of h (eager, folded, compiled) against the GEMM peak, and of backfilling.

``measure`` runs one (sizes, dtype) over batch sizes and returns a result (configurations and
provenance); ``merge`` joins several; fct.throughput.render writes them as Markdown or a plot.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fct.errors import FCTError
from fct.models import EmbeddingModel, Transformation, transformation_flops
from fct.provenance import provenance
from fct.throughput.gemm import gemm_backends, gemm_sequence, layer_shapes
from fct.throughput.presets import (
    DEFAULT_BATCHES,
    QUICK_BATCHES,
    VARIANTS,
    Sizes,
    dtype_name,
    get_sizes,
    resolve_device,
    resolve_dtype,
)
from fct.throughput.timing import (
    cudnn_benchmark,
    interleaved_medians,
    interleaved_times,
    is_oom,
    load_average,
    timed_call,
    torch_threads,
    with_backoff,
)

# One logger for the package: its lines read "fct.throughput: ...", as they always did.
log = logging.getLogger(__package__)


def sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits (JSON stays readable)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def build_transformation(sizes: Sizes, seed: int = 0) -> torch.nn.Module:
    """An h of ``sizes`` with non-trivial BatchNorm statistics, in eval mode, on CPU.

    Untrained weights time the same as trained ones; the BatchNorm statistics are drawn so
    that folding is a real change the correctness checks can see.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    h = Transformation(sizes.d_old, sizes.d_new, sizes.d_side, hidden=sizes.hidden)
    with torch.no_grad():
        for m in h.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    return h.eval()


def transformation_inputs(
    sizes: Sizes, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random (old, side) inputs of h; side is None without side-information."""
    gen = torch.Generator().manual_seed(seed)
    # Post-ReLU-like embeddings, as the reference backbone emits.
    old = torch.randn(batch, sizes.d_old, generator=gen).relu_().to(device, dtype)
    side = None
    if sizes.d_side:
        side = torch.randn(batch, sizes.d_side, generator=gen).relu_().to(device, dtype)
    return old, side


def _compile_failure(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"torch.compile failed: {type(err).__name__}: {first}"


def _compile(module: torch.nn.Module, device: torch.device) -> Callable:
    # On GPU "reduce-overhead" is Inductor plus CUDA graphs: launch overhead matters there.
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(module, mode=mode, fullgraph=True)


@dataclass
class Variants:
    """h in every variant for one (sizes, device, dtype), reused across batch sizes.

    ``compiled`` is None when it is not timed; ``compile_skip`` then says why.
    """

    eager: torch.nn.Module
    folded: torch.nn.Module
    compiled: Callable | None
    compile_skip: str | None


def prepare_variants(
    sizes: Sizes, device: torch.device, dtype: torch.dtype, compile: bool
) -> Variants:
    """Eager, folded and (unless ``compile`` is False) compiled h on ``device`` in ``dtype``."""
    h = build_transformation(sizes)
    folded = h.folded().to(device, dtype)
    eager = h.to(device, dtype).eval()
    compiled, skip = None, None
    if not compile:
        skip = "not compiled (compile=False; --quick on CPU, where compiling takes tens of s)"
    else:
        try:
            compiled = _compile(folded, device)
        except Exception as e:  # any compiler failure is a recorded skip
            skip = _compile_failure(e)
    return Variants(eager, folded, compiled, skip)


def measure_transformation(
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    prepared: Variants,
    quick: bool = False,
    budget_s: float = 20.0,
) -> dict:
    """h's variants and the GEMM peak at one batch size, timed interleaved (one config).

    Returns the configuration's record without the backfill fields (see ``measure``).
    """
    flops = transformation_flops(sizes.d_old, sizes.d_new, sizes.d_side, sizes.hidden)
    shapes = layer_shapes(sizes.d_old, sizes.d_new, sizes.d_side, sizes.hidden)
    assert 2 * sum(i * o for i, o in shapes) == flops, "layer_shapes disagrees with h's FLOPs"
    old, side = transformation_inputs(sizes, batch, device, dtype)

    fns: dict[str, Callable[[], Any]] = {
        "eager": lambda: prepared.eager(old, side),
        "folded": lambda: prepared.folded(old, side),
    }
    record: dict[str, Any] = {"variants": {}}
    if prepared.compiled is not None:
        try:
            # The first call compiles (or recompiles for a new batch size).
            record["compile_seconds"] = sig(
                timed_call(lambda: prepared.compiled(old, side), device)
            )
            fns["compiled"] = lambda: prepared.compiled(old, side)
        except Exception as e:  # a compiler failure: a recorded skip
            if is_oom(e):
                raise
            reason = _compile_failure(e)
            record["variants"]["compiled"] = {"skipped": reason}
            prepared.compiled, prepared.compile_skip = None, reason
    elif prepared.compile_skip:
        record["variants"]["compiled"] = {"skipped": prepared.compile_skip}

    backends = gemm_backends(device, dtype)
    for name in backends:
        fns[f"gemm:{name}"] = gemm_sequence(shapes, batch, device, dtype, name)
        fns[f"dominant:{name}"] = gemm_sequence(
            [(sizes.hidden, sizes.hidden)], batch, device, dtype, name
        )

    # Correctness travels with the number: folded against eager on this very input.
    expected, got = prepared.eager(old, side).float(), prepared.folded(old, side).float()
    rel_error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))

    budget = min(3.0, budget_s) if quick else budget_s
    warmup = 1 if quick else 3
    times, rounds = interleaved_times(
        fns, device, warmup=warmup, min_rounds=3, max_rounds=30, budget_s=budget
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    # The fastest call: what the code does when nothing else runs (on a shared machine,
    # medians include other processes' bursts). Not used for ratios: the minimum of a
    # function of many parallel regions is biased against it (each region must be lucky).
    fastest = {name: min(t) for name, t in times.items()}

    gemm = {name: flops * batch / medians[f"gemm:{name}"] for name in backends}
    best = max(gemm, key=gemm.get)
    dominant_flops = 2 * batch * sizes.hidden * sizes.hidden
    dominant = {name: dominant_flops / medians[f"dominant:{name}"] for name in backends}
    peak, dominant_peak = gemm[best], max(dominant.values())
    for name in VARIANTS:
        if name not in fns:
            continue
        flops_per_s = flops * batch / medians[name]
        record["variants"][name] = {
            "embeddings_per_s": sig(batch / medians[name]),
            "flops_per_s": sig(flops_per_s),
            "fraction_of_gemm_peak": round(flops_per_s / peak, 4),
            "fraction_of_dominant_gemm": round(flops_per_s / dominant_peak, 4),
            "fraction_of_torch_mm": round(flops_per_s / gemm["torch.mm"], 4),
            "embeddings_per_s_fastest": sig(batch / fastest[name]),
        }
    folded = record["variants"]["folded"]
    record.update(
        {
            "sizes": sizes.name,
            "d_old": sizes.d_old,
            "d_new": sizes.d_new,
            "d_side": sizes.d_side,
            "hidden": sizes.hidden,
            "h_flops_per_item": flops,
            "device": device.type,
            "dtype": dtype_name(dtype),
            "batch": batch,
            "threads": torch.get_num_threads(),
            # Other processes' load over the last minute: on a shared machine it says how
            # much the absolute numbers were squeezed.
            "load_average_1min": load_average(),
            "rounds": rounds,
            "folded_path": prepared.folded.path_for(old),
            "folded_max_rel_error": sig(rel_error, 3),
            "embeddings_per_s": folded["embeddings_per_s"],
            "flops_per_s": folded["flops_per_s"],
            "fraction_of_gemm_peak": folded["fraction_of_gemm_peak"],
            "gemm_flops_per_s": sig(peak),
            "gemm_backend": best,
            "gemm_flops_per_s_by_backend": {k: sig(v) for k, v in gemm.items()},
            "gemm_dominant_shape": [batch, sizes.hidden, sizes.hidden],
            "gemm_dominant_flops_per_s": sig(dominant_peak),
        }
    )
    if device.type == "cuda":
        record["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return record


def measure_backfill(
    sizes: Sizes,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool = False,
    batch: int | None = None,
    budget_s: float = 20.0,
) -> dict:
    """Images/s through the new model's embedding forward (the cost of backfilling).

    ``EmbeddingModel(sizes.arch, d_new, ...)`` in eval mode, in ``dtype``, channels-last
    (the fast layout for convolutions on both oneDNN and cuDNN), random images.
    """
    torch.manual_seed(0)
    model = EmbeddingModel(
        sizes.arch,
        sizes.d_new,
        sizes.num_classes,
        in_chans=sizes.in_chans,
        image_size=sizes.image_size,
        small_stem=sizes.small_stem,
    ).eval()
    model = model.to(device, dtype).to(memory_format=torch.channels_last)
    if batch is None:
        batch = sizes.backfill_batch_cuda if device.type == "cuda" else sizes.backfill_batch_cpu
        if quick:
            batch = min(batch, 8 if sizes.image_size > 64 else 256)

    def run(b: int) -> dict:
        x = torch.randn(b, sizes.in_chans, sizes.image_size, sizes.image_size)
        x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
        medians, rounds = interleaved_medians(
            {"backfill": lambda: model.embed(x)},
            device,
            warmup=1 if quick else 2,
            min_rounds=2 if quick else 3,
            max_rounds=20,
            budget_s=min(1.0, budget_s) if quick else budget_s,
        )
        return {"images_per_s": b / medians["backfill"], "batch": b, "rounds": rounds}

    with cudnn_benchmark(device):
        out = with_backoff(run, batch, device)
    return {
        "backfill_images_per_s": sig(out["images_per_s"]),
        "backfill_batch": out["batch"],
        "backfill_arch": sizes.arch,
        "backfill_image_size": sizes.image_size,
        "backfill_rounds": out["rounds"],
    }


def attach_backfill(record: dict, backfill: dict) -> dict:
    """Add the backfill figures and ``speedup_vs_backfill`` (folded h) to a record."""
    record.update(backfill)
    record["speedup_vs_backfill"] = sig(
        record["embeddings_per_s"] / backfill["backfill_images_per_s"]
    )
    return record


def measure(
    reference: str | Sizes = "reference",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    batches: Sequence[int] | None = None,
    quick: bool = False,
    *,
    compile: bool | None = None,
    budget_s: float = 20.0,
    threads: int | None = None,
) -> dict:
    """Throughput of h (every variant) against its GEMM peak and against backfilling.

    Args:
        reference: ``"reference"`` (paper sizes: h 128/128/128, hidden 2048; ResNet50 at
            224 px), ``"quickstart"`` (h 128/128/64, hidden 512; test_resnet at 28 px) or a
            ``Sizes``.
        device: ``cpu`` or ``cuda[:N]``.
        dtype: ``float32`` or ``bfloat16`` (h, the GEMMs and the backfill model).
        batches: h batch sizes (default 4096 on CPU, 4096 and 65536 on GPU; 1024 if quick).
        quick: one warm-up, ~3 s per configuration, no torch.compile on CPU: a smoke check,
            not a figure to report.
        compile: time the compiled variant (default: yes, except quick on CPU).
        budget_s: seconds of timed rounds per configuration (the rounds are at least 3).
        threads: CPU threads for torch (default: torch's, usually one per core). On a
            machine shared with other work, fewer threads than cores can be faster: an
            OpenMP region waits for its slowest thread.

    Returns ``{"configurations": [one record per batch], "provenance": {...}}``; each
    record has ``embeddings_per_s`` (folded h), ``gemm_flops_per_s``,
    ``fraction_of_gemm_peak``, ``backfill_images_per_s``, ``speedup_vs_backfill``,
    ``device``, ``dtype``, ``batch`` and the per-variant figures under ``variants``.
    """
    t0 = time.perf_counter()
    sizes, dev, dt = get_sizes(reference), resolve_device(device), resolve_dtype(dtype)
    if batches is None:
        batches = QUICK_BATCHES if quick else DEFAULT_BATCHES[dev.type]
    batches = [int(b) for b in batches]
    if not batches or any(b <= 0 for b in batches):
        raise FCTError(f"batch sizes must be positive integers, got {batches}")
    if compile is None:
        compile = not (quick and dev.type == "cpu")

    configurations = []
    with torch_threads(threads), torch.inference_mode():
        backfill = measure_backfill(sizes, dev, dt, quick=quick, budget_s=budget_s)
        prepared = prepare_variants(sizes, dev, dt, compile)
        for batch in batches:
            record = with_backoff(
                lambda b: measure_transformation(
                    sizes, dev, dt, b, prepared, quick=quick, budget_s=budget_s
                ),
                batch,
                dev,
            )
            attach_backfill(record, backfill)
            log.info(
                "%s %s %s batch %d: folded h %.0f embeddings/s, %.2f of GEMM peak; "
                "backfill %.1f images/s",
                sizes.name,
                dev.type,
                record["dtype"],
                record["batch"],
                record["embeddings_per_s"],
                record["fraction_of_gemm_peak"],
                backfill["backfill_images_per_s"],
            )
            configurations.append(record)
    return {
        "configurations": configurations,
        "sizes": {sizes.name: asdict(sizes)},
        "quick": quick,
        "provenance": provenance(str(dev), seed=0, wall_seconds=time.perf_counter() - t0),
    }


def merge(results: Sequence[dict]) -> dict:
    """One result from several ``measure`` results (configurations concatenated)."""
    if not results:
        raise FCTError("nothing to merge: no throughput results")
    merged = {
        "configurations": [c for r in results for c in r["configurations"]],
        "sizes": {k: v for r in results for k, v in r["sizes"].items()},
        "quick": any(r["quick"] for r in results),
        "provenance": dict(results[-1]["provenance"]),
    }
    merged["provenance"]["wall_seconds"] = sig(
        sum(r["provenance"].get("wall_seconds") or 0.0 for r in results)
    )
    return merged
