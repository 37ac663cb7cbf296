"""The leaderboard: one row per method, per-scenario columns, mean and rank.

Sorted by the mean over scenarios of the cross mAP (the suite's main number). A method that
did not run every scenario gets no mean and no rank (a mean over other scenarios would not be
comparable) and is listed last.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from fct.io import write_text
from fct.record import BASELINE
from fct.report.metric_table import DASH, METRICS, auc_metric, csv_value
from fct.report.render import Table, csv_cell, md_escape, md_line, to_markdown
from fct.report.reproduction import TITLE as REPRODUCTION
from fct.report.summary import WITHIN_STD, Cell, Summary

#: Per-scenario leaderboard columns, by metric-table key.
SCENARIO_METRICS = ("cross_top1", "cross_mAP", "gain_mAP", "new_new_change_mAP")
#: Diagnostic columns, shown when any record has them (older records leave them blank): the
#: cross case under cosine distance (``cases_cosine``) and ``diagnostics.cross_norm_ratio``.
#: The cross case's negative flip rate (``cases.cross.nfr``), shown when any record has it.
FLIP_METRICS = ("cross_nfr",)
COSINE_METRICS = ("cross_cos_top1", "cross_cos_mAP")
NORM_METRICS = ("cross_norm_ratio",)
#: Shown when any record is of a sequence scenario (blank for the other scenarios).
SEQUENCE_METRICS = ("seq_AC", "seq_mean_mAP")
#: Recall recovery (cross / new/new), shown when any record has the ``recovery`` key.
RECOVERY_METRICS = ("recovery_top1", "recovery_mAP")
#: Averaged over scenarios; the last one orders the board.
MEAN_METRICS = ("cross_top1", "cross_mAP")
SORT_METRIC = "cross_mAP"

CHECK, CROSS = "✓", "✗"

CRITERION = (
    f"{CHECK} compatible: cross top-1 > old/old top-1 and cross mAP > old/old mAP "
    "(BCT's criterion; on the seed means)."
)
WITHIN_NOTE = (
    f"({CHECK}) / ({CROSS}), '{WITHIN_STD}' in the CSV: several seeds ran and the margin the "
    "verdict rests on (cross − old/old, seed means, top-1 or mAP) is no larger than the sample "
    "standard deviation of the cross case's values over seeds, so other seeds could flip it. "
    f"({CHECK}): either margin is that small; ({CROSS}): every failing margin is."
)
DIAGNOSTICS = (
    "cos top-1 / cos mAP: the cross case under cosine distance (the paper tables keep the "
    "scenario's own distance); a gap to the cross columns means the embeddings' scale matters. "
    "norm ratio: mean norm of the cross case's queries / mean norm of its gallery (1 = same "
    "scale). Blank: the record predates these measurements."
)
RECOVERY_NOTE = (
    "recovery top-1 / recovery mAP: recall recovery, the cross case's metric over the new/new "
    "case's (1 = as good as re-embedding the whole gallery with the new model). Blank: the "
    "record predates this measurement, or is of a sequence."
)
FLIPS = (
    "NFR: negative flip rate, the share of queries whose nearest neighbour is of the right "
    "class under old/old and of a wrong class in the cross case (Yan et al., CVPR 2021; "
    "lower is better). Blank: the record predates flip rates."
)
DEFINITIONS = (
    "cross: queries embedded by the new model against the updated gallery. "
    "gain = cross mAP − old/old mAP. new/new change = the method's new/new mAP − Independent's "
    "new/new mAP on the same scenario: positive = the method's new model is better than "
    "Independent's, negative = worse (the price BCT's influence loss can pay); 0 for "
    "Independent, blank when Independent was not run. Values in %; differences in percentage "
    "points. mean = mean over scenarios; a method missing a scenario has no mean and no rank."
)

SEQUENCE_NOTE = (
    "AC / seq. mean mAP (sequence scenarios only, blank elsewhere): the share of pairs of "
    "generations i > j whose compatibility-matrix mAP M[i][j] beats M[j][j], and the mean mAP "
    "of the matrix's lower triangle (CL2R; tables/sequence_SCENARIO.md). A sequence's cross, "
    "old/old and new/new are M[T-1][0], M[0][0] and M[T-1][T-1]: last model, first gallery."
)


@dataclass
class Row:
    """One method's leaderboard row."""

    method: str
    label: str
    rank: int | None
    means: dict[str, float | None]
    cells: dict[str, Cell | None]


