"""Shared helpers for the reliability tests: `fct` in a subprocess, normalised run records and
one clean `fct run tiny` reused by every test that compares against it.

Runs that are compared must use the same torch thread count (CPU reductions are split by
thread), so every `fct` subprocess here gets ``OMP_NUM_THREADS=1``; that also keeps two of them
from oversubscribing a small machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import forked_cli
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests never download: a missing Fashion-MNIST is not fetched by torchvision on its own
# (fct.data.fashion_mnist), in this process or in any `fct` subprocess (they inherit it). The
# tests of the automatic download remove it with monkeypatch and fake torchvision's class.
os.environ["FCT_NO_DOWNLOAD"] = "1"

# One CPU thread in every in-process run (fct.threads honours FCT_THREADS), as the `fct`
# subprocesses get with OMP_NUM_THREADS=1: records compare across both, and the tests neither
# oversubscribe a busy machine nor depend on its load. OpenMP waits sleep (as `fct` sets).
os.environ.setdefault("FCT_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

E2E = ROOT / "tests" / "e2e"

# What a fresh interpreter registers (methods, datasets, losses), before any test adds a plugin:
# every forked `fct` starts from it.
forked_cli.remember_registries()


#: Fixtures that run a whole `fct run tiny`: a test that uses one is end to end.
WHOLE_RUN_FIXTURES = {"clean_tiny", "tiny_run"}


#: The longest single test file (the paper suites' smoke runs): started first among the slow
#: tests that do not need the clean run, so it does not end the session alone on one core.
LONGEST = E2E / "test_paper_suites.py"


def pytest_collection_modifyitems(config, items) -> None:
    """Every end-to-end test (tests/e2e/: whole runs, subprocesses, torchrun, crash loops),
    and every test elsewhere that uses a whole-run fixture, is ``slow``: ``pytest -m "not
    slow"`` is the inner loop of unit tests.

    Then the order, for pytest-xdist's work stealing (which hands each worker an equal run of
    consecutive tests, then moves tests from the end of a busy worker's queue to an idle one):
    the tests built on the clean run of tiny first (the first half's worker makes it while the
    other does not wait for it), the other slow tests at the start of the second half (the
    longest first), and the unit tests behind each, so that what is left to steal at the end
    is short. Within each group the collection order stays (a module's tests stay together,
    for its module-scoped fixtures)."""
    anchored, slow, unit = [], [], []
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(E2E) or WHOLE_RUN_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
            (anchored if "clean_tiny" in names else slow).append(item)
        else:
            unit.append(item)
    slow.sort(key=lambda item: item.path != LONGEST)  # stable: otherwise collection order
    cut = min(len(unit), max(0, (len(slow) + len(unit) - len(anchored)) // 2))
    items[:] = [*anchored, *unit[:cut], *slow, *unit[cut:]]


# Record keys that measure time or speed (or say when and where), which no rerun reproduces.
VOLATILE = re.compile(r"seconds|per_s|date|speedup|throughput|time")


def fct_env(**extra: str) -> dict[str, str]:
    """Environment for an `fct` subprocess: one torch thread, no progress bars."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("FCT_CACHE", None)
    env.update(extra)
    return env


def fct_command(*args: str) -> list[str]:
    """The argv of `python -m fct ARGS` with this interpreter."""
    return [sys.executable, "-m", "fct", *args]


def run_fct(
    *args: str, cwd: Path, timeout: float = 300, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run `fct ARGS` to completion in a process of its own; returns it with its output captured.

    The process is a fork of this one (tests/helpers/forked_cli.py: the CLI without 4 s of
    imports); ``fresh`` starts a new interpreter (`python -m fct`) instead.
    """
    if fresh:
        return subprocess.run(
            fct_command(*args),
            cwd=cwd,
            env=fct_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return forked_cli.run(args, cwd, fct_env(), timeout)


def start_fct(*args: str, cwd: Path, stdout: int = subprocess.DEVNULL) -> forked_cli.Forked:
    """`fct ARGS` started in a forked process of its own (stderr a text pipe), not waited for."""
    return forked_cli.Forked(args, cwd, fct_env(), stdout=stdout, stderr=subprocess.PIPE)


def tiny_args(out: Path, cache: Path, *more: str) -> list[str]:
    """`run tiny` on the CPU with its results in ``out`` and its cache in ``cache``."""
    return ["run", "tiny", "--out", str(out), "--cache", str(cache), "--device", "cpu", *more]


def normalize(obj: Any) -> Any:
    """A run record without provenance, timings and speeds: what a rerun must reproduce."""
    if isinstance(obj, dict):
        return {
            k: normalize(v) for k, v in obj.items() if k != "provenance" and not VOLATILE.search(k)
        }
    if isinstance(obj, list):
        return [normalize(v) for v in obj]
    return obj


def records(out: Path) -> dict[str, dict]:
    """Normalised run records under ``out/runs``, by path relative to ``out``."""
    return {
        str(p.relative_to(out)): normalize(json.loads(p.read_text()))
        for p in sorted((out / "runs").glob("*/*.json"))
    }


def entries(cache: Path) -> list[Path]:
    """Every finished cache entry folder (KIND/NAME-DIGEST)."""
    return sorted(
        p
        for kind in cache.iterdir()
        if kind.is_dir() and kind.name not in ("partial", "locks")
        for p in kind.iterdir()
        if p.is_dir() and not p.name.startswith(".")
    )


def assert_cache_verifies(cache: Path, no_temps: bool = True) -> None:
    """Every finished entry in ``cache`` matches its manifest; with ``no_temps``, no temp
    folder is left over either (a SIGKILL during a write may leave one, never read)."""
    from fct.artifacts import _check_manifest

    found = entries(cache)
    assert found, f"no cache entries in {cache}"
    for path in found:
        assert _check_manifest(path) is None, path
    if no_temps:
        temps = [p for kind in cache.iterdir() for p in kind.glob(".*") if p.name != ".corrupt"]
        assert not temps, temps


@pytest.fixture
def one_thread():
    """Train in this process as the `fct` subprocesses do (one torch thread): records then
    compare with theirs, and a busy machine is not oversubscribed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def clean_tiny(tmp_path_factory) -> tuple[Path, Path, dict[str, dict]]:
    """One uninterrupted `fct run tiny` (a new interpreter, seed 0): (out, cache, normalised
    records). Made once per test session: pytest-xdist's workers share it (the first to ask
    runs it under a lock, the others wait and read it); tests copy the cache before changing
    anything in it."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    base = root / "clean-tiny"
    out, cache = base / "out", base / "cache"
    with open(root / "clean-tiny.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if not (base / "finished").exists():
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir()
            # A new interpreter: the records every forked or in-process run is compared with.
            proc = run_fct(*tiny_args(out, cache), cwd=base, fresh=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            (base / "finished").touch()
    recs = records(out)
    assert len(recs) == 4
    return out, cache, recs


def within(seconds: float, fn: Callable):
    """``fn()``, failing the test instead of hanging when it blocks (a FIFO opened for reading)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def toml_str(text: str) -> str:
    """``text`` as a TOML basic string (control characters such as NUL as \\u escapes)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
