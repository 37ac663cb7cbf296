"""Exact retrieval evaluation: query/gallery features in, CMC top-k, mAP and mAP@R out.

Distances come in bounded blocks of queries from one of two exact backends:

- ``torch``: ``|q|^2 + |g|^2 - 2 q.g`` with one GEMM per block, on the CPU (MKL's GEMM, or
  oneDNN's on AMD CPUs: see ``_use_onednn_gemm``) or a GPU.
- ``faiss``: faiss's flat (brute-force) pairwise distances; its GPU routine when the installed
  faiss has GPU support.

Both give squared L2 distances (the ranking of L2); ``cosine`` L2-normalises first. The
metrics themselves (fct.metrics) are shared, so the backends differ only in float rounding.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fct import metrics
from fct.errors import FCTError
from fct.models import onednn_linear_available

log = logging.getLogger(__name__)

DISTANCES = ("l2", "cosine")
BACKENDS = ("torch", "faiss")
# Per block: the distance rows, a fresh GEMM output or a copy expanded over duplicate gallery
# vectors, and small per-row-group copies and masks: under 16 bytes per entry.
DEFAULT_BLOCK_BYTES = 512 << 20


@dataclass(frozen=True)
class FeatureSet:
    """Embeddings with their class labels: ``features`` float32 [N, D], ``labels`` int64 [N]."""

    features: np.ndarray
    labels: np.ndarray
    name: str = "features"

    def __post_init__(self) -> None:
        check_features(self.features, self.labels, self.name)


def check_features(features: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Validate shapes and values; raise FCTError with a one-line fix on bad input."""
    if features.ndim != 2:
        raise FCTError(
            f"{name}: features must be 2-D [N, D], got shape {tuple(features.shape)}; reshape before saving"
        )
    if labels.ndim != 1:
        raise FCTError(f"{name}: labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if len(features) == 0:
        raise FCTError(f"{name}: the set is empty; it needs at least two items")
    if len(labels) != len(features):
        raise FCTError(
            f"{name}: {len(labels)} labels for {len(features)} feature rows; save one label per row"
        )
    if not np.issubdtype(features.dtype, np.floating):
        raise FCTError(
            f"{name}: features must be floating point, got {features.dtype}; save them as float32"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise FCTError(
            f"{name}: labels must be integers, got {labels.dtype}; save class ids as int64"
        )
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise FCTError(
            f"{name}: {int(bad.sum())} rows hold NaN or inf (first: row {int(np.argmax(bad))}); "
            "fix or drop them before evaluating"
        )


#: The most bytes the arrays of one npz may expand to: 64 GiB, e.g. 16M x 1024 float32 features.
NPZ_MAX_BYTES = 64 << 30
#: How many times its own size an npz may expand to, once over NPZ_FREE_BYTES. Embeddings
#: compress by a few percent (float32 noise), labels a lot, but a bomb by ~1000x: a 195 KB
#: file of zeros that would expand to 200 MB.
NPZ_MAX_RATIO = 100
#: Any npz may expand to this much, whatever its ratio (small sets, constant labels).
NPZ_FREE_BYTES = 64 << 20
#: Largest .npy header read (numpy's own default for untrusted files).
_NPY_MAX_HEADER = 10_000
_SAVE = "save with np.savez(path, features=..., labels=...)"


def _open_regular(path: Path):
    """``path`` opened for reading, only if it is a regular file (symlinks are followed).

    Opened without blocking, so a FIFO given as --query is refused at once instead of waiting
    forever for a writer.
    """
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as e:
        raise FCTError(
            f"{path}: no such file; pass an .npz with arrays 'features' and 'labels'"
        ) from e
    except OSError as e:
        raise FCTError(f"{path}: cannot be opened ({e.strerror or e}); pass a readable .npz") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FCTError(
                f"{path}: not a regular file (a folder, FIFO or device); pass an .npz file"
            )
        # Regular files ignore O_NONBLOCK, so the handle reads as usual from here.
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _npz_member(zf, names: dict[str, object], key: str, path: Path):
    """The zip entry of array ``key`` (``key.npy`` as np.savez names it, or bare ``key``)."""
    info = names.get(f"{key}.npy") or names.get(key)
    if info is None:
        has = sorted(n.removesuffix(".npy") for n in names)
        raise FCTError(f"{path}: missing key {key!r} (has {has}); {_SAVE}")
    return info


def _read_npy(zf, info, key: str, path: Path) -> np.ndarray:
    """Array ``key`` from its zip entry, checked before anything is allocated.

    The .npy header must declare a plain numeric dtype (object arrays would need pickle) and a
    shape whose byte size is exactly what the entry holds, so the one allocation made is the
    size the zip directory declared (already bounded by load_npz) and never more.
    """
    import zipfile
    import zlib

    from numpy.lib import format as npy

    with zf.open(info) as fh:
        try:
            version = npy.read_magic(fh)
            read_header = {
                (1, 0): npy.read_array_header_1_0,
                (2, 0): npy.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = read_header(fh, _NPY_MAX_HEADER)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error):
            raise
        except Exception as e:
            # numpy parses the header text with ast and, for old files, tokenize: a damaged
            # header raises SyntaxError, tokenize.TokenError, TypeError and more besides.
            raise ValueError(f"{key} has a damaged .npy header ({type(e).__name__})") from e
        if dtype.hasobject:
            raise FCTError(
                f"{path}: {key} is an object array, which is never loaded (it would run "
                "pickle); save a numeric array"
            )
        if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            raise FCTError(
                f"{path}: {key} has dtype {dtype}, not a plain number; save features as "
                "float32 and labels as int64"
            )
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        need = math.prod(shape) * dtype.itemsize
        held = info.file_size - fh.tell()
        if need != held:
            raise FCTError(
                f"{path}: {key} declares shape {shape} ({need} bytes of {dtype}) but holds "
                f"{held} bytes; the file is damaged, {_SAVE}"
            )
        try:
            flat = np.empty(math.prod(shape), dtype)
        except MemoryError as e:
            raise FCTError(
                f"{path}: {key} needs {need} bytes, more memory than is free; evaluate a "
                "smaller set or on a machine with more memory"
            ) from e
        view, done = memoryview(flat.view(np.uint8)), 0
        while done < need:
            n = fh.readinto(view[done : done + (64 << 20)])
            if not n:
                raise ValueError(f"{key} ends after {done} of {need} bytes")
            done += n
    return flat.reshape(shape, order="F" if fortran else "C")


def load_npz(path: str | os.PathLike[str]) -> FeatureSet:
    """Read an npz holding ``features`` [N, D] and ``labels`` [N].

    Built for files from anywhere: only a regular file is opened; the arrays' declared sizes
    (zip directory and .npy headers) are checked against the file's size (at most NPZ_MAX_RATIO
    times it beyond NPZ_FREE_BYTES, at most NPZ_MAX_BYTES) before anything is decompressed or
    allocated; object arrays and non-numeric dtypes are refused; features must have at least
    one column. Every refusal is an FCTError naming the file.
    """
    import zipfile
    import zlib

    path = Path(path)
    with _open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if fh.read(6) == b"\x93NUMPY":
            raise FCTError(f"{path}: a single .npy array, not an npz of two; {_SAVE}")
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as zf:
                names = {info.filename: info for info in zf.infolist()}
                members = [_npz_member(zf, names, key, path) for key in ("features", "labels")]
                expands = sum(info.file_size for info in members)
                limit = min(NPZ_MAX_BYTES, max(NPZ_FREE_BYTES, NPZ_MAX_RATIO * size))
                if expands > limit:
                    raise FCTError(
                        f"{path}: its arrays would expand to {expands} bytes from a {size}-byte "
                        f"file, over the {limit}-byte limit (a zip bomb, or a set too large for "
                        f"one file); {_SAVE}"
                    )
                features = _read_npy(zf, members[0], "features", path)
                labels = _read_npy(zf, members[1], "labels", path)
        except FCTError:
            raise
        except (
            ValueError,
            OSError,
            EOFError,
            zipfile.BadZipFile,
            zlib.error,
            NotImplementedError,  # a compression method zipfile lacks
            RuntimeError,  # an encrypted entry
        ) as e:
            raise FCTError(f"{path}: not a readable npz file ({e}); save with np.savez") from e
    if features.ndim == 2 and len(features) and features.shape[1] == 0:
        raise FCTError(
            f"{path}: features have shape {features.shape}, no value per item; save the "
            "embeddings [N, D] with D > 0"
        )
    return FeatureSet(
        np.ascontiguousarray(features, dtype=np.float32)
        if np.issubdtype(features.dtype, np.floating)
        else features,
        labels,
        name=str(path),
    )


def _prepare(x: np.ndarray, distance: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if distance == "cosine":
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norm, 1e-12)
    return x


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
    """Distinct rows of ``x`` and the index expanding them back (None when all are distinct)."""
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1])))
    _, first, inverse = np.unique(rows.ravel(), return_index=True, return_inverse=True)
    if len(first) == len(x):
        return x, None
    return x[first], torch.from_numpy(inverse.astype(np.int64))


