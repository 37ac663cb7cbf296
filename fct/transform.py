"""``fct transform``: stream a gallery of stored embeddings on disk through a trained map (FCT's
h or a gallery-side adapter; with ``--queries``, new-model queries through a query-side adapter).

Layout (docs/transform.md):

- ``--in DIR``: the gallery, one or more shards ``NAME.npy`` (2-D ``[N_i, d_old]``, float32 or
  float16, C order), processed in name order. Entries whose name starts with ``.`` are
  ignored; anything else that is not a regular ``.npy`` file is refused.
- ``--side DIR`` (h trained with side-information only, and then required): a shard of the
  same NAME per gallery shard, ``[N_i, d_side]``, row i the side-information of row i.
- ``--out DIR``: ``NAME.npy`` per shard, ``[N_i, d_new]`` in the input shard's dtype (h runs in
  float32), and ``.fct-transform/``: ``run.json`` (which weights made the folder) and one
  record per finished shard, ``shards/NAME.json`` (the input's and side shard's size and mtime, the
  output's size and sha256, written after the output).

Every shard is checked (header, dtype, width, matching side shard) before anything is written.
Each output is written to a temp file beside it and renamed into place (fct.io.atomic_path),
so an output is whole or absent; a NaN or infinite row stops the run naming the shard and
row, with the shards finished so far kept. A rerun skips every shard whose record still
matches (same weights, same input size and mtime, output of the recorded size and sha256), so a
run killed at any moment resumes and ends with the bytes of an uninterrupted run.

Under torchrun each rank takes the shards ``assign`` gives it (deterministic, balanced by rows)
and alone writes them; no collective is needed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct.errors import FCTError

if TYPE_CHECKING:  # torch loads with the command, not with the parser
    import torch

    from fct.transform_models import Mapper

log = logging.getLogger(__name__)

STATE = ".fct-transform"
FORMAT = 1
DTYPES = (np.dtype("float32"), np.dtype("float16"))
#: Rows per call of h: 4096 is where the folded h reaches its GEMM peak on CPU
#: (docs/throughput.md); bigger batches gain nothing and cost memory.
BATCH = 4096


@dataclass(frozen=True)
class Shard:
    """One input shard, checked: its name, rows, dtype, and the matching side shard."""

    name: str
    path: Path
    rows: int
    dtype: np.dtype
    side: Path | None

    def identity(self) -> dict:
        """What a finished shard's record ties it to: size and mtime of its input files."""
        out = {"input": _stat(self.path)}
        if self.side is not None:
            out["side"] = _stat(self.side)
        return out


@dataclass(frozen=True)
class Summary:
    """What one ``transform_gallery`` call did (this rank's share under torchrun)."""

    shards: int
    skipped: int
    rows: int
    seconds: float
    #: CPU time of this process (all its threads) over the same span as ``seconds``.
    cpu_seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        """Rows transformed per second of wall time (0 when nothing was to do)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _stat(path: Path) -> dict:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


# --- checking the input -----------------------------------------------------------------------


def _open(path: Path, width: int, what: str) -> np.ndarray:
    """``path`` memory-mapped, after checking it is a 2-D float32/float16 array ``width`` wide."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FCTError(
            f"{path} is not a readable .npy array ({str(e)[:120]}); fix or remove it"
        ) from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise FCTError(
            f"{path} must be a 2-D array [rows, {width}], got shape {getattr(arr, 'shape', None)}"
        )
    if arr.dtype not in DTYPES:
        raise FCTError(f"{path} holds {arr.dtype}; {what} shards must be float32 or float16")
    if arr.shape[1] != width:
        raise FCTError(
            f"{path} has rows of {arr.shape[1]} values but the model's {what} input is {width} wide; "
            "pass the shards the model was trained on"
        )
    return arr


def _npy_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FCTError(
            f"{what} folder {folder} does not exist (or is not a folder); check the path"
        )
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix != ".npy" or not p.is_file():
            raise FCTError(
                f"{p} is not a .npy shard; a {what} folder holds NAME.npy files only (move it out)"
            )
        files[p.stem] = p
    return files


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_direction(mapper: Mapper, queries: bool = False) -> None:
    """A map applies to a stored gallery (old -> new: h, a gallery-side adapter) or, with
    ``queries``, to a folder of new-model queries (new -> old: a query-side adapter)."""
    if mapper.direction == "query" and not queries:
        raise FCTError(
            f"{mapper.source} is a query-side adapter: it maps new queries into the old space, "
            'not the gallery; fit it with direction = "gallery" to transform a stored gallery '
            "(or pass --queries to map a folder of query shards)"
        )
    if mapper.direction != "query" and queries:
        raise FCTError(
            f"{mapper.source} maps a stored gallery (old -> new), not queries; drop --queries"
        )


