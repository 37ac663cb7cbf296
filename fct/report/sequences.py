"""Sequence scenarios in the report: a heatmap of each compatibility matrix and a paper-style
table per sequence scenario (Markdown and LaTeX), from the records' ``sequence`` key only.

With several seeds, every cell and every summary number is the mean over the seeds' records
(the criterion marks of the table are those of the mean matrix).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fct.io import write_text
from fct.report.metric_table import DASH
from fct.report.render import Table, md_escape, to_latex, to_markdown
from fct.report.summary import Summary, slug

#: The matrices drawn and tabulated, with their names in titles.
MATRICES = {"mAP": "mAP", "top1": "CMC top-1"}
SUMMARY_KEYS = ("AC", "BC", "FC", "mean")

NOTE = (
    "M[i][j]: queries embedded by model i against the gallery stored when model j was current, "
    "carried to model i's space the method's way (FCT family: each step's h in turn; BCT and "
    "Independent: as is). ✓ on a cell i > j: M[i][j] > M[j][j] (the empirical compatibility "
    "criterion). AC: share of pairs i > j that meet it; BC = mean over j < T-1 of "
    "M[T-1][j] − M[j][j]; FC = mean over i ≥ 1 of M[i][i-1] − M[i][i]; mean: the lower "
    "triangle's mean, diagonal included (CL2R, Biondi et al., ACM TOMM 2023). direct: the last "
    "model against the first gallery through an h trained directly from the first model to "
    "the last, beside the chained one (M[T-1][0])."
)


def sequence_scenarios(summary: Summary) -> list[str]:
    """The scenarios with sequence records, in report order."""
    return [
        s
        for s in summary.scenarios
        if any(
            r.get("sequence") for m in summary.methods_in(s) for r in summary.cells[(s, m)].records
        )
    ]


def _mean(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.fmean(xs) if xs else None


def mean_sequence(summary: Summary, scenario: str, method: str) -> dict[str, Any] | None:
    """The seed mean of a (scenario, method)'s ``sequence``: matrices cell by cell, AC, BC,
    FC, mean and the direct update's numbers; None without a sequence record."""
    seqs = [r["sequence"] for r in summary.cells[(scenario, method)].records if r.get("sequence")]
    if not seqs:
        return None
    n = len(seqs[0]["matrix"]["mAP"])
    seqs = [q for q in seqs if len(q["matrix"]["mAP"]) == n]
    out: dict[str, Any] = {"n": n, "seeds": len(seqs), "matrix": {}}
    for metric in MATRICES:
        out["matrix"][metric] = [
            [_mean([q["matrix"][metric][i][j] for q in seqs]) if j <= i else None for j in range(n)]
            for i in range(n)
        ]
    for key in SUMMARY_KEYS:
        out[key] = _mean([q.get(key) for q in seqs])
    directs = [q.get("direct") for q in seqs if q.get("direct")]
    out["direct"] = {m: _mean([d.get(m) for d in directs]) for m in MATRICES} if directs else None
    out["metric"] = seqs[0].get("metric", "mAP")
    return out


def _fmt(x: float | None, signed: bool = False, decimals: int = 1) -> str:
    if x is None:
        return DASH
    text = f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"
    return text.replace("-", "−")