def _faiss_module():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise FCTError("the faiss backend needs faiss: pip install faiss-cpu (or .[gpu])") from e
    return faiss


@functools.cache
def _use_onednn_gemm() -> bool:
    """Whether the torch backend's CPU GEMM goes through oneDNN instead of MKL (addmm).

    On AMD CPUs MKL picks slow kernels: for this GEMM ([512, 128] x [128, 10,000], float32)
    oneDNN ran 2.5x as fast on one core of a Zen 5 (docs/throughput.md saw the same for h).
    On an Intel Xeon MKL was the faster one, so oneDNN is used on AMD only.
    """
    if not onednn_linear_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


def faiss_has_gpu() -> bool:
    """Whether the installed faiss has GPU support and sees a GPU (False without faiss)."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class PoolClosed(Exception):
    """The consumer of a BufferPool's blocks stopped (an error, or it was done)."""


class BufferPool:
    """Distance-block buffers [rows, cols], taken by the thread computing distances and given
    back by the threads scoring them: a buffer is never rewritten while a block in it is in
    use, however the threads are timed. At most ``count`` buffers are made."""

    def __init__(self, count: int, rows: int, cols: int) -> None:
        import queue
        import threading

        self._count, self._shape = count, (rows, cols)
        self._free: queue.Queue = queue.Queue()
        self._owner: dict[int, torch.Tensor] = {}
        self._closed = threading.Event()

    def take(self, rows: int) -> torch.Tensor:
        """A free buffer's first ``rows`` rows (waits for one once ``count`` are out)."""
        import queue

        if len(self._owner) < self._count:
            t = torch.empty(self._shape, dtype=torch.float32)
            self._owner[t.data_ptr()] = t
            return t[:rows]
        while not self._closed.is_set():
            try:
                return self._free.get(timeout=0.1)[:rows]
            except queue.Empty:
                continue
        raise PoolClosed

    def give(self, block: torch.Tensor) -> None:
        """Hand back the buffer ``block`` lives in (a block from elsewhere is ignored)."""
        t = self._owner.get(block.data_ptr())
        if t is not None:
            self._free.put(t)

    def close(self) -> None:
        """Wake and stop a producer waiting in ``take``."""
        self._closed.set()