def plan(
    mapper: Mapper,
    in_dir: Path,
    out_dir: Path,
    side_dir: Path | None = None,
    queries: bool = False,
) -> list[Shard]:
    """Every input shard, checked against the map before anything is written (FCTError)."""
    check_direction(mapper, queries)
    for folder, what in ((in_dir, "--in"), (side_dir, "--side")):
        if folder is not None and folder.exists() and _inside(out_dir, folder):
            raise FCTError(
                f"--out {out_dir} is inside the {what} folder {folder}; choose an output folder outside it"
            )
    if mapper.d_side and side_dir is None:
        raise FCTError(
            f"{mapper.source} was trained with side-information ({mapper.d_side} values per row); "
            "pass --side DIR with a NAME.npy of side-information per gallery shard"
        )
    if not mapper.d_side and side_dir is not None:
        raise FCTError(f"{mapper.source} takes no side-information; drop --side")
    what = "query" if queries else "gallery"
    shards = _npy_files(in_dir, what)
    if not shards:
        raise FCTError(f"{what} folder {in_dir} holds no .npy shard; check the path")
    sides = _npy_files(side_dir, "side-information") if side_dir is not None else {}
    out = []
    for name, path in shards.items():
        arr = _open(path, mapper.d_in, what)
        side = None
        if side_dir is not None:
            side = sides.get(name)
            if side is None:
                raise FCTError(
                    f"no side-information shard {side_dir / path.name} for {path}; add it"
                )
            rows = _open(side, mapper.d_side, "side-information").shape[0]
            if rows != arr.shape[0]:
                raise FCTError(
                    f"{side} has {rows} rows but {path} has {arr.shape[0]}; they must match"
                )
        out.append(Shard(name, path, int(arr.shape[0]), arr.dtype, side))
    extra = sorted(set(sides) - set(shards))
    if extra:
        raise FCTError(
            f"side-information shard {extra[0]}.npy has no gallery shard in {in_dir}; remove it"
        )
    return out


def assign(rows: list[int], world: int) -> list[list[int]]:
    """Shard indices per rank: largest shard first to the rank with the fewest rows so far
    (ties: lower index, lower rank). Deterministic, so every rank computes the same split."""
    load = [0] * world
    owned: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += rows[i]
    return [sorted(o) for o in owned]


# --- the output folder ------------------------------------------------------------------------


def _claim(out_dir: Path, mapper: Mapper) -> None:
    """Tie ``out_dir`` to the map's weights: refuse a folder another model wrote into."""
    from fct import distributed
    from fct.io import read_json, write_json

    run = out_dir / STATE / "run.json"
    want = {"format": FORMAT, "weights": mapper.digest, "kind": mapper.kind}
    if run.exists():
        got = read_json(run)
        if not isinstance(got, dict) or got.get("weights") != mapper.digest:
            raise FCTError(
                f"{out_dir} holds the output of other weights than {mapper.source}; "
                "choose another --out (or delete that folder)"
            )
    elif distributed.is_main():
        write_json(run, want)


def _finished(out_dir: Path, shard: Shard, mapper: Mapper) -> bool:
    from fct.io import read_json, sha256_regular

    record, output = (
        out_dir / STATE / "shards" / f"{shard.name}.json",
        out_dir / f"{shard.name}.npy",
    )
    if not record.is_file() or not output.is_file():
        return False
    try:
        rec = read_json(record)
    except FCTError:
        return False
    if not isinstance(rec, dict) or rec.get("weights") != mapper.digest:
        return False
    if rec.get("source") != shard.identity() or not isinstance(rec.get("output"), dict):
        return False
    try:
        sha, size = sha256_regular(output)
    except (OSError, ValueError):
        return False
    return rec["output"] == {"bytes": size, "sha256": sha, "rows": shard.rows}


