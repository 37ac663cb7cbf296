"""Throughput of the transformation step h against its GEMM peak and against backfilling.

Measured the way timm's ``benchmark.py`` does: warm-up calls, then timed calls with the device
synchronised inside each timed call, the batch halved on out-of-memory, and the thread count,
device and versions recorded with every number. Three things are measured in one run:

- h's embeddings/s at a batch size, for the variants ``eager`` (``Transformation.eval()``),
  ``folded`` (``FoldedTransformation``, what ``fct.context.apply_transformation`` runs) and
  ``compiled`` (``torch.compile`` of the folded module; with CUDA graphs on GPU);
- the *measured GEMM peak*: the FLOP/s of a plain sequence of GEMMs with h's exact layer
  shapes, same batch and dtype, for each GEMM library torch offers on the device (on CPU:
  ``torch.mm``, i.e. MKL/OpenBLAS, and oneDNN); the best is the peak, and
  ``fraction_of_gemm_peak = h FLOP/s / peak FLOP/s`` with h's FLOPs from
  ``transformation_flops``. A GEMM of the dominant shape alone ([batch, hidden] x
  [hidden, hidden]) is reported beside it;
- backfilling: images/s through the new model's forward (embedding only), so
  ``speedup_vs_backfill = h embeddings/s / backfill images/s``.

All variants of one configuration run interleaved, round after round, and medians are
reported: on a machine shared with other work, drift then hits every variant alike, so the
fractions stay meaningful even when the absolute numbers move. The fastest call of each
variant (``embeddings_per_s_fastest``) estimates what a quiet machine gives. See
docs/throughput.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fct.errors import FCTError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VARIANTS = ("eager", "folded", "compiled")


@dataclass(frozen=True)
class Sizes:
    """The dimensions of h and of the new model whose forward pass is the backfill cost."""

    name: str
    d_old: int
    d_new: int
    d_side: int
    hidden: int
    arch: str
    num_classes: int
    in_chans: int
    image_size: int
    small_stem: bool | None
    backfill_batch_cpu: int
    backfill_batch_cuda: int


SIZES = {
    # The FCT paper's setting: ResNet50 at 224 px with 128-d embeddings, h with side-info.
    "reference": Sizes("reference", 128, 128, 128, 2048, "resnet50", 1000, 3, 224, None, 32, 256),
    # fct/suites/quickstart.toml: Fashion-MNIST, timm's test_resnet, 64-d side-info, hidden 512.
    "quickstart": Sizes(
        "quickstart", 128, 128, 64, 512, "test_resnet", 10, 1, 28, False, 1024, 4096
    ),
}

# Default h batch sizes. CPU: 4096 is the size apply_transformation uses.
DEFAULT_BATCHES = {"cpu": (4096,), "cuda": (4096, 65536)}
QUICK_BATCHES = (1024,)


def get_sizes(sizes: str | Sizes) -> Sizes:
    """A Sizes by name (``reference``, ``quickstart``) or the Sizes itself."""
    if isinstance(sizes, Sizes):
        return sizes
    if sizes not in SIZES:
        raise FCTError(f"unknown sizes '{sizes}'; choose one of {', '.join(SIZES)}")
    return SIZES[sizes]


def resolve_device(device: str | torch.device) -> torch.device:
    """fct.device.resolve_device: ``cpu``, ``cuda[:N]`` or ``auto``; CUDA must be available."""
    from fct.device import resolve_device as resolve

    return resolve(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``float32`` or ``bfloat16`` (a name or the torch dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise FCTError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits (JSON stays readable)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one call of ``fn``, the device synchronised before and inside the timing."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    # Inside the timed region, as timm does: a CUDA call only queues work.
    _sync(device)
    return time.perf_counter() - t0


def interleaved_times(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int = 2,
    min_rounds: int = 3,
    max_rounds: int = 30,
    budget_s: float = 20.0,
) -> tuple[dict[str, list[float]], int]:
    """Seconds of every timed call of each function, and the number of timed rounds.

    Every round calls each function once, in turn, so slow drift on a shared machine affects
    them alike. Warm-up (first-call allocation, kernel selection, compilation) is at least
    one round and at most ``warmup`` rounds, stopping once it has run ``budget_s / 4``
    seconds. The round count fits ``budget_s`` (estimated from the last warm-up round),
    within ``[min_rounds, max_rounds]``.
    """
    round_s, warm_s = 0.0, 0.0
    for _ in range(max(warmup, 1)):
        round_s = sum(timed_call(fn, device) for fn in fns.values())
        warm_s += round_s
        if warm_s >= budget_s / 4:
            break
    rounds = int(min(max_rounds, max(min_rounds, budget_s // max(round_s, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed_call(fn, device))
    return times, rounds


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], device: torch.device, **kwargs: Any
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each function (see ``interleaved_times``), and rounds."""
    times, rounds = interleaved_times(fns, device, **kwargs)
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError.
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def with_backoff(run: Callable[[int], dict], batch: int, device: torch.device | str) -> dict:
    """``run(batch)``, halving the batch on out-of-memory (timm's batch-size back-off).

    The result records ``requested_batch`` beside the ``batch`` that ran.
    """
    requested, device = batch, torch.device(device)
    while True:
        try:
            out = run(batch)
            out["requested_batch"] = requested
            return out
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not _is_oom(err) or batch <= 1:
                raise
        # Out here the exception's traceback, and the tensors its frames hold, are gone, so
        # the cached blocks can really be returned before the smaller retry.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory at batch %d; retrying at %d", batch, batch // 2)
        batch //= 2


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (None: leave as is)."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0:
        raise FCTError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device) -> Iterator[None]:
    # timm benchmarks with cudnn.benchmark on: the best conv algorithm for the shape.
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# --------------------------------------------------------------------------------------------
# GEMM peak
# --------------------------------------------------------------------------------------------


