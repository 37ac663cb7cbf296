"""Atomic file writes: nothing half-written is ever read back."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fct.errors import FCTError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temp file lives in the same directory so the final ``os.replace`` is atomic. On any
    error the temp file is removed and ``path`` is left as it was. A full disk or an
    unwritable folder is reported as an FCTError naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except PermissionError as e:
        raise FCTError(
            f"cannot write to {path.parent} ({e.strerror}); choose a writable folder"
        ) from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno == 28:  # ENOSPC
            raise FCTError(
                f"no space left on device while writing {path}; free disk space and rerun (finished work is kept)"
            ) from e
        if isinstance(e, PermissionError):
            raise FCTError(f"cannot write {path} ({e.strerror}); choose a writable folder") from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a corrupt one raises FCTError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FCTError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun"
        ) from e
