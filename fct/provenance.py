"""Where a number came from: versions, git sha, device, seed, date, wall time."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from fct import __version__
from fct.threads import threads_used


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def git_sha() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def cpu_name() -> str:
    """A human name for the CPU (model name from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu") -> str:
    """E.g. ``cpu (AMD EPYC, 2 threads)`` or ``cuda (NVIDIA H100 80GB HBM3)``."""
    if str(device).startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    import torch

    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def utc_now() -> str:
    """The current UTC time in ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def provenance(
    device: str = "cpu", seed: int | None = None, wall_seconds: float | None = None
) -> dict:
    """The provenance block of a run record or a benchmark result."""
    return {
        "fct_version": __version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "faiss": _version("faiss-cpu") or _version("faiss-gpu-cu12") or _version("faiss-gpu"),
        "numpy": _version("numpy"),
        "device": device_name(device),
        "host_cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": threads_used(),
        "seed": seed,
        "date": utc_now(),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 3),
    }


def source_digest(obj: object) -> str | None:
    """20 hex digits of SHA-256 over the source file of the module defining ``obj`` (a class
    or function; a plugin's .py file included): a record made by a method, or an artifact
    trained by a method's own loss, goes stale when that file changes. None when the module
    has no readable source file (defined interactively)."""
    import hashlib
    import inspect
    import sys

    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    try:
        path = inspect.getsourcefile(module) if module is not None else None
        data = Path(path).read_bytes() if path else None
    except (OSError, TypeError):
        data = None
    return hashlib.sha256(data).hexdigest()[:20] if data is not None else None
