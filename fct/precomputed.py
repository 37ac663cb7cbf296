"""Stored embeddings: a scenario on embeddings the user brings instead of images.

A set of embeddings is one ``.npz`` file or one folder of ``.npy`` files, with the arrays

- ``old`` ``[N, d_old]``: the old model's embeddings (required),
- ``new`` ``[N, d_new]``: the new model's embeddings of the same N items, in the same order,
- ``labels`` ``[N]``: integer class (or relevance-group) ids,
- ``side`` ``[N, d_side]``: optional side-information (FCT + side-info).

A folder's ``.npy`` files are memory-mapped (``np.load(mmap_mode="r")``), so they are read as
they are used; an ``.npz`` is read with the checks of fct.retrieval (sizes and headers checked
before anything is allocated). Every check is an FCTError of one line naming the file.

A scenario names a training set (what h and the adapters are fitted on) and an evaluation set
(queries and gallery, leave-one-out). Its models are ``StoredModel`` handles: what the
Context hands a method where an image scenario hands a trained model; their digests are the
files' (sha256, streamed), so a changed file gives new records and a new h.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fct.errors import FCTError

#: The arrays of a set; ``side`` is optional.
ARRAYS = ("old", "new", "labels", "side")
REQUIRED = ("old", "new", "labels")
#: Rows checked for NaN and inf at a time (memory-mapped arrays are never read whole).
CHECK_ROWS = 65536
#: Largest class id FastFill's class-mean classifier accepts (it allocates one row per id).
MAX_CLASS_ID = 100_000
_FORMAT = "save with np.savez(path, old=..., new=..., labels=...[, side=...]) or one .npy per array"


@dataclass
class EmbeddingSet:
    """The arrays of one stored set (numpy arrays, memory-mapped for a folder of .npy)."""

    path: Path
    arrays: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.arrays["labels"])

    def dim(self, name: str) -> int | None:
        """The embedding size of array ``name`` (None when the set has no such array)."""
        a = self.arrays.get(name)
        return None if a is None else int(a.shape[1])


def _header(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy file from its header only."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as fh:
            version = npy.read_magic(fh)
            read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read[version](fh, 10_000)
    except FileNotFoundError as e:
        raise FCTError(f"{path}: missing array '{name}'; {_FORMAT}") from e
    except (OSError, ValueError, SyntaxError, TypeError) as e:
        raise FCTError(f"{path}: not a readable .npy file ({e}); {_FORMAT}") from e
    return shape, dtype


def _load_folder(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in ARRAYS:
        p = folder / f"{name}.npy"
        if name == "side" and not (p.exists() or p.is_symlink()):
            continue
        if not p.is_file():
            raise FCTError(f"{folder}: missing {name}.npy; {_FORMAT}")
        shape, dtype = _header(p, name)
        _check_dtype(folder, name, dtype)
        try:
            out[name] = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FCTError(f"{p}: cannot be memory-mapped ({e}); {_FORMAT}") from e
        if tuple(out[name].shape) != tuple(shape):
            raise FCTError(f"{p}: damaged (its header and its size disagree); {_FORMAT}")
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz, with fct.retrieval's checks (regular file, sizes bounded by the
    file's size, headers checked before anything is allocated, no object arrays)."""
    import zipfile
    import zlib

    from fct.retrieval import NPZ_FREE_BYTES, NPZ_MAX_BYTES, NPZ_MAX_RATIO, _open_regular, _read_npy

    out = {}
    with _open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            with zipfile.ZipFile(fh) as zf:
                names = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
                for name in REQUIRED:
                    if name not in names:
                        raise FCTError(
                            f"{path}: no array '{name}' (has {sorted(names)}); {_FORMAT}"
                        )
                members = {n: names[n] for n in ARRAYS if n in names}
                expands = sum(info.file_size for info in members.values())
                limit = min(NPZ_MAX_BYTES, max(NPZ_FREE_BYTES, NPZ_MAX_RATIO * size))
                if expands > limit:
                    raise FCTError(
                        f"{path}: its arrays would expand to {expands} bytes from a {size}-byte "
                        f"file, over the {limit}-byte limit; store a large set as a folder of .npy"
                    )
                for name, info in members.items():
                    out[name] = _read_npy(zf, info, name, path)
        except FCTError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise FCTError(f"{path}: not a readable npz file ({e}); {_FORMAT}") from e
        except (NotImplementedError, RuntimeError) as e:
            raise FCTError(f"{path}: not a readable npz file ({e}); {_FORMAT}") from e
    for name, a in out.items():
        _check_dtype(path, name, a.dtype)
    return out