def distance_blocks(
    query: np.ndarray,
    gallery: np.ndarray,
    backend: str = "torch",
    device: str = "cpu",
    block_rows: int = 1024,
    *,
    pool: BufferPool | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_query_row, squared L2 distances [b, N] as CPU float32)`` blocks.

    With a ``pool`` (rows at least ``block_rows``), blocks go into the pool's reused buffers
    wherever the backend lets its output go to a given array, and the caller hands each block
    back with ``pool.give`` when done: a fresh block of this size is new pages that the
    kernel faults in and zeroes, one by one.
    """
    if backend not in BACKENDS:
        raise FCTError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    rows = max(1, min(block_rows, len(query)))

    def target(b: int) -> torch.Tensor:
        """Where the next block's [b, N] distances go."""
        if pool is not None:
            return pool.take(b)
        return torch.empty((b, len(gallery)), dtype=torch.float32)

    if backend == "torch":
        dev = torch.device(device)
        g = torch.from_numpy(gallery).to(dev)
        g_sq = (g * g).sum(1)
        # Scaling g by -2 is exact, so either GEMM gives -2 q.g + |g|^2 up to float rounding.
        onednn = dev.type == "cpu" and _use_onednn_gemm()
        if onednn:
            g_packed = torch.ops.mkldnn._reorder_linear_weight(-2.0 * g, rows)
        for s in range(0, len(query), block_rows):
            q = torch.from_numpy(query[s : s + block_rows]).to(dev)
            if onednn:
                d = torch.ops.mkldnn._linear_pointwise(q, g_packed, g_sq, "none", [], "")
            elif dev.type == "cpu":
                d = torch.addmm(g_sq[None, :], q, g.T, beta=1.0, alpha=-2.0, out=target(len(q)))
            else:
                d = torch.addmm(g_sq[None, :], q, g.T, beta=1.0, alpha=-2.0)
            d += (q * q).sum(1, keepdim=True)
            d.clamp_min_(0)
            yield s, d if dev.type == "cpu" else target(len(q)).copy_(d)
    else:
        faiss = _faiss_module()
        gpu = device.startswith("cuda") and faiss_has_gpu()
        res = faiss.StandardGpuResources() if gpu else None
        dim = gallery.shape[1]
        gallery = np.ascontiguousarray(gallery, dtype=np.float32)
        for s in range(0, len(query), block_rows):
            q = np.ascontiguousarray(query[s : s + block_rows], dtype=np.float32)
            d = target(len(q))
            dn = d.numpy()
            if gpu:
                dn[...] = faiss.pairwise_distance_gpu(res, q, gallery, metric=faiss.METRIC_L2)
            else:
                # faiss.pairwise_distances without its fresh output array.
                faiss.pairwise_L2sqr(
                    dim,
                    len(q),
                    faiss.swig_ptr(q),
                    len(gallery),
                    faiss.swig_ptr(gallery),
                    faiss.swig_ptr(dn),
                )
            np.maximum(dn, 0, out=dn)
            yield s, d


