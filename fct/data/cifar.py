"""CIFAR-100 from torchvision's on-disk layout, read with a pickle loader that runs no code."""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct.data.base import (
    DATASETS,
    ImageSource,
    check_split,
    read_data_file,
    search_bases,
    torchvision_download,
)
from fct.errors import FCTError

FOLDER = "cifar-100-python"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
LAYOUT = f"expected DIR/{FOLDER}/{{train,test,meta}} (torchvision's CIFAR100 layout)"

#: The real ``train`` file is 158 MB (50,000 rows of 3072 bytes, written by Python 2). A copy
#: re-pickled by Python 3 in protocol 2 stores each byte over 127 as two (UTF-8 inside
#: ``_codecs.encode``), up to 310 MB; anything larger is not a CIFAR-100 file.
MAX_FILE_BYTES = 320 << 20
#: Images per split in CIFAR-100; fabricated copies may hold fewer, never more.
SPLIT_SIZES = {"train": 50_000, "test": 10_000}
ROW_BYTES = 3 * 32 * 32
#: The dtypes a numeric array in a pickle may have (numpy pickles them by these names).
_NUMERIC = frozenset(["b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"])
#: How far a pickle's error text is quoted: enough to name the problem, never a flood.
_DETAIL = 200

# A CIFAR pickle needs four globals: numpy's array reconstruction (the 'data' entry), the
# ndarray and dtype classes it is given, and the byte-string encoder Python 3 uses in
# protocol-2 pickles. None of them is handed to the unpickler as itself: each is a stand-in
# that checks its arguments and builds only inert objects. Handing over numpy's own would let
# a crafted file call ndarray(shape, dtype, buffer, offset, strides) with zero strides (a
# 107-byte file that reads as 1,000,000 images, 3 GB once copied), or run ndarray.__setstate__
# on any shape and dtype. Every other global is refused, so no file can import a module or
# call a function such as os.system.


class _Guard:
    """Base of the stand-ins: no attributes to set, and no BUILD (``__setstate__``) on them."""

    __slots__ = ()
    name = "?"

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"refusing to set the state of {self.name}")

    def __call__(self, *args: Any) -> Any:
        raise pickle.UnpicklingError(f"refusing to call {self.name}")


class _NDArrayClass(_Guard):
    """``numpy.ndarray``: only an argument of _reconstruct, never called."""

    __slots__ = ()
    name = "numpy.ndarray"


_NDARRAY = _NDArrayClass()
_B = (b"b", "b")


class _PendingArray:
    """What _reconstruct returns: an array whose data comes with the pickle's BUILD.

    ``__setstate__`` takes numpy's array state, ``(version, shape, dtype, fortran, data)``,
    and checks it before making anything: a numeric dtype, at most 4 non-negative dims, and a
    data string exactly as long as the shape says. The data is in the file, so nothing built
    can be larger than the file (already bounded by MAX_FILE_BYTES).
    """

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise pickle.UnpicklingError("an array's state is set twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an array state is not numpy's 4- or 5-tuple")
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(dtype, _PendingDType) or dtype.dtype is None:
            raise pickle.UnpicklingError("an array's dtype is not a plain numeric dtype")
        if (
            not isinstance(shape, tuple)
            or len(shape) > 4
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise pickle.UnpicklingError(f"an array has the implausible shape {shape!r:.80}")
        if isinstance(data, str):  # Python 2 byte strings arrive decoded as latin1
            data = data.encode("latin1")
        if not isinstance(data, bytes):
            raise pickle.UnpicklingError(f"an array's data is a {type(data).__name__}, not bytes")
        need = math.prod(shape) * dtype.dtype.itemsize
        if need != len(data):
            raise pickle.UnpicklingError(
                f"an array declares shape {shape} ({need} bytes of {dtype.dtype}) but holds "
                f"{len(data)} bytes"
            )
        # A copy: writable (torch.from_numpy needs that) and independent of the pickle's bytes.
        flat = np.frombuffer(data, dtype=dtype.dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy(order="C")


class _Reconstruct(_Guard):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``, the only call numpy's
    pickles make: it returns an empty _PendingArray for BUILD to fill."""

    __slots__ = ()
    name = "numpy _reconstruct"

    def __call__(self, *args: Any) -> _PendingArray:
        # numpy passes the dtype char 'b' as bytes (Python 3) or as str (Python 2 files).
        if len(args) != 3 or args[0] is not _NDARRAY or args[1] != (0,) or args[2] not in _B:
            raise pickle.UnpicklingError("numpy _reconstruct called with unusual arguments")
        return _PendingArray()


class _PendingDType:
    """What ``numpy.dtype(name, align, copy)`` returns: a numeric dtype, its byte order set by
    the BUILD that follows (subarrays, fields and object dtypes are refused)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype: np.dtype | None = None

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])
        if (
            self.dtype is not None
            or not isinstance(state, tuple)
            or not 5 <= len(state) <= 9
            or state[1] not in ("<", ">", "|", "=")
            or any(x is not None for x in state[2:5])
        ):
            raise pickle.UnpicklingError(f"dtype {self.name} has an unusual state")
        dtype = np.dtype(self.name)
        self.dtype = dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype


