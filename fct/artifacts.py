"""Content-addressed artifact cache: trained weights and embeddings, keyed by their inputs.

Layout under the cache root (``$FCT_CACHE`` or ``.fct-cache/``)::

    KIND/NAME-DIGEST/          a finished artifact (directory renamed into place last)
        tensors.safetensors    weights or features (safetensors: no pickle, ever)
        meta.json              what produced it: the key, train time, provenance
        manifest.json          the entry's full key (kind, name, key, digest) and the sha256
                               and size of the two files above, written last
    partial/KIND/NAME-DIGEST/  epoch checkpoints of a training still running or interrupted
    locks/DIGEST.lock          one builder at a time per artifact (other processes wait)

DIGEST hashes the key: everything that determines the artifact (specs, seed, the keys of the
artifacts it was built from, the artifact format version). A change of any input gives a new
digest, so only what depends on it is rebuilt. A finished entry whose manifest does not match
its files (truncated, corrupted, edited, or holding a file the manifest does not list), or whose
recorded key is not the key asked for (a folder swapped with another, or copied into the wrong
slot), is reported in one line, moved to ``KIND/.corrupt/`` and rebuilt; nothing unverified is
loaded. Every file is read only if it is a regular file inside the entry folder (no symlink is
followed, no FIFO or device is opened for reading), and JSON reads are bounded.
Temp folders (``KIND/.NAME-DIGEST.*``) left by a killed process are removed by the next
holder of the entry's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fct.errors import FCTError
from fct.hashing import config_hash
from fct.io import (  # noqa: F401
    atomic_dir,
    check_sums,
    not_regular,
    read_json,
    sha256_file,
    sha256_regular,
    write_safetensors,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
META = "meta.json"
MANIFEST = "manifest.json"
#: Largest manifest or meta.json read back: ours are a few KB (the key is a few specs); a
#: bigger one was not written by the cache and is refused before it is read.
JSON_LIMIT = 16 << 20


def default_cache_dir() -> Path:
    """``$FCT_CACHE`` when set, else ``.fct-cache`` in the working directory."""
    return Path(os.environ.get("FCT_CACHE") or ".fct-cache")


def _digest(key: Any) -> str:
    # The one definition of DIGEST. Changing it would orphan every existing cache entry.
    return config_hash({"key": key, "format": FORMAT_VERSION}, length=20)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, odd values their str)."""
    return json.loads(_canonical(obj))


