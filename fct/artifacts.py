"""Content-addressed artifact cache: trained weights and embeddings, keyed by their inputs.

Layout under the cache root (``$FCT_CACHE`` or ``.fct-cache/``)::

    KIND/NAME-DIGEST/          a finished artifact (directory renamed into place last)
        tensors.safetensors    weights or features (safetensors: no pickle, ever)
        meta.json              what produced it: the key, train time, provenance
        manifest.json          sha256 and size of the two files above, written last
    partial/KIND/NAME-DIGEST/  epoch checkpoints of a training still running or interrupted
    locks/DIGEST.lock          one builder at a time per artifact (other processes wait)

DIGEST hashes the key: everything that determines the artifact (specs, seed, the keys of the
artifacts it was built from, the artifact format version). A change of any input gives a new
digest, so only what depends on it is rebuilt. A finished entry whose manifest does not match
its files (truncated, corrupted, edited, or holding a file the manifest does not list) is
reported in one line, moved to ``KIND/.corrupt/`` and rebuilt; nothing unverified is loaded.
Temp folders (``KIND/.NAME-DIGEST.*``) left by a killed process are removed by the next
holder of the entry's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fct.errors import FCTError
from fct.io import atomic_dir, sha256_file, write_safetensors
from fct.scenarios import config_hash

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
META = "meta.json"
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$FCT_CACHE`` when set, else ``.fct-cache`` in the working directory."""
    return Path(os.environ.get("FCT_CACHE") or ".fct-cache")


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
        return config_hash({"key": self.key, "format": FORMAT_VERSION}, length=20)

    @property
    def path(self) -> Path:
        """Directory of the finished artifact."""
        return self.root / self.kind / f"{self.name}-{self.digest}"

    @property
    def partial(self) -> Path:
        """Directory for epoch checkpoints while the artifact is being trained."""
        return self.root / "partial" / self.kind / f"{self.name}-{self.digest}"

    def verify(self) -> bool:
        """True when the finished artifact exists and its files match its manifest.

        A present but damaged entry is logged, moved to ``KIND/.corrupt/`` and reported absent.
        """
        if not self.path.is_dir():
            return False
        problem = _check_manifest(self.path)
        if problem is None:
            return True
        log.warning("cache entry %s is damaged (%s); rebuilding it", self.path, problem)
        graveyard = self.root / self.kind / ".corrupt"
        graveyard.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, graveyard / f"{self.path.name}-{int(time.time() * 1000)}")
        return False

    def load(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata of the finished, verified artifact."""
        from safetensors.torch import load_file

        meta = json.loads((self.path / META).read_text())
        return load_file(str(self.path / TENSORS)), meta

    def save(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write the artifact into a temp directory, then rename it into place.

        The manifest is written last and the directory renamed into place after every file is
        fsynced, so a reader (or a later run after a crash) sees either no entry or a complete
        one. A full disk raises FCTError; entries already finished are untouched.
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
            (tmp / MANIFEST).write_text(
                json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2)
            )
        shutil.rmtree(self.partial, ignore_errors=True)


def _check_manifest(path: Path) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    for name in (TENSORS, META):
        f = path / name
        want = files.get(name)
        if want is None or not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{name} checksum mismatch"
    # The cache writes exactly these three files; anything else was put there by someone else
    # (a planted model.pt, say) and makes the whole entry untrusted.
    extra = sorted(p.name for p in path.iterdir() if p.name not in (TENSORS, META, MANIFEST))
    if extra:
        return f"unexpected file {extra[0]}"
    return None


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
        """The slot for an artifact of ``kind`` determined by ``key``."""
        return Entry(self.root, kind, name, key)

    @contextlib.contextmanager
    def lock(self, entry: Entry) -> Iterator[None]:
        """Hold the builder lock of ``entry`` (blocks while another process builds it)."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{entry.digest}.lock", "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s/%s", entry.kind, entry.name)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

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
        """
        from fct import distributed
        from fct.train import isolated_rng

        if not distributed.is_main():
            return self._follow(entry, build)
        with self.lock(entry):
            _remove_stale_temps(entry)
            hit = not force and entry.verify()
            # Under torchrun the other ranks wait for this decision (``_follow``); only rank 0
            # takes the lock, so a rank never blocks on a lock another rank of its run holds.
            distributed.broadcast_json(hit)
            if hit:
                tensors, meta = entry.load()
                return tensors, meta, False
            if force:  # a forced rebuild starts over, not from the last run's checkpoints
                shutil.rmtree(entry.partial, ignore_errors=True)
            with isolated_rng():
                tensors, meta = build(entry)
            entry.save(tensors, meta)
            meta = json.loads((entry.path / META).read_text())
            distributed.broadcast_json(meta)
            return tensors, meta, True

    def _follow(
        self, entry: Entry, build: Callable[[Entry], tuple[dict[str, torch.Tensor], dict]]
    ) -> tuple[dict[str, torch.Tensor], dict, bool]:
        """A non-zero rank's side of ``get_or_build``: read what rank 0 verified, or take part
        in the build (training and feature extraction are collective) and save nothing."""
        from fct import distributed
        from fct.train import isolated_rng

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
            shutil.rmtree(tmp, ignore_errors=True)
