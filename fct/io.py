"""Atomic file writes (nothing half-written is ever read back) and the file helpers around them."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fct.errors import FCTError

# ENOSPC and EDQUOT: a full disk or an exhausted quota read the same to a user.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    except OSError as e:
        # Not a folder (a file in the way), no permission, read-only or full file system.
        raise FCTError(
            f"cannot write to {path.parent} ({e.strerror or e}); choose a writable folder"
            f"{' and free disk space' if e.errno in DISK_FULL else ''}"
        ) from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno in DISK_FULL:
            raise FCTError(
                f"no space left on device while writing {path}; free disk space and rerun (finished work is kept)"
            ) from e
        if isinstance(e, PermissionError):
            raise FCTError(f"cannot write {path} ({e.strerror}); choose a writable folder") from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, *, prefix: str, where: str, fix: str, disk_full: str) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success rename it over ``final`` atomically.

    Every file in it is fsynced first, a folder already at ``final`` (a damaged or stale
    copy) is replaced, and the parent is fsynced after the rename, so a reader sees either
    the old state or the complete new folder, never part of one. On any error the temp folder
    is removed. Errors a user can fix are FCTErrors: a folder that cannot be created reads
    "cannot write ``where`` (reason); ``fix``", a full disk ``disk_full``.
    """
    import shutil

    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    except OSError as e:
        raise FCTError(f"cannot write {where} ({e.strerror or e}); {fix}") from e
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in DISK_FULL:
            raise FCTError(disk_full) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (cache manifests, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries to disk, so a rename into it survives a power cut too."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some file systems do not open folders; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(tensors: dict, path: str | os.PathLike[str]) -> None:
    """Write ``tensors`` (name -> CPU tensor) to ``path`` in safetensors format, fsynced.

    The bytes are serialised in memory and written by Python rather than by
    ``safetensors.torch.save_file``, so a failed write (a full disk) raises OSError here
    instead of possibly leaving a short file behind unnoticed. Callers write to a temp path.
    """
    from safetensors.torch import save

    blob = save(tensors)
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


def check_writable(folder: str | os.PathLike[str], what: str, fix: str) -> None:
    """Create ``folder`` and a file in it, or raise FCTError naming ``what`` and ``fix``.

    Called before long work starts, so a results folder that cannot be written (a file in the
    way, no permission, a read-only or full disk) is found before hours of training, not after.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fct-write-test."):
            pass
    except OSError as e:
        raise FCTError(f"cannot write to the {what} {folder} ({e.strerror or e}); {fix}") from e


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


#: Largest JSON file read back (run records, manifests, checkpoint states): a record is a few
#: hundred KB; anything far larger is not one of ours and is refused before it is read.
JSON_MAX_BYTES = 64 << 20
#: Deepest nesting accepted: ours is under 10; ``[`` x 200,000 would exhaust the parser's stack.
JSON_MAX_DEPTH = 64


def _json_depth_ok(text: str, limit: int) -> bool:
    if text.count("[") + text.count("{") <= limit:
        return True
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def read_regular_bytes(
    path: str | os.PathLike[str],
    max_bytes: int,
    what: str = "file",
    fix: str = "delete it and rerun",
    follow_symlinks: bool = False,
) -> bytes:
    """The bytes of ``path``, only if it is a regular file of at most ``max_bytes``.

    Opened without blocking (a FIFO never hangs the reader) and, unless ``follow_symlinks``
    (datasets linked in from shared storage), without following a final symlink; a folder,
    device, FIFO, symlink or an oversized file raises FCTError naming it and ending in ``fix``.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise FCTError(f"{path} does not exist; check the path and rerun") from e
    except OSError as e:
        raise FCTError(f"{path} is not a readable regular {what} ({e.strerror or e}); {fix}") from e
    try:
        st = os.fstat(fd)
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise FCTError(f"{path} is not a regular {what}; {fix}")
        if st.st_size > max_bytes:
            raise FCTError(
                f"{path} is {st.st_size} bytes, over the {max_bytes}-byte limit for a {what}; {fix}"
            )
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:  # the file grew while being read
            raise FCTError(f"{path} is over the {max_bytes}-byte limit for a {what}; delete it")
        return data
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike[str], max_bytes: int = JSON_MAX_BYTES) -> Any:
    """Read a JSON file we wrote; anything else raises FCTError naming the file.

    Bounded: only a regular file (no symlink, FIFO or device) of at most ``max_bytes``, UTF-8,
    nested at most JSON_MAX_DEPTH deep, numbers of sane length. Every shape of damage (random
    bytes, a folder in the file's place, deep nesting, a 5,000-digit integer) is an FCTError.
    """
    data = read_regular_bytes(path, max_bytes, "JSON file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FCTError(f"{path} is not UTF-8 text; delete it and rerun") from e
    if not _json_depth_ok(text, JSON_MAX_DEPTH):
        raise FCTError(f"{path} is nested deeper than {JSON_MAX_DEPTH} levels; delete it and rerun")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FCTError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun"
        ) from e
    except (ValueError, RecursionError) as e:  # e.g. an integer over Python's digit limit
        raise FCTError(f"{path} is not a usable JSON file ({e}); delete it and rerun") from e


def sha256_regular(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(hex sha256, size) of ``path``, read only if it is a regular file and not a symlink.

    Opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` before any read, so a
    symlink (to ``/dev/zero``, or out of the cache), a FIFO or a device is refused at once
    instead of being followed, read forever or blocked on. Raises OSError (ELOOP, EISDIR) or
    ValueError for anything but a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{Path(path).name} is not a regular file")
        h = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            size += len(chunk)
        return h.hexdigest(), size
    finally:
        os.close(fd)


def not_regular(path: Path) -> str | None:
    """Why ``path`` is not a plain regular file (a symlink is not one), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path.name} missing"
    except OSError as e:
        return f"{path.name} cannot be examined ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return f"{path.name} is a symlink"
    if stat.S_ISDIR(st.st_mode):
        return f"{path.name} is a folder"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file"
    return None


def check_sums(
    folder: Path,
    sums: dict[str, tuple[str, int | None]],
    only: tuple[str, ...] | None = None,
) -> str | None:
    """Why the files of a checksummed folder do not match what was recorded, or None.

    The one check of the cache's entries (fct.artifacts, sums from the manifest) and the
    trainer's epoch checkpoints (fct.train, sums from ``state.json``). ``sums`` maps a file
    name to its recorded (sha256, size in bytes or None). Each file must be a regular file (a
    symlink, FIFO or device is refused without being followed or read), of the recorded size,
    with the recorded sha256. With ``only`` (every name the writer puts in the folder), any
    other file makes the folder untrusted (``unexpected file NAME``).
    """
    for name, (sha, size) in sums.items():
        path = Path(folder) / name
        problem = not_regular(path)
        if problem is not None:
            return problem
        if size is not None and (actual := os.lstat(path).st_size) != size:
            return f"{name} has {actual} bytes, {size} recorded"
        try:
            digest, read = sha256_regular(path)
        except (OSError, ValueError) as e:
            return f"{name} unreadable ({getattr(e, 'strerror', None) or e})"
        if digest != sha or (size is not None and read != size):
            return f"{name} checksum mismatch"
    if only is not None:
        extra = sorted(p.name for p in Path(folder).iterdir() if p.name not in only)
        if extra:
            return f"unexpected file {extra[0]}"
    return None