@dataclass(frozen=True)
class Entry:
    """One artifact slot in the cache."""

    root: Path
    kind: str
    name: str
    key: dict

    @property
    def digest(self) -> str:
        """Hash of the key and the artifact format version."""
        return _digest(self.key)

    @property
    def path(self) -> Path:
        """Directory of the finished artifact."""
        return self.root / self.kind / f"{self.name}-{self.digest}"

    @property
    def partial(self) -> Path:
        """Directory for epoch checkpoints while the artifact is being trained."""
        return self.root / "partial" / self.kind / f"{self.name}-{self.digest}"

    def weights_digest(self) -> str | None:
        """20 hex digits of the finished artifact's tensor file (its SHA-256, from the
        manifest): unlike ``digest`` (a hash of the key) it differs between two trainings of
        one key that gave different weights (another machine, another library version).
        None when the entry has no readable manifest."""
        try:
            manifest = read_json(self.path / MANIFEST, max_bytes=JSON_LIMIT)
            return str(manifest["files"][TENSORS]["sha256"])[:20]
        except (FCTError, KeyError, TypeError):
            return None

    def verify(self) -> bool:
        """True when the finished artifact exists, is the one asked for and matches its manifest.

        A present but damaged entry (including one whose recorded key is not this slot's key,
        or anything that is not a real folder in its place) is logged, moved to
        ``KIND/.corrupt/`` and reported absent.
        """
        try:
            os.lstat(self.path)
        except OSError:
            # Absent, or KIND/ is not a folder: save() then names the folder it cannot write.
            return False
        problem = _check_manifest(self.path, self)
        if problem is None:
            return True
        _move_aside(self.path, problem)
        return False

    def load(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata of the finished, verified artifact.

        Raises FCTError (or a safetensors error) when the files changed since ``verify``; the
        cache then treats the entry as damaged.
        """
        from safetensors.torch import load_file

        meta = read_json(self.path / META, max_bytes=JSON_LIMIT)
        if not isinstance(meta, dict):
            raise FCTError(f"{self.path / META} is not a JSON object; delete it and rerun")
        tensors = self.path / TENSORS
        # verify() hashed the file through a descriptor that follows no symlink; safetensors
        # opens by name, so make sure the name still is that regular file, not a link.
        if not_regular(tensors) is not None:
            raise FCTError(f"{tensors} is not a regular file; delete it and rerun")
        return load_file(str(tensors)), meta

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write the artifact into a temp directory, then rename it into place.

        The manifest records the entry's full key (kind, name, key, digest) and is written
        last; the directory is renamed into place after every file is fsynced, so a reader
        (or a later run after a crash) sees either no entry or a complete one. A full disk
        raises FCTError; entries already finished are untouched.
        """
        with atomic_dir(
            self.path,
            prefix=f".{self.path.name}.",
            where=f"to the cache folder {self.path.parent}",
            fix="free disk space or set FCT_CACHE (or --cache) to a writable folder",
            disk_full=f"no space left on device while writing {self.path}; free disk space (or set FCT_CACHE to a larger disk) and rerun: finished artifacts are kept",
        ) as tmp:
            write_safetensors(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / TENSORS
            )
            (tmp / META).write_text(
                json.dumps(
                    {"kind": self.kind, "name": self.name, "key": self.key, **meta},
                    indent=2,
                    sort_keys=True,
                    default=str,
                )
            )
            files = {
                f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size}
                for f in (TENSORS, META)
            }
            manifest = {
                "format": FORMAT_VERSION,
                "kind": self.kind,
                "name": self.name,
                "key": _jsonable(self.key),
                "digest": self.digest,
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        shutil.rmtree(self.partial, ignore_errors=True)


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _check_manifest(path: Path, entry: Entry | None = None) -> str | None:
    """Why the finished entry at ``path`` must not be used, or None when it is sound.

    Checks that the manifest is a bounded, well-typed JSON object recording the entry's full
    key, that the key hashes to the digest in the folder's name and the kind is the folder it
    sits in, and (given ``entry``, the slot asked for) that kind, name, key and digest are
    that slot's. Then every listed file must be a regular file (no symlink) with the recorded
    size and sha256, and nothing else may be in the folder.
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return "the entry is a symlink, not a folder"
    if not stat.S_ISDIR(st.st_mode):
        return "the entry is not a folder"
    problem = not_regular(path / MANIFEST)
    if problem is not None:
        return "no manifest" if problem.endswith(" missing") else problem
    try:
        manifest = read_json(path / MANIFEST, max_bytes=JSON_LIMIT)
    except FCTError:
        return "unreadable manifest"
    if not isinstance(manifest, dict):
        return "manifest is not a JSON object"
    problem = _check_identity(path, manifest, entry)
    if problem is not None:
        return problem
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "manifest has no file list"
    sums = {}
    for name in (TENSORS, META):
        want = files.get(name)
        if not isinstance(want, dict):
            return f"{name} missing from the manifest"
        size, sha = want.get("bytes"), want.get("sha256")
        # bool is an int subclass: true/false are not sizes.
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not _is_sha256(sha):
            return f"manifest entry of {name} is malformed"
        sums[name] = (sha, size)
    # The cache writes exactly these three files; anything else was put there by someone else
    # (a planted model.pt, say) and makes the whole entry untrusted.
    problem = check_sums(path, sums, only=(TENSORS, META, MANIFEST))
    if problem is not None:
        return problem
    # Every caller treats meta as a dict; one that is not (a crafted entry with matching sums)
    # must be rejected here, not fail later in whoever reads it.
    try:
        meta = read_json(path / META, max_bytes=JSON_LIMIT)
    except FCTError:
        return f"{META} unreadable"
    if not isinstance(meta, dict):
        return f"{META} is not a JSON object"
    return None


def _check_identity(path: Path, manifest: dict, entry: Entry | None) -> str | None:
    """Why the key recorded in ``manifest`` does not belong in ``path`` (or ``entry``)."""
    kind, name, key, digest = (manifest.get(k) for k in ("kind", "name", "key", "digest"))
    if manifest.get("format") != FORMAT_VERSION:
        return f"manifest format {manifest.get('format')!r}, expected {FORMAT_VERSION}"
    if "key" not in manifest:
        # Entries written before manifests carried the key cannot prove which slot they
        # belong to; they are rebuilt once.
        return "manifest records no key (an entry from an older version)"
    if not (isinstance(kind, str) and isinstance(name, str) and isinstance(digest, str)):
        return "manifest's kind, name or digest is missing or not a string"
    if not isinstance(key, dict):
        return "manifest's key is not a JSON object"
    if _digest(key) != digest:
        return "manifest's key does not hash to its digest"
    if path.name != f"{name}-{digest}" or path.parent.name != kind:
        return f"manifest describes {kind}/{name}-{digest}, not this folder"
    if entry is not None:
        if (kind, name, digest) != (entry.kind, entry.name, entry.digest):
            return f"manifest describes {kind}/{name}-{digest}, not the entry asked for"
        if _canonical(key) != _canonical(_jsonable(entry.key)):
            return "manifest's key is not the key asked for"
    return None


def _real_dir(folder: Path) -> None:
    """Make ``folder`` a real directory: create it, or replace a file or symlink in its place.

    ``KIND/.corrupt`` is the cache's own; something else there (a file, or a symlink that
    would move entries out of the cache) holds nothing the cache computed and is removed.
    """
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    log.warning("%s is not a folder; replacing it with one", folder)
    folder.unlink()
    folder.mkdir()


def _move_aside(path: Path, why: str) -> None:
    """Report the damaged entry ``path`` and move it to ``KIND/.corrupt/`` (or remove it)."""
    log.warning("cache entry %s is damaged (%s); rebuilding it", path, why)
    graveyard = path.parent / ".corrupt"
    try:
        _real_dir(graveyard)
        stamp = int(time.time() * 1000)
        while os.path.lexists(graveyard / f"{path.name}-{stamp}"):
            stamp += 1
        os.replace(path, graveyard / f"{path.name}-{stamp}")
        return
    except OSError as e:
        log.warning("cannot move %s to %s (%s); removing it", path, graveyard, e.strerror or e)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise FCTError(
            f"cache entry {path} is damaged and cannot be moved or removed ({e.strerror or e}); "
            "delete it and rerun"
        ) from e


class Cache:
    """The artifact cache rooted at ``root``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        from fct import distributed

        self.root = Path(root) if root is not None else default_cache_dir()
        if not distributed.is_main():
            return  # rank 0 creates and writes the cache; the other ranks only read it
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FCTError(
                f"cannot create cache folder {self.root} ({e.strerror}); set --cache or FCT_CACHE to a writable folder"
            ) from e

    def entry(self, kind: str, name: str, key: dict) -> Entry:
        """The slot for an artifact of ``kind`` determined by ``key``.

        The key must read back from JSON as itself (plain dicts with string keys): the
        manifest stores it and every load compares it, so a key that does not survive the
        round trip would make its entry look damaged on every run.
        """
        entry = Entry(self.root, kind, name, key)
        if _digest(_jsonable(key)) != entry.digest:
            raise FCTError(
                f"the cache key of {kind}/{name} does not survive a JSON round trip "
                "(a dict with non-string keys?); make the key plain JSON"
            )
        return entry

    @contextlib.contextmanager
    def lock(self, entry: Entry) -> Iterator[None]:
        """Hold the builder lock of ``entry`` (blocks while another process builds it).

        Something other than a regular file at the lock's path (a folder, a symlink, a FIFO)
        is an FCTError naming it: it is not safe to guess that no one relies on it.
        """
        locks = self.root / "locks"
        path = locks / f"{entry.digest}.lock"
        try:
            locks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FCTError(
                f"cannot create the cache's lock folder {locks} ({e.strerror or e}); "
                "remove what is in its place and rerun"
            ) from e
        # O_NOFOLLOW: a symlink is never followed (to a file outside the cache, or /dev/zero);
        # O_NONBLOCK: opening a FIFO in its place does not hang. flock ignores O_NONBLOCK.
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        except IsADirectoryError as e:
            raise FCTError(
                f"cache lock {path} is a folder, not a lock file; remove it "
                f"(rm -r '{path}') and rerun"
            ) from e
        except OSError as e:
            what = "a symlink" if e.errno == errno.ELOOP else f"unusable ({e.strerror or e})"
            raise FCTError(f"cache lock {path} is {what}; remove it (rm '{path}') and rerun") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FCTError(
                    f"cache lock {path} is not a regular file; remove it (rm '{path}') and rerun"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s/%s", entry.kind, entry.name)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def get_or_build(
        self,
        entry: Entry,
        build: Callable[[Entry], tuple[dict[str, torch.Tensor], dict[str, Any]]],
        force: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict, bool]:
        """Load ``entry`` or build and save it; returns (tensors, meta, built_now).

        ``build`` runs with the caller's torch random stream forked (see
        ``fct.train.isolated_rng``): building an artifact or loading it from the cache leaves the
        caller's stream in the same state, so what runs next does not depend on the cache.
        An entry that verifies but then fails to load is treated as damaged and rebuilt.
        """
        from fct import distributed
        from fct.seeding import isolated_rng

        if not distributed.is_main():
            return self._follow(entry, build)
        with self.lock(entry):
            _remove_stale_temps(entry)
            loaded = None
            if not force and entry.verify():
                loaded = self._load_or_discard(entry)
            # Under torchrun the other ranks wait for this decision (``_follow``); only rank 0
            # takes the lock, so a rank never blocks on a lock another rank of its run holds.
            distributed.broadcast_json(loaded is not None)
            if loaded is not None:
                tensors, meta = loaded
                return tensors, meta, False
            if force:  # a forced rebuild starts over, not from the last run's checkpoints
                shutil.rmtree(entry.partial, ignore_errors=True)
            with isolated_rng():
                tensors, meta = build(entry)
            entry.save(tensors, meta)
            meta = read_json(entry.path / META, max_bytes=JSON_LIMIT)
            distributed.broadcast_json(meta)
            return tensors, meta, True

    @staticmethod
    def _load_or_discard(entry: Entry) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The verified entry's contents, or None after moving it aside if it will not load."""
        from safetensors import SafetensorError

        try:
            return entry.load()
        except (FCTError, OSError, ValueError, SafetensorError) as e:
            # Changed since verify(), or a crafted file whose sums match but whose content is
            # not a safetensors file: damage like any other.
            _move_aside(entry.path, f"unloadable: {str(e).split('; ')[0]}")
            return None

    def _follow(
        self, entry: Entry, build: Callable[[Entry], tuple[dict[str, torch.Tensor], dict]]
    ) -> tuple[dict[str, torch.Tensor], dict, bool]:
        """A non-zero rank's side of ``get_or_build``: read what rank 0 verified, or take part
        in the build (training and feature extraction are collective) and save nothing."""
        from fct import distributed
        from fct.seeding import isolated_rng

        if distributed.broadcast_json(None):
            tensors, meta = entry.load()
            return tensors, meta, False
        with isolated_rng():
            tensors, _ = build(entry)
        return tensors, distributed.broadcast_json(None), True