def _clean_temps(out_dir: Path, shards: list[Shard]) -> None:
    """Remove temp files a killed writer of one of ``shards`` left (``.NAME.npy.*.tmp``)."""
    for shard in shards:
        for tmp in out_dir.glob(f".{shard.name}.npy.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)


# --- streaming one shard ----------------------------------------------------------------------


def _rows(arr: np.ndarray, a: int, b: int, path: Path) -> torch.Tensor:
    """Rows ``a:b`` read from the memory map into float32 memory (the disk reads happen here),
    refused in one line when one holds NaN or infinity. The check runs in numpy, one thread:
    a small torch op on a busy machine waits for every OpenMP thread to get a core."""
    import torch

    x = np.array(arr[a:b], dtype=np.float32, order="C")
    if not np.isfinite(x).all():
        row = a + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise FCTError(
            f"{path} row {row} holds NaN or infinite values; fix or drop that row and rerun "
            "(finished shards are kept)"
        )
    return torch.from_numpy(x)


def _warm(mapper: Mapper, batch: int) -> None:
    """One call on ``batch`` zero rows before the first shard. The folded h packs its weights
    for oneDNN on its first call, with that call's row count as a layout hint, and the packing
    can move the last bit of a result: fixing the first call to a full batch makes every
    run's bytes the same whichever shard (or partial last block) it starts with."""
    import torch

    side = torch.zeros(batch, mapper.d_side) if mapper.d_side else None
    mapper(torch.zeros(batch, mapper.d_in), side)


def _advise_ahead(arr: np.ndarray, fd: int | None, a: int, b: int) -> None:
    """Ask the kernel to start reading rows ``a:b`` of the mapped shard in the background
    (POSIX_FADV_WILLNEED): the disk works while h computes, without a reader thread that would
    take a core from h's threads (docs/throughput.md, finding 5)."""
    if fd is None or b <= a or not hasattr(os, "posix_fadvise"):
        return
    row = arr.shape[1] * arr.dtype.itemsize
    os.posix_fadvise(
        fd, int(getattr(arr, "offset", 0)) + a * row, (b - a) * row, os.POSIX_FADV_WILLNEED
    )


def _transform_shard(mapper: Mapper, shard: Shard, out_dir: Path, batch: int, bar) -> dict:
    """Write ``out_dir/NAME.npy`` (atomically) and return its record's ``output`` part."""
    import hashlib

    from fct.io import atomic_path

    arr = _open(shard.path, mapper.d_in, "gallery")
    side = _open(shard.side, mapper.d_side, "side-information") if shard.side is not None else None
    target = out_dir / f"{shard.name}.npy"
    header = {
        "descr": np.lib.format.dtype_to_descr(shard.dtype),
        "fortran_order": False,
        "shape": (shard.rows, mapper.d_out),
    }
    digest, size = hashlib.sha256(), 0

    def put(chunks: list[bytes]) -> None:
        """Write and hash ``chunks`` in order (on the writer thread: write and hashlib drop the
        GIL); the record's sha256 is of the bytes written, not reread."""
        nonlocal size
        for chunk in chunks:
            fh.write(chunk)
            digest.update(chunk)
            size += len(chunk)

    with contextlib.ExitStack() as stack:
        fds = []
        for path in (shard.path, shard.side):
            fd = os.open(path, os.O_RDONLY) if path is not None else None
            if fd is not None:
                stack.callback(os.close, fd)
            fds.append(fd)
        tmp = stack.enter_context(atomic_path(target))
        fh = stack.enter_context(open(tmp, "wb"))
        # One writer thread: a block's bytes are hashed and written while h computes the next
        # (at most one block waits), so the serial I/O does not idle h's threads.
        writer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="fct-transform"))
        pending = None
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, header)
        chunks = [head.getvalue()]
        _advise_ahead(arr, fds[0], 0, min(batch, shard.rows))
        for a in range(0, shard.rows, batch):
            b = min(a + batch, shard.rows)
            _advise_ahead(arr, fds[0], b, min(b + batch, shard.rows))
            if side is not None:
                _advise_ahead(side, fds[1], b, min(b + batch, shard.rows))
            old = _rows(arr, a, b, shard.path)
            s = None if side is None else _rows(side, a, b, shard.side)
            chunks.append(mapper(old, s).numpy().astype(shard.dtype, copy=False).tobytes())
            if pending is not None:
                pending.result()  # raises the writer's error here, in order
            pending = writer.submit(put, chunks)
            chunks = []  # a new list: the submitted one is the writer's
            bar.update(b - a)
        if pending is not None:
            pending.result()
        put(chunks)  # an empty shard: the header alone (otherwise nothing left)
    return {"bytes": size, "sha256": digest.hexdigest(), "rows": shard.rows}


