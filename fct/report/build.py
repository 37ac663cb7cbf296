"""``build_report``: every report file of a suite, from its run records only."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fct.report.html import write_index
from fct.report.leaderboard import write_leaderboard
from fct.report.plots import write_plots
from fct.report.records import load_records
from fct.report.summary import summarize
from fct.report.tables import write_tables

log = logging.getLogger(__name__)


def build_report(
    suite: str,
    results_dirs: list[Path] | list[str | os.PathLike[str]],
    out: Path | None = None,
) -> list[Path]:
    """Merge the run records of ``results_dirs`` and write the suite's report into ``out``.

    ``out`` defaults to the first results folder. Writes, in this order:
    ``leaderboard.csv``, ``leaderboard.md``, ``tables/SCENARIO.{md,tex}``,
    ``plots/bars_SCENARIO.{png,pdf}`` (and ``plots/curves_SCENARIO.{png,pdf}`` when runs
    recorded backfilling curves), ``plots/update_cost.{png,pdf}`` and ``index.html``; returns
    their paths. Every file is written atomically. Raises FCTError when there are no records
    of ``suite`` or a record is malformed.
    """
    start = time.perf_counter()
    folders = [Path(d) for d in results_dirs]
    records = load_records(folders, suite=suite)
    out = Path(out) if out is not None else folders[0]
    summary = summarize(records, suite)
    paths = write_leaderboard(summary, out)
    table_paths, tables = write_tables(summary, out)
    plot_paths = write_plots(summary, out)
    paths += table_paths + plot_paths
    paths.append(write_index(summary, tables, plot_paths, out))
    log.info(
        "report for %s: %d run records -> %d files in %s (%.1f s)",
        suite,
        len(records),
        len(paths),
        out,
        time.perf_counter() - start,
    )
    return paths
