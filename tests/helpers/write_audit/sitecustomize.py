"""Test-only: log every file-system write under a folder, per process.

With this folder on PYTHONPATH, Python imports it at start-up and, when $FCT_AUDIT_ROOT and
$FCT_AUDIT_LOG are set, it audits that interpreter (tests/e2e/test_fuzz_inputs.py's real-CLI
cases); tests/e2e/test_distributed.py loads it by path and calls ``install`` in each forked rank.
Each write-like audit event (open for writing, rename/replace, mkdir, remove, rmdir, rmtree) on
a path under the root is appended to ``LOG/writes.<RANK or launcher>.<pid>.txt`` (the log folder
must be outside the root).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}


def install(root: Path, log: Path) -> None:
    """Audit this process's writes under ``root`` from now on (an audit hook cannot be
    removed: call it in a process of its own)."""
    root_path = os.path.realpath(root)
    name = f"writes.{os.environ.get('RANK', 'launcher')}.{os.getpid()}.txt"
    log_path = os.path.join(log, name)
    busy = []

    def under_root(path) -> bool:
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return p == root_path or p.startswith(root_path + os.sep)

    def hook(event, args):
        if busy:
            return
        paths = ()
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            paths = (path,) if writes and not isinstance(path, int) else ()
        elif event in _EVENTS:
            paths = tuple(a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))
        hits = [p for p in paths if under_root(p)]
        if not hits:
            return
        busy.append(1)
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, "".join(f"{event}\t{os.fsdecode(p)}\n" for p in hits).encode())
            finally:
                os.close(fd)
        finally:
            busy.pop()

    sys.addaudithook(hook)


if os.environ.get("FCT_AUDIT_ROOT") and os.environ.get("FCT_AUDIT_LOG"):
    install(Path(os.environ["FCT_AUDIT_ROOT"]), Path(os.environ["FCT_AUDIT_LOG"]))