def layer_shapes(d_old: int, d_new: int, d_side: int = 0, hidden: int = 2048) -> list[tuple]:
    """(d_in, d_out) of each of h's linear layers, in the order h runs them.

    Without side-information the two branches' first layers are listed as the one stacked
    GEMM the folded module runs (same FLOPs).
    """
    s = d_side or d_old
    first = [(d_old, 2 * d_old + 2 * s)] if d_side == 0 else [(d_old, 2 * d_old), (s, 2 * s)]
    return [
        *first,
        (2 * d_old, 2 * d_new),
        (2 * s, 2 * d_new),
        (4 * d_new, hidden),
        (hidden, hidden),
        (hidden, d_new),
    ]


def gemm_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """GEMM libraries to time on ``device``: ``torch.mm`` always, oneDNN on CPU if present."""
    from fct.models import onednn_linear_available

    names = ["torch.mm"]
    if device.type == "cpu" and onednn_linear_available(dtype):
        names.append("onednn")
    return names


def gemm_sequence(
    shapes: Sequence[tuple[int, int]],
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
) -> Callable[[], None]:
    """A function running one plain GEMM (no bias, no activation) per shape.

    Inputs, weights and (for ``torch.mm``) outputs are allocated once, so the calls time the
    GEMMs themselves. oneDNN's weights are reordered once into its blocked layout, as a
    deployed model would hold them.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    xs = [rand(batch, d_in) for d_in, _ in shapes]
    ws = [rand(d_out, d_in) for d_in, d_out in shapes]
    if backend == "torch.mm":
        outs = [torch.empty(batch, d_out, device=device, dtype=dtype) for _, d_out in shapes]

        def run() -> None:
            for x, w, out in zip(xs, ws, outs):
                torch.mm(x, w.t(), out=out)

        return run
    if backend == "onednn":
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, max(batch, 1)) for w in ws]
        linear = torch.ops.mkldnn._linear_pointwise

        def run() -> None:
            for x, w in zip(xs, packed):
                linear(x, w, None, "none", [], "")

        return run
    raise FCTError(f"unknown GEMM backend {backend!r}; use torch.mm or onednn")


# --------------------------------------------------------------------------------------------
# h and the backfill model
# --------------------------------------------------------------------------------------------


def build_transformation(sizes: Sizes, seed: int = 0) -> torch.nn.Module:
    """An h of ``sizes`` with non-trivial BatchNorm statistics, in eval mode, on CPU.

    Untrained weights time the same as trained ones; the BatchNorm statistics are drawn so
    that folding is a real change the correctness checks can see.
    """
    from torch import nn

    from fct.models import Transformation

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
    from fct.models import transformation_flops

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
            record["compile_seconds"] = _sig(
                timed_call(lambda: prepared.compiled(old, side), device)
            )
            fns["compiled"] = lambda: prepared.compiled(old, side)
        except Exception as e:  # a compiler failure: a recorded skip
            if _is_oom(e):
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
            "embeddings_per_s": _sig(batch / medians[name]),
            "flops_per_s": _sig(flops_per_s),
            "fraction_of_gemm_peak": round(flops_per_s / peak, 4),
            "fraction_of_dominant_gemm": round(flops_per_s / dominant_peak, 4),
            "fraction_of_torch_mm": round(flops_per_s / gemm["torch.mm"], 4),
            "embeddings_per_s_fastest": _sig(batch / fastest[name]),
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
            "dtype": _dtype_name(dtype),
            "batch": batch,
            "threads": torch.get_num_threads(),
            # Other processes' load over the last minute: on a shared machine it says how
            # much the absolute numbers were squeezed.
            "load_average_1min": _load_average(),
            "rounds": rounds,
            "folded_path": prepared.folded.path_for(old),
            "folded_max_rel_error": _sig(rel_error, 3),
            "embeddings_per_s": folded["embeddings_per_s"],
            "flops_per_s": folded["flops_per_s"],
            "fraction_of_gemm_peak": folded["fraction_of_gemm_peak"],
            "gemm_flops_per_s": _sig(peak),
            "gemm_backend": best,
            "gemm_flops_per_s_by_backend": {k: _sig(v) for k, v in gemm.items()},
            "gemm_dominant_shape": [batch, sizes.hidden, sizes.hidden],
            "gemm_dominant_flops_per_s": _sig(dominant_peak),
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
    from fct.models import EmbeddingModel

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

    with _cudnn_benchmark(device):
        out = with_backoff(run, batch, device)
    return {
        "backfill_images_per_s": _sig(out["images_per_s"]),
        "backfill_batch": out["batch"],
        "backfill_arch": sizes.arch,
        "backfill_image_size": sizes.image_size,
        "backfill_rounds": out["rounds"],
    }


def attach_backfill(record: dict, backfill: dict) -> dict:
    """Add the backfill figures and ``speedup_vs_backfill`` (folded h) to a record."""
    record.update(backfill)
    record["speedup_vs_backfill"] = _sig(
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
    from fct.provenance import provenance

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
    merged["provenance"]["wall_seconds"] = _sig(
        sum(r["provenance"].get("wall_seconds") or 0.0 for r in results)
    )
    return merged


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _load_range(configs: list[dict]) -> str:
    loads = [c["load_average_1min"] for c in configs if c.get("load_average_1min") is not None]
    return f"{min(loads)}-{max(loads)}" if loads else "unknown"


def to_markdown(result: dict, command: str | None = None) -> str:
    """A markdown table of a result, headed by device, versions and thread count."""
    prov = result["provenance"]
    configs = result["configurations"]
    threads = sorted({c["threads"] for c in configs})
    lines = [
        "# Throughput of the transformation step",
        "",
        f"- device: {prov['device']}; torch threads: {', '.join(map(str, threads))}; "
        f"load average during the runs: {_load_range(configs)}",
        f"- versions: fct {prov['fct_version']} ({prov['git_sha']}), torch {prov['torch']}, "
        f"timm {prov['timm']}, python {prov['python']}",
        f"- date: {prov['date']}; wall time {prov['wall_seconds']} s"
        + ("; **quick mode: smoke figures, not for reporting**" if result.get("quick") else ""),
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines += [
        "",
        "h embeddings/s per variant (median call); GEMM peak = best FLOP/s of a plain GEMM "
        "sequence with h's layer shapes (same batch, dtype, run); fraction = h FLOP/s / GEMM "
        "peak; fastest: folded h's rate in its fastest call (what a quiet "
        "machine gives); backfill = images/s of the new model's forward.",
        "",
        "| sizes | dtype | threads | batch | eager /s | folded /s | compiled /s "
        "| GEMM peak GFLOP/s | folded GFLOP/s | fraction eager / folded / compiled "
        "| folded /s, fastest call | backfill img/s | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in configs:
        v = c["variants"]

        def rate(name: str, v: dict = v) -> str:
            return _fmt(v.get(name, {}).get("embeddings_per_s"))

        def frac(name: str, v: dict = v) -> str:
            f = v.get(name, {}).get("fraction_of_gemm_peak")
            return "-" if f is None else f"{f:.2f}"

        lines.append(
            f"| {c['sizes']} | {c['dtype']} | {c['threads']} | {c['batch']} | {rate('eager')} | "
            f"{rate('folded')} | {rate('compiled')} | "
            f"{_fmt(c['gemm_flops_per_s'] / 1e9, 1)} ({c['gemm_backend']}) | "
            f"{_fmt(c['flops_per_s'] / 1e9, 1)} | "
            f"{frac('eager')} / {frac('folded')} / {frac('compiled')} | "
            f"{_fmt(v['folded'].get('embeddings_per_s_fastest'))} | "
            f"{_fmt(c['backfill_images_per_s'], 1)} | {_fmt(c['speedup_vs_backfill'])}x |"
        )
    skipped = {c["variants"].get("compiled", {}).get("skipped") for c in configs} - {None}
    for reason in sorted(skipped):
        lines.append(f"\ncompiled: {reason}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """Embeddings/s against batch size per sizes and variant, with the GEMM bound, as PNG.

    Matplotlib's object API on an Agg canvas (no pyplot: no global state, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fct.io import atomic_path

    configs = result["configurations"]
    # One panel per (dtype, threads): the curves of one panel share their conditions.
    panels = sorted({(c["dtype"], c["threads"]) for c in configs})
    fig = Figure(figsize=(6.4 * len(panels), 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = {"eager": ":", "folded": "-", "compiled": "--"}
    colors = {name: f"C{i}" for i, name in enumerate(sorted({c["sizes"] for c in configs}))}
    for ax, (dtype, threads) in zip(axes, panels):
        for sizes, color in colors.items():
            rows = sorted(
                (
                    c
                    for c in configs
                    if (c["dtype"], c["threads"]) == (dtype, threads) and c["sizes"] == sizes
                ),
                key=lambda c: c["batch"],
            )
            if not rows:
                continue
            xs = [c["batch"] for c in rows]
            bound = [c["gemm_flops_per_s"] / c["h_flops_per_item"] for c in rows]
            ax.plot(xs, bound, color=color, lw=4, alpha=0.25, label=f"{sizes}: GEMM peak")
            for variant, ls in styles.items():
                pts = [
                    (c["batch"], c["variants"][variant]["embeddings_per_s"])
                    for c in rows
                    if "embeddings_per_s" in c["variants"].get(variant, {})
                ]
                if pts:
                    ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=color,
                            label=f"{sizes}: {variant}")  # fmt: skip
            backfill = rows[0]["backfill_images_per_s"]
            ax.axhline(backfill, color=color, lw=0.8, ls="-.", label=f"{sizes}: backfill img/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("items / s")
        ax.set_title(f"{dtype}, {threads} thread{'s' if threads > 1 else ''}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Transformation h throughput, {result['provenance']['device']}", fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise FCTError(f"--batches takes comma-separated integers, got {text!r}") from e


def _cmd_transformation(args: argparse.Namespace) -> int:
    from fct.io import write_json, write_text

    dev = resolve_device(args.device)
    dtypes = (args.dtype or ("float32,bfloat16" if dev.type == "cuda" else "float32")).split(",")
    sizes = list(SIZES) if args.sizes == "both" else [args.sizes]
    batches = _csv_ints(args.batches) if args.batches else None
    results = [
        measure(
            s,
            dev,
            d.strip(),
            batches,
            quick=args.quick,
            budget_s=args.budget,
            threads=args.threads,
        )
        for s in sizes
        for d in dtypes
    ]
    result = merge(results)
    command = "fct " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    if args.out:
        out = Path(args.out)
        write_json(out / "transformation.json", result)
        write_text(out / "transformation.md", to_markdown(result, command))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(to_markdown(result, command), end="")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fct bench transformation`` to the ``fct`` subcommands; returns ``bench``."""
    bench = subparsers.add_parser("bench", help="throughput benchmarks")
    inner = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))
    tr = inner.add_parser(
        "transformation",
        help="h's embeddings/s (eager, folded, compiled) vs its GEMM peak and vs backfilling",
    )
    tr.add_argument(
        "--quick", action="store_true", help="a few seconds per configuration (smoke check)"
    )
    tr.add_argument("--json", action="store_true", help="print one JSON object")
    tr.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    tr.add_argument(
        "--dtype", help="float32 and/or bfloat16, comma-separated (default: cpu float32, cuda both)"
    )
    tr.add_argument(
        "--sizes",
        choices=(*SIZES, "both"),
        default="both",
        help="paper sizes (h 128/128/128, ResNet50), the quickstart's, or both (default)",
    )
    tr.add_argument("--batches", help="comma-separated h batch sizes (default 4096 on CPU)")
    tr.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="seconds of timed rounds per configuration (default 20)",
    )
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    tr.add_argument("--out", help="also write transformation.json and .md into this folder")
    tr.set_defaults(func=_cmd_transformation)
    return bench
