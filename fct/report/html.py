"""``index.html``: the whole report in one self-contained file.

Tables are inline HTML, plots are embedded as base64 PNG ``data:`` URIs and the CSS is inline,
so the file opens from disk with no server and no network (it references no external
resource: no fonts, scripts or style sheets).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from fct.io import write_text
from fct.report.details import provenance_table
from fct.report.leaderboard import leaderboard_table, reference_table
from fct.report.render import to_html
from fct.report.reproduction import TITLE as REPRODUCTION
from fct.report.sequences import sequence_table
from fct.report.summary import SMOKE_TITLE, Summary, slug
from fct.report.tables import BACKFILL_TITLE, SETTINGS_TITLE, ScenarioTables

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; white-space: nowrap; }
thead th { border-bottom: 2px solid #333; }
th.group { text-align: center; border-bottom: 1px solid #999; }
tr.rule td { border-top: 2px solid #999; }
p.note, p.meta { font-size: 0.85em; color: #555; max-width: 60em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
nav a { margin-right: 1em; }
.banner { background: #fff3cd; border: 2px solid #d39e00; color: #5c4400; padding: 0.6em 1em;
          font-weight: 600; margin: 1em 0; }
p.verdict { font-weight: 600; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _anchor(scenario: str) -> str:
    return "s-" + slug(scenario)


def index_html(summary: Summary, tables: list[ScenarioTables], plots: dict[str, Path]) -> str:
    """The page: title (and a banner for a smoke run), header, reproduction verdict,
    leaderboard, references, the reproduction check, then per scenario its tables, plots and
    settings, and last the provenance of the runs.

    ``plots`` maps a plot name (``bars_SLUG``, ``curves_SLUG``, ``update_cost``) to its PNG.
    """
    esc = html.escape
    title = summary.title(f"FCT Bench report: {summary.suite}")
    repro = summary.reproduction
    links = [(_anchor(t.scenario), t.scenario) for t in tables] + [("provenance", "provenance")]
    if repro is not None:
        links.insert(0, ("reproduction", REPRODUCTION.lower()))
    nav = " ".join(f'<a href="#{a}">{esc(text)}</a>' for a, text in links)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if summary.smoke:
        parts.append(
            f'<div class="banner" role="alert">{esc(SMOKE_TITLE)}: made by `fct run --smoke` '
            "(a few images per class, one epoch) to check that everything runs. "
            "These numbers say nothing about the methods; run without --smoke for results.</div>"
        )
    parts.append(f'<p class="meta">{esc(summary.header())}</p>')
    if repro is not None:
        parts.append(f'<p class="verdict">{esc(REPRODUCTION)}: {esc(repro.verdict())}</p>')
    parts += [
        f"<nav>{nav}</nav>",
        "<h2>Leaderboard</h2>",
        f'<div class="scroll">{to_html(leaderboard_table(summary))}</div>',
        "<h3>Reference numbers (old/old, new/new)</h3>",
        f'<div class="scroll">{to_html(reference_table(summary))}</div>',
    ]
    if repro is not None:
        parts += [
            f'<h2 id="reproduction">{esc(REPRODUCTION)}</h2>',
            f'<p class="verdict">{esc(repro.verdict())}</p>',
            f'<p class="meta">{esc(repro.reference_info)}</p>',
        ]
        table = repro.table()
        if table is not None:
            parts.append(f'<div class="scroll">{to_html(table)}</div>')
    if "update_cost" in plots:
        parts += [
            "<h2>Cross mAP vs update cost</h2>",
            _img(plots["update_cost"], "cross mAP vs update cost"),
        ]
    for t in tables:
        name = slug(t.scenario)
        parts.append(f'<h2 id="{_anchor(t.scenario)}">{esc(t.scenario)}</h2>')
        parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in t.description) + "</ul>")
        parts.append(f'<div class="scroll">{to_html(t.paper, t.caption)}</div>')
        if t.backfill is not None:
            parts.append(f"<h3>{esc(BACKFILL_TITLE)}</h3>")
            parts.append(f'<div class="scroll">{to_html(t.backfill)}</div>')
        if f"bars_{name}" in plots:
            parts.append(
                _img(plots[f"bars_{name}"], f"{t.scenario}: cross top-1 and mAP per method")
            )
        if f"sequence_{name}_mAP" in plots:
            parts.append("<h3>Sequence of updates: compatibility matrix</h3>")
            parts.append(
                f'<div class="scroll">{to_html(sequence_table(summary, t.scenario))}</div>'
            )
            parts.append(
                _img(plots[f"sequence_{name}_mAP"], f"{t.scenario}: compatibility matrix (mAP)")
            )
        if f"curves_{name}" in plots:
            parts.append(
                _img(plots[f"curves_{name}"], f"{t.scenario}: backfilling curves (cross mAP)")
            )
        parts.append("<h3>Update cost</h3>")
        parts.append(f'<div class="scroll">{to_html(t.costs)}</div>')
        parts.append(f"<h3>{esc(SETTINGS_TITLE)}</h3>")
        if t.training is not None:
            parts.append(f'<div class="scroll">{to_html(t.training)}</div>')
        if t.transformation:
            parts.append(f'<p class="meta">{esc(t.transformation)}</p>')
        if t.methods is not None:
            parts.append(f'<div class="scroll">{to_html(t.methods)}</div>')
    parts += [
        '<h2 id="provenance">Provenance</h2>',
        f'<div class="scroll">{to_html(provenance_table(summary.records))}</div>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_index(
    summary: Summary, tables: list[ScenarioTables], plot_paths: list[Path], out: Path
) -> Path:
    """Write ``out/index.html`` from the tables and the PNGs already written."""
    plots = {p.stem: p for p in plot_paths if p.suffix == ".png"}
    return write_text(out / "index.html", index_html(summary, tables, plots))
