"""Reproduction check: a run's records beside the project's reference records of the suite.

The reference (``results/reference/SUITE``, committed with the project) is loaded on its own
and never merged or ranked with the run's records: for every (scenario, method, seed) present
in both, the report shows this run − reference of top-1 and mAP in the three cases, and one
verdict line, "reproduced within X points". The reference may come from other code: telling
whether new code reproduces it is the point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.record import parse_date
from fct.report.metric_table import DASH
from fct.report.records import is_smoke, load_records, record_files
from fct.report.render import Table, md_escape, md_line, to_markdown
from fct.report.summary import Summary

log = logging.getLogger(__name__)

#: The numbers compared, per matched record: (case, metric).
COMPARED = (
    ("old/old", "top1"),
    ("old/old", "mAP"),
    ("new/new", "top1"),
    ("new/new", "mAP"),
    ("cross", "top1"),
    ("cross", "mAP"),
)
_METRIC_NAME = {"top1": "top-1", "mAP": "mAP"}
TITLE = "Reproduction check"


@dataclass
class Matched:
    """One (scenario, method, seed) present in the run and in the reference."""

    scenario: str
    method: str
    label: str
    seed: int
    diffs: list[float]  # this run − reference, in COMPARED order
    same_config: bool | None  # same config_hash; None when a record has none


@dataclass
class Reproduction:
    """The comparison of a run with the reference records of its suite."""

    reference: str
    n_reference: int
    matched: list[Matched] = field(default_factory=list)
    only_run: int = 0
    only_reference: int = 0
    skipped: str | None = None  # why nothing was compared
    reference_info: str = ""

    @property
    def largest(self) -> tuple[Matched, int] | None:
        """The matched record and COMPARED index of the largest |difference|."""
        best = None
        for m in self.matched:
            for i, d in enumerate(m.diffs):
                if best is None or abs(d) > abs(best[0].diffs[best[1]]):
                    best = (m, i)
        return best

    @property
    def max_abs(self) -> float | None:
        """The largest |difference| over every matched record and metric (points)."""
        largest = self.largest
        return None if largest is None else abs(largest[0].diffs[largest[1]])

    def verdict(self) -> str:
        """The one-line verdict: "reproduced within X points (...)"."""
        if self.skipped:
            return f"not compared: {self.skipped}"
        only = (
            f"{self.only_run} record{'s' * (self.only_run != 1)} only in this run, "
            f"{self.only_reference} only in the reference"
        )
        if not self.matched:
            return f"not compared: no record of this run is in the reference ({only})"
        n = len(self.matched)
        return (
            f"reproduced within {self.max_abs:.2f} points (max |difference| over {n} matched "
            f"record{'s' * (n != 1)} × {len(COMPARED)} metrics; {only})"
        )

    def table(self) -> Table | None:
        """One row per matched record: the differences, signed, in points."""
        if not self.matched:
            return None
        header = [
            "scenario",
            "method",
            "seed",
            "config",
            *(f"Δ {case} {_METRIC_NAME[k]}" for case, k in COMPARED),
        ]
        config = {True: "same", False: "differs", None: DASH}
        rows = [
            [m.scenario, m.label, str(m.seed), config[m.same_config]]
            + [_signed(d) for d in m.diffs]
            for m in self.matched
        ]
        notes = [
            "Δ = this run − reference, in percentage points, for every (scenario, method, seed) "
            "both hold. config: same = the same scenario, method settings and seed (config_hash); "
            "differs = configured differently, so differences are expected; "
            f"{DASH} = a record predates config hashes. The reference may come from other code."
        ]
        largest = self.largest
        if largest is not None:
            m, i = largest
            case, k = COMPARED[i]
            notes.append(
                f"Largest difference: {_signed(m.diffs[i])} ({m.scenario} / {m.label}, seed "
                f"{m.seed}, {case} {_METRIC_NAME[k]})."
            )
        return Table(header, rows, ["l", "l", "r", "l"] + ["r"] * len(COMPARED), notes=notes)

    def markdown(self, suite: str) -> str:
        """reproduction.md: title, verdict, the reference's provenance, the table."""
        table = self.table()
        return (
            f"# {TITLE}: {md_escape(suite)}\n\n{md_line(self.verdict())}\n\n"
            f"{md_line(self.reference_info)}\n"
            + (f"\n{to_markdown(table)}" if table is not None else "")
        )


def _signed(x: float) -> str:
    text = f"{x:+.2f}"
    return "0.00" if float(text) == 0 else text


def load_reference(
    reference: Path, suite: str, results_dirs: list[Path]
) -> list[dict[str, Any]] | None:
    """The reference's records of ``suite``, validated; None when the folder is missing, holds
    no records of the suite, or is one of the run's own folders. A malformed reference record
    raises FCTError (one line, naming the file)."""
    if not record_files(reference):
        log.info("no reference records under %s/runs: no reproduction check", reference)
        return None
    try:
        if any(reference.resolve() == d.resolve() for d in results_dirs):
            log.info("the reference %s is this run's own folder: no reproduction check", reference)
            return None
    except OSError:
        return None
    try:
        records = load_records([reference])
    except FCTError as e:
        raise FCTError(f"reference results {reference}: {e}") from e
    records = [r for r in records if r["suite"] == suite]
    if not records:
        log.info("no records of suite %s under %s: no reproduction check", suite, reference)
        return None
    return records


def _describe(reference: Path, records: list[dict[str, Any]]) -> str:
    """One line on the reference: folder, number of records, versions, git shas, dates."""
    versions = sorted({str(r["provenance"].get("fct_version") or "?") for r in records})
    shas = sorted({str(r["provenance"].get("git_sha") or "?")[:12] for r in records})
    dates = sorted(parse_date(r["provenance"]["date"]).strftime("%Y-%m-%d") for r in records)
    span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    n = len(records)
    return (
        f"reference: {reference} ({n} record{'s' * (n != 1)}, fct {', '.join(versions)}, "
        f"git {', '.join(shas)}, {span})"
    )


def _identity(rec: dict[str, Any]) -> tuple[str, str, int]:
    return (rec["scenario"], rec["method"], rec["seed"])


def compare(summary: Summary, reference: Path, ref_records: list[dict[str, Any]]) -> Reproduction:
    """Compare the summary's records with the reference's, record by record."""
    result = Reproduction(
        str(reference), len(ref_records), reference_info=_describe(reference, ref_records)
    )
    if summary.smoke != any(is_smoke(r) for r in ref_records):
        result.skipped = (
            "this run is a smoke run (a wiring test) and the reference is not"
            if summary.smoke
            else "the reference holds smoke runs (a wiring test) and this run does not"
        )
        return result
    ref = {_identity(r): r for r in ref_records}
    run = {_identity(r): r for r in summary.records}
    result.only_run = len(run.keys() - ref.keys())
    result.only_reference = len(ref.keys() - run.keys())
    both = sorted(
        run.keys() & ref.keys(),
        key=lambda k: (k[0], summary.sort_key(k[1]), k[2]),
    )
    for key in both:
        mine, theirs = run[key], ref[key]
        diffs = [
            float(mine["cases"][case][k]) - float(theirs["cases"][case][k]) for case, k in COMPARED
        ]
        hashes = (mine.get("config_hash"), theirs.get("config_hash"))
        same = None if None in hashes else hashes[0] == hashes[1]
        scenario, method, seed = key
        result.matched.append(Matched(scenario, method, summary.labels[method], seed, diffs, same))
    return result