def transform_gallery(
    mapper: Mapper,
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    side_dir: str | os.PathLike[str] | None = None,
    batch: int = BATCH,
    progress: bool | None = None,
    queries: bool = False,
) -> Summary:
    """Stream every shard of ``in_dir`` (this rank's share) through ``mapper`` into ``out_dir``;
    ``queries``: the shards are new-model queries and ``mapper`` a query-side adapter."""
    from tqdm import tqdm

    from fct import distributed
    from fct.io import write_json

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    side = Path(side_dir) if side_dir is not None else None
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise FCTError(f"--batch must be a positive integer, got {batch!r}")
    shards = plan(mapper, in_dir, out_dir, side, queries)
    mine = [
        shards[i] for i in assign([s.rows for s in shards], distributed.world())[distributed.rank()]
    ]
    try:
        (out_dir / STATE).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FCTError(
            f"cannot create --out {out_dir} ({e.strerror or e}); choose a writable folder"
        ) from None
    _claim(out_dir, mapper)
    _clean_temps(out_dir, mine)
    todo = [s for s in mine if not _finished(out_dir, s, mapper)]
    skipped = len(mine) - len(todo)
    if skipped:
        log.info("%d of %d shards already transformed in %s; skipped", skipped, len(mine), out_dir)
    rows = sum(s.rows for s in todo)
    _warm(mapper, batch)
    disable = distributed.quiet() if progress is None else not progress
    t0, c0 = time.perf_counter(), time.process_time()
    with tqdm(total=rows, unit="rows", unit_scale=True, desc="transform", disable=disable) as bar:
        for shard in todo:
            source = shard.identity()
            output = _transform_shard(mapper, shard, out_dir, batch, bar)
            record = {
                "format": FORMAT,
                "weights": mapper.digest,
                "source": source,
                "output": output,
            }
            if shard.identity() != source:  # rewritten while we read it: do not vouch for it
                raise FCTError(f"{shard.path} changed while it was being read; rerun")
            write_json(out_dir / STATE / "shards" / f"{shard.name}.json", record)
            log.info("%s: %d rows -> %s", shard.path, shard.rows, out_dir / f"{shard.name}.npy")
    return Summary(len(todo), skipped, rows, time.perf_counter() - t0, time.process_time() - c0)


# --- the command ------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """``fct transform``'s options on the argparse parser ``p``."""
    p.add_argument(
        "--model",
        required=True,
        help="a cache entry NAME-DIGEST (`fct list transformations`) or a .safetensors file",
    )
    p.add_argument(
        "--in", dest="in_dir", required=True, help="folder of NAME.npy shards [N, d_old]"
    )
    p.add_argument("--out", required=True, help="folder for NAME.npy [N, d_new] (not inside --in)")
    p.add_argument("--side", help="folder of side-information shards NAME.npy (h with side-info)")
    p.add_argument("--cache", help="artifact cache folder (default $FCT_CACHE or .fct-cache)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"rows per call of h (default {BATCH})")
    p.add_argument(
        "--queries",
        action="store_true",
        help="--in holds new-model query shards and --model is a query-side adapter "
        "(maps them into the old space)",
    )


def command(args) -> int:
    """``fct transform``: load the map, stream the gallery, print one summary line."""
    from fct import distributed
    from fct.threads import configure_threads
    from fct.transform_models import load_artifact

    configure_threads(quiet=True)
    mapper = load_artifact(args.model, args.cache)
    summary = transform_gallery(
        mapper, args.in_dir, args.out, args.side, batch=args.batch, queries=args.queries
    )
    who = f"rank {distributed.rank()}: " if distributed.world() > 1 else ""
    print(
        f"{who}transformed {summary.rows:,} rows in {summary.shards} shards "
        f"({summary.skipped} already done, skipped) in {summary.seconds:.2f} s: "
        f"{summary.rows_per_s:,.0f} rows/s ({mapper.kind} {mapper.d_in}->{mapper.d_out} from "
        f"{mapper.source}; output in {args.out})"
    )
    return 0
