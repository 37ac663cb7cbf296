"""The timing harness, after timm's ``benchmark.py``: synchronised timed calls, interleaved
rounds within a time budget, the batch halved on out-of-memory, thread count control."""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fct.errors import FCTError

# One logger for the package: its lines read "fct.throughput: ...", as they always did.
log = logging.getLogger(__package__)


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


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def is_oom(err: BaseException) -> bool:
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
            if not is_oom(err) or batch <= 1:
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
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
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