def _check_dtype(where: Path, name: str, dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.fields is not None:
        raise FCTError(f"{where}: '{name}' is not a plain numeric array; {_FORMAT}")
    if name == "labels":
        if not np.issubdtype(dtype, np.integer):
            raise FCTError(f"{where}: labels must be integers, got {dtype}; save them as int64")
    elif not np.issubdtype(dtype, np.floating):
        raise FCTError(f"{where}: '{name}' must be floating point, got {dtype}; save float32")


def open_set(path: Path) -> EmbeddingSet:
    """The set at ``path`` (an .npz or a folder of .npy), its shapes checked (not its values:
    ``check_values`` reads them)."""
    path = Path(path)
    if path.is_dir():
        arrays = _load_folder(path)
    elif path.exists() or path.is_symlink():
        arrays = _load_npz(path)
    else:
        raise FCTError(f"{path}: no such file or folder; check the scenario's embeddings paths")
    s = EmbeddingSet(path, arrays)
    labels = arrays["labels"]
    if labels.ndim != 1:
        raise FCTError(f"{path}: labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if len(labels) < 2:
        raise FCTError(f"{path}: {len(labels)} rows; a set needs at least two items")
    for name in ("old", "new", "side"):
        a = arrays.get(name)
        if a is None:
            continue
        if a.ndim != 2 or a.shape[1] == 0:
            raise FCTError(
                f"{path}: '{name}' must be 2-D [N, D] with D > 0, got shape {tuple(a.shape)}"
            )
        if len(a) != len(labels):
            raise FCTError(
                f"{path}: '{name}' has {len(a)} rows but labels {len(labels)}; every array "
                "holds one row per item, in the same order"
            )
    return s


def check_values(s: EmbeddingSet) -> None:
    """No NaN or inf in any embedding array, read in chunks of CHECK_ROWS rows."""
    for name in ("old", "new", "side"):
        a = s.arrays.get(name)
        if a is None:
            continue
        for i in range(0, len(a), CHECK_ROWS):
            bad = ~np.isfinite(np.asarray(a[i : i + CHECK_ROWS])).all(axis=1)
            if bad.any():
                row = i + int(np.argmax(bad))
                raise FCTError(
                    f"{s.path}: '{name}' row {row} holds NaN or inf; fix or drop it and save again"
                )


def check_pair(train: EmbeddingSet, evals: EmbeddingSet) -> None:
    """The training and evaluation sets come from the same models: equal sizes, side in both."""
    for name in ("old", "new", "side"):
        a, b = train.dim(name), evals.dim(name)
        if (a is None) != (b is None):
            has, lacks = (train, evals) if a is not None else (evals, train)
            raise FCTError(
                f"{has.path} has '{name}' but {lacks.path} has not; give both sets or neither"
            )
        if a != b:
            raise FCTError(
                f"'{name}' is {a}-d in {train.path} but {b}-d in {evals.path}; both sets must "
                "come from the same models"
            )


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's .npy files (names and contents), streamed; kept per
    process by (path, size, mtime, inode), so a suite's records hash each file once."""
    from fct.io import sha256_regular

    path = Path(path)
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    try:
        sig = tuple((str(f.resolve()), *_stat_sig(f)) for f in files)
    except OSError as e:
        raise FCTError(f"{path}: cannot be read ({e.strerror or e}); check the path") from e
    if sig not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            try:
                digest, _ = sha256_regular(f.resolve())
            except (OSError, ValueError) as e:
                raise FCTError(f"{f}: cannot be read ({e}); pass regular files") from e
            h.update(f"{f.name}\0{digest}\0".encode())
        _DIGESTS[sig] = h.hexdigest()
    return _DIGESTS[sig]


def _stat_sig(f: Path) -> tuple[int, int, int]:
    st = f.stat()
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{f} is not a regular file")
    return st.st_size, st.st_mtime_ns, st.st_ino


def header_dims(path: Path) -> dict[str, int | None]:
    """The embedding sizes of a set, from its headers (what a suite needs to load)."""
    s = open_set(path)
    return {name: s.dim(name) for name in ("old", "new", "side")}


@dataclass(frozen=True)
class StoredEntry:
    """The part of a cache entry that records read of a model (kind, name, digests)."""

    kind: str
    name: str
    digest: str

    def weights_digest(self) -> str:
        return self.digest[:20]


@dataclass
class StoredModel:
    """A model known only by its stored embeddings: what the Context hands a method in an
    embedding scenario where an image scenario hands a trained model (fct.session.Trained).

    ``role`` is ``old``, ``new`` or ``side``; ``spec`` the scenario's model spec of that role
    (its ``embedding_dim`` is the files'); ``data`` the scenario's ``StoredData``."""

    role: str
    spec: Any
    data: StoredData = field(repr=False)
    train_seconds: float = 0.0
    built_now: bool = False
    module: Any = None

    @property
    def entry(self) -> StoredEntry:
        return StoredEntry("embeddings", self.name, self.digest)

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.role}\0{self.data.digest()}".encode()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.role}-{self.data.train_path.stem}"

    @property
    def in_chans(self) -> int:
        raise FCTError("stored embeddings have no image model; use a method on embeddings only")

    def classifier_weight(self):
        """Stored embeddings come without a classifier: the class means of this model's
        training embeddings stand in for it (a nearest-class-mean classifier), one row per
        class id 0..max; FastFill's classification term reads it."""
        import torch

        feats, labels = self.data.tensors("train", self.role)
        if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= MAX_CLASS_ID:
            raise FCTError(
                f"{self.data.train_path}: a classifier from class means needs labels in "
                f"[0, {MAX_CLASS_ID}); FastFill cannot run on these labels"
            )
        k = int(labels.max()) + 1
        sums = torch.zeros(k, feats.shape[1]).index_add_(0, labels, feats.float())
        counts = torch.bincount(labels, minlength=k).clamp_min(1)
        return sums / counts[:, None]


class StoredData:
    """A scenario's stored sets, opened once and checked: ``paths`` by split, ``train`` and
    either ``eval`` (queries and gallery, leave-one-out) or ``query`` and ``gallery``."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = {k: Path(v) for k, v in paths.items()}
        self.train_path = self.paths["train"]
        #: Queries apart from the gallery (``query`` and ``gallery`` files) or not (``eval``).
        self.split = "query" in self.paths
        self._sets: dict[str, EmbeddingSet] = {}
        self._checked = False

    def set(self, split: str) -> EmbeddingSet:
        if split not in self._sets:
            self._sets[split] = open_set(self.paths[split])
        return self._sets[split]

    def check(self) -> None:
        """Shapes, dtypes, row counts, matching sizes between the sets, finite values."""
        if self._checked:
            return
        train = self.set("train")
        for split in self.paths:
            if split != "train":
                check_pair(train, self.set(split))
        for split in self.paths:
            check_values(self.set(split))
        self._checked = True

    def digest(self) -> str:
        text = "\0".join(f"{k}={file_digest(p)}" for k, p in sorted(self.paths.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    def tensors(self, split: str, role: str):
        """(embeddings float32 [N, d], labels int64 [N]) as torch tensors (copied into memory:
        the evaluation and the fits work on in-memory tensors)."""
        import torch

        self.check()
        s = self.set(split)
        a = s.arrays.get(role)
        if a is None:
            raise FCTError(f"{s.path}: no '{role}' array; add it or drop the methods that use it")
        x = torch.from_numpy(np.array(a, dtype=np.float32))
        y = torch.from_numpy(np.array(s.arrays["labels"], dtype=np.int64))
        return x, y