def sequence_table(summary: Summary, scenario: str) -> Table:
    """One row per method: AC, BC, FC and the lower-triangle mean (on the records' metric,
    mAP), then every lower-triangle mAP cell M[i][j] (✓ where the criterion holds), then the
    direct h_0->T's mAP beside the chained M[T-1][0]."""
    seqs = {m: mean_sequence(summary, scenario, m) for m in summary.methods_in(scenario)}
    seqs = {m: q for m, q in seqs.items() if q is not None}
    n = max(q["n"] for q in seqs.values())
    pairs = [(i, j) for i in range(n) for j in range(i + 1)]
    header = ["method", "AC", "BC", "FC", "mean", *(f"M[{i}][{j}]" for i, j in pairs), "direct"]
    body = []
    for m, q in seqs.items():
        mat = q["matrix"]["mAP"]
        cells = []
        for i, j in pairs:
            value = mat[i][j] if q["n"] == n else None
            mark = " ✓" if value is not None and j < i and value > mat[j][j] else ""
            cells.append(_fmt(value) + mark)
        direct = q["direct"]["mAP"] if q["direct"] else None
        body.append(
            [
                summary.labels[m],
                _fmt(q["AC"], decimals=2),
                _fmt(q["BC"], signed=True),
                _fmt(q["FC"], signed=True),
                _fmt(q["mean"]),
                *cells,
                _fmt(direct),
            ]
        )
    groups = [("", 1), ("CL2R summary (mAP)", 4), ("compatibility matrix, mAP (%)", len(pairs))]
    groups.append(("", 1))
    notes = [NOTE]
    if any(q["seeds"] > 1 for q in seqs.values()):
        notes.append("Means over seeds.")
    return Table(header, body, ["l"] + ["r"] * (len(header) - 1), groups, notes=notes)


def sequence_markdown(summary: Summary, scenario: str, table: Table) -> str:
    """tables/sequence_SCENARIO.md."""
    title = summary.title(f"Sequence of updates: {scenario}")
    return f"# {md_escape(title)}\n\n{to_markdown(table)}"


def heatmap_figure(summary: Summary, scenario: str, metric: str) -> Any:
    """One heatmap per method of the ``metric`` matrix (rows: query model i, columns: the
    gallery's model j; upper triangle blank), values written in the cells."""
    from fct.report.plots import _figure, _style, _title, plain

    methods = [m for m in summary.methods_in(scenario) if mean_sequence(summary, scenario, m)]
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    with _style():
        fig = _figure((3.2 * cols + 0.8, 3.0 * rows + 0.9))
        axes = fig.subplots(rows, cols, squeeze=False)
        image = None
        for ax, m in zip(axes.flat, methods, strict=False):
            q = mean_sequence(summary, scenario, m)
            mat = q["matrix"][metric]
            n = len(mat)
            grid = [[float("nan") if v is None else v for v in row] for row in mat]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
            for i in range(n):
                for j in range(i + 1):
                    v = mat[i][j]
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 60 else "black")  # fmt: skip
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xlabel("gallery stored by model j")
            ax.set_ylabel("query model i")
            ax.set_title(plain(summary.labels[m], 30), fontsize=9)
        for ax in list(axes.flat)[len(methods) :]:
            ax.set_visible(False)
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8, label=f"{MATRICES[metric]} (%)")
        fig.suptitle(
            plain(_title(summary, f"{scenario}: compatibility matrix, {MATRICES[metric]}"), 90)
        )
    return fig


def write_sequences(
    summary: Summary, out: Path, plots: bool = True
) -> tuple[list[Path], list[Path]]:
    """Per sequence scenario: ``tables/sequence_SLUG.{md,tex}`` and (with ``plots``)
    ``plots/sequence_SLUG_{mAP,top1}.{png,pdf}``; returns (table paths, plot paths)."""
    from fct.report.plots import save

    tables, figures = [], []
    for s in sequence_scenarios(summary):
        name = slug(s)
        table = sequence_table(summary, s)
        tables.append(
            write_text(out / "tables" / f"sequence_{name}.md", sequence_markdown(summary, s, table))
        )
        caption = summary.title(f"Sequence of updates: {s}")
        tables.append(
            write_text(
                out / "tables" / f"sequence_{name}.tex",
                to_latex(table, caption, f"tab:sequence-{name}"),
            )
        )
        for metric in MATRICES if plots else ():
            figures += save(
                heatmap_figure(summary, s, metric), out / "plots" / f"sequence_{name}_{metric}"
            )
    return tables, figures