def scenario_metrics(summary: Summary) -> list[str]:
    """The per-scenario metric keys, with AUC columns when any record has backfilling curves
    and the cosine / norm-ratio columns when any record measured them."""
    keys = [*SCENARIO_METRICS]
    if any(r["cases"]["cross"].get("nfr") is not None for r in summary.records):
        keys += FLIP_METRICS
    if any(r.get("cases_cosine") for r in summary.records):
        keys += COSINE_METRICS
    if any(
        (r.get("diagnostics") or {}).get("cross_norm_ratio") is not None for r in summary.records
    ):
        keys += NORM_METRICS
    if any(r.get("sequence") for r in summary.records):
        keys += SEQUENCE_METRICS
    if any(r.get("recovery") for r in summary.records):
        keys += RECOVERY_METRICS
    return [*keys, *(f"auc_{o}" for o in summary.auc_orders)]


def _metric(key: str):
    return METRICS[key] if key in METRICS else auc_metric(key.removeprefix("auc_"))


def leaderboard_rows(summary: Summary) -> list[Row]:
    """Rows sorted by mean cross mAP (descending), with competition ranks (1, 2, 2, 4)."""
    rows = []
    for m in summary.methods:
        cells = {s: summary.cell(s, m) for s in summary.scenarios}
        complete = all(c is not None for c in cells.values())
        means = {
            k: sum(c.mean(k) for c in cells.values()) / len(cells) if complete else None
            for k in MEAN_METRICS
        }
        rows.append(Row(m, summary.labels[m], None, means, cells))
    ranked = sorted(
        (r for r in rows if r.means[SORT_METRIC] is not None),
        key=lambda r: (-r.means[SORT_METRIC], r.label),
    )
    for i, row in enumerate(ranked):
        prev = ranked[i - 1] if i else None
        tied = prev is not None and prev.means[SORT_METRIC] == row.means[SORT_METRIC]
        row.rank = prev.rank if tied else i + 1
    unranked = sorted((r for r in rows if r.means[SORT_METRIC] is None), key=lambda r: r.label)
    return ranked + unranked


def _mark(cell: Cell | None, yes: str, no: str) -> str:
    """The CSV's ``yes`` / ``no`` (with `` (within 1 std)``)."""
    return "" if cell is None else cell.verdict(yes, no)


def _symbol(cell: Cell | None) -> str:
    """The Markdown / HTML mark: ✓ or ✗, in parentheses when within one std."""
    if cell is None:
        return DASH
    mark = CHECK if cell.compatible else CROSS
    return f"({mark})" if cell.within_std else mark


