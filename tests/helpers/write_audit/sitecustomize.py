"""Test-only: log every file-system write under $FCT_AUDIT_ROOT, per process.

tests/e2e/test_distributed.py puts this folder on PYTHONPATH, so Python imports it at start-up in
the torchrun launcher and in every rank. Each write-like audit event (open for writing,
rename/replace, mkdir, remove, rmdir, rmtree) on a path under FCT_AUDIT_ROOT is appended to
$FCT_AUDIT_LOG/writes.<RANK or launcher>.<pid>.txt (that folder must be outside the root).
"""

import os
import sys

_ROOT = os.environ.get("FCT_AUDIT_ROOT")
_LOG = os.environ.get("FCT_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}


def _install() -> None:
    root = os.path.realpath(_ROOT)
    name = f"writes.{os.environ.get('RANK', 'launcher')}.{os.getpid()}.txt"
    log_path = os.path.join(_LOG, name)
    busy = []

    def under_root(path) -> bool:
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + os.sep)

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


if _ROOT and _LOG:
    _install()
