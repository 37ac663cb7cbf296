"""``build_report``: every report file of a suite, from its run records only.

The report is built whole in a hidden temp folder beside its final place (``OUT/.report-tmp-*``)
and only then swapped in, entry by entry (``tables/``, ``plots/``, ``leaderboard.csv``,
``leaderboard.md``, ``reproduction.md``, ``index.html``): a report that fails half-way (a bad label, a full disk, a bug)
leaves the previous report exactly as it was, never a mix of new and stale files. The output
folder is usually the results folder itself; its ``runs/`` is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fct.errors import FCTError
from fct.io import DISK_FULL, fsync_dir, write_text
from fct.report.html import write_index
from fct.report.leaderboard import write_leaderboard
from fct.report.plots import write_plots
from fct.report.records import load_records
from fct.report.reproduction import compare, load_reference
from fct.report.sequences import write_sequences
from fct.report.summary import Summary, summarize
from fct.report.tables import write_tables

log = logging.getLogger(__name__)

#: What a report consists of, in the order it is swapped in: folders first and index.html
#: last, so the page a reader opens is the last file to change.
#: An entry the new report lacks (reproduction.md without a reference) is removed.
REPORT_ENTRIES = (
    "tables",
    "plots",
    "leaderboard.csv",
    "leaderboard.md",
    "reproduction.md",
    "index.html",
)
TMP_PREFIX = ".report-tmp-"
OLD_PREFIX = ".report-old-"
LOCK_NAME = ".report.lock"


def build_report(
    suite: str,
    results_dirs: list[Path] | list[str | os.PathLike[str]],
    out: Path | str | os.PathLike[str] | None = None,
    reference: Path | str | os.PathLike[str] | None = None,
    *,
    plots: bool = True,
) -> list[Path]:
    """Merge the run records of ``results_dirs`` and write the suite's report into ``out``.

    ``out`` defaults to the first results folder. Writes, in this order:
    ``leaderboard.csv``, ``leaderboard.md``, ``tables/SCENARIO.{md,tex}``,
    ``plots/bars_SCENARIO.{png,pdf}`` (and ``plots/curves_SCENARIO.{png,pdf}`` when runs
    recorded backfilling curves), ``plots/update_cost.{png,pdf}``, for sequence scenarios
    ``tables/sequence_SCENARIO.{md,tex}`` and ``plots/sequence_SCENARIO_{mAP,top1}.{png,pdf}``
    (fct.report.sequences), ``reproduction.md`` (with a reference) and ``index.html``; returns
    their paths. All of them are built in a temp folder
    and swapped in together, replacing the previous report (``tables/`` and ``plots/`` as whole
    folders); on any error the previous report is left as it was. Raises FCTError when there
    are no records of ``suite`` or a record is malformed.

    ``reference`` is a results folder of reference records (the project's
    ``results/reference/SUITE``): loaded on its own, never merged or ranked with the run's
    records, it adds the reproduction check (``reproduction.md``, a section of index.html and
    a line in leaderboard.md). A missing folder, or one without records of ``suite``, adds
    nothing; a malformed reference record raises FCTError.

    ``plots=False`` (``fct report --no-plots``) writes everything but ``plots/``, several
    times faster (drawing is most of a report's time); a previous report's plots are removed
    with the rest of it, so no stale figure stays beside new tables.
    """
    start = time.perf_counter()
    folders = [Path(d) for d in results_dirs]
    records = load_records(folders, suite=suite)
    out = Path(out) if out is not None else folders[0]
    summary = summarize(records, suite)
    if reference is not None:
        ref_records = load_reference(Path(reference), suite, folders)
        if ref_records is not None:
            summary.reproduction = compare(summary, Path(reference), ref_records)
    with _report_lock(out):
        _remove_leftovers(out)
        with _staging(out) as tmp:
            relative = [p.relative_to(tmp) for p in _write_all(summary, tmp, plots)]
            _swap_in(tmp, out)
    paths = [out / p for p in relative]
    log.info(
        "report for %s: %d run records -> %d files in %s (%.1f s)",
        suite,
        len(records),
        len(paths),
        out,
        time.perf_counter() - start,
    )
    if summary.reproduction is not None:
        log.info("reproduction check: %s", summary.reproduction.verdict())
    return paths


def _write_all(summary: Summary, folder: Path, plots: bool = True) -> list[Path]:
    """Every report file of ``summary`` written into ``folder``; their paths, in order."""
    paths = write_leaderboard(summary, folder)
    table_paths, tables = write_tables(summary, folder)
    plot_paths = write_plots(summary, folder) if plots else []
    # sequence scenarios only
    seq_tables, seq_plots = write_sequences(summary, folder, plots=plots)
    plot_paths += seq_plots
    paths += table_paths + seq_tables + plot_paths
    if summary.reproduction is not None:
        repro = summary.reproduction.markdown(summary.suite)
        paths.append(write_text(folder / "reproduction.md", repro))
    paths.append(write_index(summary, tables, plot_paths, folder))
    return paths


def _cannot_write(out: Path, e: OSError) -> FCTError:
    if e.errno in DISK_FULL:
        return FCTError(
            f"no space left on device while writing the report in {out}; free disk space and "
            "rerun `fct report` (the run records are kept)"
        )
    return FCTError(
        f"cannot write the report in {out} ({e.strerror or e}); choose a writable folder (--out)"
    )


@contextlib.contextmanager
def _report_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.report.lock`` while a report is built: two reports into one folder take
    turns, so the one that holds it may delete temp folders left by a killed one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _cannot_write(out, e) from e
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, and no other fct to share the folder with
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield
    finally:
        os.close(fd)


def _remove_leftovers(out: Path) -> None:
    """Delete temp folders of a report killed mid-way (we hold the lock: none is in use)."""
    for p in out.iterdir():
        if p.name.startswith((TMP_PREFIX, OLD_PREFIX)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp folder in ``out`` (same file system: the swap is a rename), always removed."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
    except OSError as e:
        raise _cannot_write(out, e) from e
    try:
        yield tmp
    except FCTError:
        raise
    except OSError as e:  # a full disk, a file name the file system refuses, no permission
        raise _cannot_write(out, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _swap_in(tmp: Path, out: Path) -> None:
    """Move every report entry of ``tmp`` into ``out``, the old ones aside first.

    An old entry the new report does not have (reproduction.md of a report that had a
    reference) goes aside too, and is deleted with the others. The old entries go to ``OUT/.report-old-*`` and are deleted once all new ones are in
    place; if a rename fails half-way, the new entries already moved are taken out again and
    the old ones put back, so ``out`` holds the complete old report or the complete new one.
    """
    old = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=out))
    moved_aside: list[str] = []
    placed: list[str] = []
    restored = True
    try:
        for name in REPORT_ENTRIES:
            if os.path.lexists(out / name):
                os.rename(out / name, old / name)
                moved_aside.append(name)
            if (tmp / name).exists():
                os.rename(tmp / name, out / name)
                placed.append(name)
        fsync_dir(out)
    except BaseException:
        for name in placed:
            with contextlib.suppress(OSError):
                _remove(out / name)
        for name in moved_aside:
            try:
                os.rename(old / name, out / name)
            except OSError:
                restored = False
        raise
    finally:
        # An old entry that could not be put back stays in .report-old-* rather than be lost;
        # the next report deletes it.
        if restored:
            shutil.rmtree(old, ignore_errors=True)