def leaderboard_csv(summary: Summary, rows: list[Row] | None = None) -> str:
    """The wide CSV: ``rank,method,label,mean/...,SCENARIO/KEY...``.

    With several seeds anywhere, each per-scenario number becomes ``KEY_mean`` and ``KEY_std``
    (sample std, blank for one seed) and a ``SCENARIO/seeds`` count is added. A report of
    ``--smoke`` records gets a first column ``smoke``, ``yes`` on every row (smoke and full
    runs are never reported together).
    """
    rows = rows if rows is not None else leaderboard_rows(summary)
    multi = summary.multi_seed
    keys = scenario_metrics(summary)
    smoke = ["smoke"] if summary.smoke else []
    header = [*smoke, "rank", "method", "label", *(f"mean/{k}" for k in MEAN_METRICS)]
    for s in summary.scenarios:
        for k in keys:
            header += [f"{s}/{k}_mean", f"{s}/{k}_std"] if multi else [f"{s}/{k}"]
        header += [f"{s}/compatible"] + ([f"{s}/seeds"] if multi else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # Every cell, header included (it holds scenario names), is neutralised against formulas.
    writer.writerow([csv_cell(h) for h in header])
    for row in rows:
        line = [
            *(["yes"] if smoke else []),
            "" if row.rank is None else str(row.rank),
            row.method,
            row.label,
            *(csv_value(row.means[k]) for k in MEAN_METRICS),
        ]
        for s in summary.scenarios:
            cell = row.cells[s]
            for k in keys:
                stat = cell.stats[k] if cell else None
                line.append(csv_value(stat.mean if stat else None))
                if multi:
                    line.append(csv_value(stat.std if stat else None))
            line.append(_mark(cell, "yes", "no"))
            if multi:
                line.append(str(len(cell.records)) if cell else "")
        writer.writerow([csv_cell(c) for c in line])
    return buf.getvalue()


def leaderboard_table(summary: Summary, rows: list[Row] | None = None) -> Table:
    """The leaderboard as a render.Table (mean ± std cells), for Markdown and HTML."""
    rows = rows if rows is not None else leaderboard_rows(summary)
    keys = scenario_metrics(summary)
    header = ["rank", "method", *(f"mean {METRICS[k].description}" for k in MEAN_METRICS)]
    groups: list[tuple[str, int]] = [("", len(header))]
    for s in summary.scenarios:
        header += [_short(k) for k in keys] + ["compatible"]
        groups.append((s, len(keys) + 1))
    body = []
    for row in rows:
        line = [
            DASH if row.rank is None else str(row.rank),
            row.label,
            *(METRICS[k].format(row.means[k]) for k in MEAN_METRICS),
        ]
        for s in summary.scenarios:
            cell = row.cells[s]
            for k in keys:
                stat = cell.stats[k] if cell else None
                line.append(_metric(k).format(stat.mean, stat.std) if stat else DASH)
            line.append(_symbol(cell))
        body.append(line)
    notes = [CRITERION, DEFINITIONS]
    if any(k in keys for k in FLIP_METRICS):
        notes.append(FLIPS)
    if any(k in keys for k in (*COSINE_METRICS, *NORM_METRICS)):
        notes.append(DIAGNOSTICS)
    if any(k in keys for k in RECOVERY_METRICS):
        notes.append(RECOVERY_NOTE)
    if any(k in keys for k in SEQUENCE_METRICS):
        notes.append(SEQUENCE_NOTE)
    if summary.multi_seed:
        notes.append("With several seeds: mean ± sample standard deviation over seeds.")
        notes.append(WITHIN_NOTE)
    return Table(header, body, ["r", "l"] + ["r"] * (len(header) - 2), groups, notes=notes)


def _short(key: str) -> str:
    return {
        "cross_top1": "cross top-1",
        "cross_mAP": "cross mAP",
        "gain_mAP": "gain",
        "new_new_change_mAP": "new/new change",
    }.get(key, _metric(key).label)


def reference_table(summary: Summary) -> Table:
    """Per scenario, the old/old and new/new numbers every method is compared against."""
    header = ["scenario", "old/old top-1", "old/old mAP", "new/new top-1", "new/new mAP"]
    body = []
    for s in summary.scenarios:
        old = summary.reference(s, "old/old")
        new = summary.reference(s, "new/new")
        line = [s]
        for cell, case in ((old, "old_old"), (new, "new_new")):
            for k in ("top1", "mAP"):
                stat = cell.stats[f"{case}_{k}"] if cell else None
                line.append(METRICS[f"{case}_{k}"].format(stat.mean, stat.std) if stat else DASH)
        if new is not None and new.traits.role != BASELINE:
            line[0] += f" (new/new from {new.label})"
        body.append(line)
    return Table(header, body, ["l", "r", "r", "r", "r"])


def leaderboard_markdown(summary: Summary, rows: list[Row] | None = None) -> str:
    """leaderboard.md: title (marked for a smoke run), header line, the reproduction verdict
    (with a reference), the leaderboard with its criterion, the reference table."""
    repro = summary.reproduction
    verdict = (
        f"{md_line(f'{REPRODUCTION}: {repro.verdict()} (reproduction.md)')}\n\n"
        if repro is not None
        else ""
    )
    return (
        f"# {md_escape(summary.title(f'Leaderboard: {summary.suite}'))}\n\n"
        f"{md_line(summary.header())}\n\n{verdict}"
        f"{to_markdown(leaderboard_table(summary, rows))}\n"
        "## Reference numbers (old/old, new/new)\n\n"
        f"{to_markdown(reference_table(summary))}"
    )


def write_leaderboard(summary: Summary, out: Path) -> list[Path]:
    """Write ``leaderboard.csv`` and ``leaderboard.md`` into ``out``; return their paths."""
    rows = leaderboard_rows(summary)
    return [
        write_text(out / "leaderboard.csv", leaderboard_csv(summary, rows)),
        write_text(out / "leaderboard.md", leaderboard_markdown(summary, rows)),
    ]