def _prefetched(
    blocks: Iterator[tuple[int, torch.Tensor]], pool: BufferPool
) -> Iterator[tuple[int, torch.Tensor]]:
    """``blocks``, produced ahead in a background thread (errors re-raised here)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in blocks:
                if not put(item):
                    return
            put(done)
        except PoolClosed:
            return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    worker = threading.Thread(target=produce, name="fct-distances", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        pool.close()
        worker.join()


def evaluate(
    query: FeatureSet,
    gallery: FeatureSet | None = None,
    *,
    paired: bool = False,
    distance: str = "l2",
    backend: str = "torch",
    device: str = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
    hits: bool = False,
    ranking: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Evaluate retrieval of ``query`` against ``gallery``.

    Without a gallery the query set is its own gallery, leave-one-out. ``paired`` says query i
    and gallery i are the same item encoded by two models (the cross-model case): each query's
    own gallery entry is excluded, as in leave-one-out. A separate gallery without ``paired``
    (a query set apart from the gallery) excludes nothing. Returns top1, top5, mAP, mAP@R
    (percent), n_query (queries scored), n_skipped (queries with no same-class item in the
    gallery, left out of every metric), n_gallery, distance and backend; and the ``ranking``
    metrics asked (fct.metrics.ranking_summary: recall@k, mrr@10).

    With ``hits=True`` it also returns, for flip rates (fct.flips), ``hits``: a bool array with
    one entry per query in query order, true where the first-ranked item is of the query's class
    (top-1's own test and tie rule), and ``scored``: a bool array, true for the queries scored
    (``hits`` is false for the skipped ones, which are not misses: mask them with ``scored``).
    Neither is a record value: the runner drops them before writing.
    """
    if distance not in DISTANCES:
        raise FCTError(f"unknown distance '{distance}'; choose one of {', '.join(DISTANCES)}")
    if backend not in BACKENDS:
        raise FCTError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    self_pairs = gallery is None or paired
    if gallery is None:
        gallery = query
    if query.features.shape[1] != gallery.features.shape[1]:
        raise FCTError(
            f"feature size differs: query {query.features.shape[1]}-d, gallery "
            f"{gallery.features.shape[1]}-d; both sets must come from one embedding space"
        )
    if paired and (
        len(query.labels) != len(gallery.labels) or not np.array_equal(query.labels, gallery.labels)
    ):
        raise FCTError(
            "--paired needs the same items in the same order in query and gallery "
            f"({len(query.labels)} vs {len(gallery.labels)} items, or labels differ); drop --paired for unrelated sets"
        )
    q = _prepare(query.features, distance)
    g = _prepare(gallery.features, distance)
    index = metrics.GalleryIndex(gallery.labels)
    g = g[index.perm]
    n = len(g)
    # Exact duplicate gallery vectors must get bit-identical distances, or GEMM rounding (which
    # differs by column position and by backend) would decide their tie order: compute each
    # distinct vector once and copy its column.
    g_unique, expand = _unique_rows(g)
    # Blocks are scored by `workers` threads at once (numpy's partition, sort and searches
    # release the GIL), while a further thread computes the next block's distances.
    workers = max(1, min(4, torch.get_num_threads()))
    # 512-row blocks keep the GEMM output in cache-friendly sizes; fewer when memory is short
    # (the budget is shared by the blocks in flight).
    block_rows = int(max(1, min(len(q), 512, block_bytes // (16 * n * workers))))
    # Buffers: enough for every scoring thread, the block waiting for one, the one in the
    # prefetch queue and the one being written; each is handed back once scored.
    pool = BufferPool(workers + 3, block_rows, len(g_unique))
    feed = _prefetched(
        distance_blocks(
            q, g_unique, backend=backend, device=device, block_rows=block_rows, pool=pool
        ),
        pool,
    )
    blocks: Iterator[tuple[int, torch.Tensor]] = feed
    if progress:
        from tqdm import tqdm

        blocks = tqdm(
            blocks, total=-(-len(q) // block_rows), desc="evaluate", unit="block", leave=False
        )

    def score(s: int, block: torch.Tensor) -> dict:
        d = block if expand is None else torch.index_select(block, 1, expand)
        if d is not block:
            pool.give(block)  # the expanded copy is all that is needed from here
        e = s + d.shape[0]
        self_index = np.arange(s, e) if self_pairs else None
        try:
            # One thread per block when blocks are scored in parallel (no nested pools).
            inner = 1 if workers > 1 else None
            return metrics.block_metrics(d, query.labels[s:e], self_index, index, threads=inner)
        finally:
            if d is block:
                pool.give(block)

    results = []
    try:
        if workers == 1:
            results = [score(s, d) for s, d in blocks]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers, thread_name_prefix="fct-metrics") as executor:
                pending = []
                for s, d in blocks:
                    if len(pending) == workers:  # at most one block per scoring thread
                        results.append(pending.pop(0).result())
                    pending.append(executor.submit(score, s, d))
                results.extend(f.result() for f in pending)
    finally:
        feed.close()  # stops the distance thread, also when scoring failed
    out: dict[str, Any] = dict(metrics.summarize(results))
    if out["n_query"] == 0:
        raise FCTError(
            "no query has a same-class item in the gallery, so nothing can be scored; "
            "check that query and gallery labels use the same class ids"
        )
    out.update(n_gallery=n, distance=distance, backend=backend)
    out.update(metrics.ranking_summary(results, tuple(ranking)) if ranking else {})
    if hits:
        first = np.concatenate([r.first_rank for r in results])
        out["hits"], out["scored"] = first == 1, first > 0
    return out