def _remove_stale_temps(entry: Entry) -> None:
    """Delete temp folders of ``entry`` that a killed writer left (the caller holds the lock)."""
    parent = entry.path.parent
    if parent.is_dir():
        for tmp in parent.glob(f".{entry.path.name}.*"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # not ours either way: a temp name never holds anything but our folders
                with contextlib.suppress(OSError):
                    tmp.unlink()


def list_entries(root: str | os.PathLike[str], kind: str) -> list[tuple[Entry, dict]]:
    """Every finished entry of ``kind`` under the cache ``root`` that matches its manifest,
    with its meta.json, sorted by folder name. Read-only: a damaged entry is skipped (and
    logged), never moved (that is for the run that would use it); no folder is created."""
    folder = Path(root) / kind
    out = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # .corrupt/ and temp folders of a write in progress
        problem = _check_manifest(path)
        if problem is not None:
            log.warning("cache entry %s is damaged (%s); not listed", path, problem)
            continue
        manifest = read_json(path / MANIFEST, max_bytes=JSON_LIMIT)
        entry = Entry(Path(root), kind, manifest["name"], manifest["key"])
        try:
            meta = read_json(path / META, max_bytes=JSON_LIMIT)
        except FCTError:
            continue
        out.append((entry, meta if isinstance(meta, dict) else {}))
    return out