class _DType(_Guard):
    """``numpy.dtype``, called with a numeric type name only."""

    __slots__ = ()
    name = "numpy.dtype"

    def __call__(self, *args: Any) -> _PendingDType:
        if not args or len(args) > 3 or args[0] not in _NUMERIC:
            name = args[0] if args else None
            raise pickle.UnpicklingError(f"refusing dtype {name!r:.40}: not a plain number")
        return _PendingDType(args[0])


class _Encode(_Guard):
    """``_codecs.encode(text, 'latin1')``: how Python 3 writes bytes in protocol 2. Only the
    latin-1 codec: any other name would make Python import ``encodings.<name>``."""

    __slots__ = ()
    name = "_codecs.encode"

    def __call__(self, *args: Any) -> bytes:
        codec = args[1] if len(args) == 2 else None
        if not isinstance(args[0] if args else None, str) or codec not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {codec!r:.40}")
        return args[0].encode("latin-1")


class _Bytes(_Guard):
    """``bytes()``: how Python 3 writes an empty bytes object in protocol 2."""

    __slots__ = ()
    name = "bytes"

    def __call__(self, *args: Any) -> bytes:
        if args:
            raise pickle.UnpicklingError("refusing bytes() with arguments")
        return b""


_SAFE_GLOBALS: dict[tuple[str, str], _Guard] = {
    ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType(),
    ("_codecs", "encode"): _Encode(),
    ("__builtin__", "bytes"): _Bytes(),
    ("builtins", "bytes"): _Bytes(),
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the stand-ins above."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _finish(obj: Any, depth: int = 2) -> Any:
    """``obj`` with every filled _PendingArray (in dicts and lists, ``depth`` levels down)
    replaced by its numpy array; one never filled means the file is damaged."""
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise pickle.UnpicklingError("an array has no data (its BUILD is missing)")
        return obj.array
    if depth and isinstance(obj, dict):
        return {k: _finish(v, depth - 1) for k, v in obj.items()}
    if depth and isinstance(obj, list):
        return [_finish(v, depth - 1) for v in obj]
    return obj


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle a CIFAR-style file (plain containers and numpy arrays only).

    Keys are decoded as latin1 like torchvision does, so Python 2 str keys come back as str.
    Only a regular file of at most MAX_FILE_BYTES is read. Anything that is not plain data
    (a global other than numpy's array pieces, an array whose shape does not match its bytes,
    an operation on the wrong kind of object), or a truncated file, raises FCTError naming it.
    """
    fix = "delete it and get it again"
    raw = read_data_file(path, MAX_FILE_BYTES, fix)
    try:
        return _finish(_SafeUnpickler(io.BytesIO(raw), encoding="latin1").load())
    except pickle.UnpicklingError as e:
        raise FCTError(f"{path} is not a plain CIFAR data file ({str(e):.{_DETAIL}}); {fix}") from e
    except Exception as e:
        # Whatever a crafted file makes the unpickler raise (an APPEND on a dict: AttributeError,
        # a bad memo index: KeyError, a huge declared length: MemoryError) is a damaged file.
        raise FCTError(
            f"{path} is corrupt or not a CIFAR data file ({type(e).__name__}: "
            f"{str(e):.{_DETAIL}}); {fix}"
        ) from e


def _str_keys(entry: Any, path: Path) -> dict[str, Any]:
    """The entry with str keys (files unpickled with encoding='bytes' have bytes keys)."""
    if not isinstance(entry, dict):
        raise FCTError(
            f"{path} holds a {type(entry).__name__}, not a dict; delete it and get it again"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def find_cifar100(root: str | os.PathLike[str] | None = None, download: bool = False) -> Path:
    """The ``cifar-100-python`` folder: under root, ``$FCT_DATA`` or the download cache."""
    looked = []
    for base in search_bases(root):
        # DIR/cifar100/ lets one data root hold every dataset, as for the other datasets.
        for folder in (base / FOLDER, base / "cifar100" / FOLDER, base):
            if (folder / "train").is_file() and (folder / "test").is_file():
                return folder
            looked.append(str(folder))
    if download:
        return _download(root)
    raise FCTError(
        f"CIFAR-100 not found; looked in: {', '.join(looked)}; {LAYOUT}. Pass --data-root DIR "
        "or --download"
    )


def _download(root: str | os.PathLike[str] | None) -> Path:
    """Download through torchvision, which unpacks into DIR/cifar-100-python."""
    from torchvision.datasets import CIFAR100

    return torchvision_download(CIFAR100, "CIFAR-100", root, LAYOUT) / FOLDER


def _class_names(folder: Path) -> tuple[str, ...] | None:
    """Fine label names from ``meta`` when present (they are informative, not required)."""
    path = folder / "meta"
    if not path.is_file():
        return None
    names = _str_keys(safe_load_pickle(path), path).get("fine_label_names")
    if not names:
        return None
    if (
        not isinstance(names, list | tuple)
        or len(names) != 100
        or not all(isinstance(n, str | bytes) for n in names)
    ):
        raise FCTError(
            f"{path}: 'fine_label_names' is not a list of 100 names; delete it and get it again"
        )
    return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)


def _images(value: Any, path: Path, split: str) -> np.ndarray:
    """``data`` as uint8 [N, 3, 32, 32], refused unless it is exactly CIFAR's uint8 [N, 3072].

    Nothing is cast: float or wider integer pixels would wrap or truncate silently.
    """
    fix = "delete it and get it again"
    if not isinstance(value, np.ndarray):
        raise FCTError(f"{path}: 'data' is a {type(value).__name__}, not a uint8 array; {fix}")
    if value.dtype != np.uint8:
        raise FCTError(
            f"{path}: 'data' holds {value.dtype} values, not uint8 pixels (0-255); {fix}"
        )
    if value.ndim != 2 or value.shape[1] != ROW_BYTES or len(value) > SPLIT_SIZES[split]:
        raise FCTError(
            f"{path}: 'data' has shape {value.shape}, not [N, {ROW_BYTES}] with N at most "
            f"{SPLIT_SIZES[split]} (CIFAR-100 {split}); {fix}"
        )
    return value.reshape(-1, 3, 32, 32)


def _fine_labels(value: Any, path: Path, count: int) -> np.ndarray:
    """``fine_labels`` as int64 [count]: a list of ints (or an integer array) in 0..99."""
    fix = "delete it and get it again"
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        ok = not len(value) or (value.min() >= 0 and value.max() <= 99)
    elif isinstance(value, list | tuple):
        # Checked as Python ints first: 2**70 or a string must be refused, not overflow or cast.
        ok = all(type(v) is int and 0 <= v <= 99 for v in value)
    else:
        raise FCTError(f"{path}: 'fine_labels' is a {type(value).__name__}, not a list; {fix}")
    if not ok:
        raise FCTError(f"{path}: 'fine_labels' holds values other than class ids 0..99; {fix}")
    if len(value) != count:
        raise FCTError(f"{path}: {len(value)} fine_labels for {count} images; {fix}")
    return np.asarray(value, dtype=np.int64)


@DATASETS.register("cifar100")
def load_cifar100(split: str, root: str | None = None, download: bool = False) -> ImageSource:
    """CIFAR-100 ``split`` with fine labels: 32x32 RGB, 100 classes, 50000 train / 10000 test."""
    check_split(split)
    folder = find_cifar100(root, download)
    path = folder / split
    entry = _str_keys(safe_load_pickle(path), path)
    missing = [k for k in ("data", "fine_labels") if k not in entry]
    if missing:
        raise FCTError(f"{path} lacks CIFAR-100 {missing[0]!r}; {LAYOUT}")
    data = _images(entry["data"], path, split)
    labels = _fine_labels(entry["fine_labels"], path, len(data))
    return ImageSource(
        name="cifar100",
        labels=labels,
        num_classes=100,
        channels=3,
        image_size=32,
        mean=MEAN,
        std=STD,
        images=torch.from_numpy(np.ascontiguousarray(data)),
        class_names=_class_names(folder),
    )
