"""Paper-style tables, one per scenario: ``tables/SCENARIO.md`` and ``tables/SCENARIO.tex``.

Rows as in the FCT paper: the reference cases old/old and new/new, then each method's cross
case; BCT (and any method whose own new model differs from Independent's) also gets a
"LABEL new/new" row, because lowering new/new is the price BCT pays. For scenarios marked
``"paper": true`` a "Published" column group shows the numbers of
``fct/reference/published_results.csv`` for the same dataset, case and method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fct.io import write_text
from fct.report import published
from fct.report.metric_table import DASH, METRICS
from fct.report.records import CASES
from fct.report.render import Table, md_escape, md_line, to_latex, to_markdown
from fct.report.summary import UNCHANGED_NEW_MODEL, Cell, Summary, slug

CASE_COLUMNS = (("top1", "CMC top-1"), ("top5", "CMC top-5"), ("mAP", "mAP"), ("mAP@R", "mAP@R"))
PUBLISHED_COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("mAP", "mAP"))
COST_METRICS = (
    "backfill_fraction",
    "transform_embeddings_per_s",
    "update_cost_s",
    "speedup_vs_backfill",
    "train_seconds",
)
#: A method's new/new row is shown when it differs from the reference new/new by more than
#: this (percentage points): below it the difference is seed noise or rounding.
NEW_NEW_TOLERANCE = 0.05


@dataclass
class ScenarioTables:
    """What one scenario's report shows: the paper table, the cost table and a description."""

    scenario: str
    paper: Table
    costs: Table
    caption: str
    description: list[str]


def is_paper(config: dict[str, Any]) -> bool:
    """True for a paper-faithful scenario (``"paper": true`` in its scenario_config)."""
    return config.get("paper") is True


def _eval_dataset(config: dict[str, Any]) -> str:
    ev = config.get("eval")
    return str(ev.get("dataset", "")) if isinstance(ev, dict) else ""


def _case_cells(cell: Cell | None, case: str) -> list[str]:
    prefix = {"old/old": "old_old", "new/new": "new_new", "cross": "cross"}[case]
    out = []
    for k, _ in CASE_COLUMNS:
        stat = cell.stats[f"{prefix}_{k}"] if cell else None
        out.append(METRICS[f"{prefix}_{k}"].format(stat.mean, stat.std) if stat else DASH)
    return out


def _published_cells(pub: published.Published | None) -> list[str]:
    if pub is None:
        return [""] * (len(PUBLISHED_COLUMNS) + 1)
    values = [getattr(pub, k) for k, _ in PUBLISHED_COLUMNS]
    return [DASH if v is None else f"{v:.1f}" for v in values] + [pub.source]


def _own_new_model(cell: Cell, ref: Cell | None) -> bool:
    """True when the method's new model is not the reference one: BCT, or a plugin whose
    new/new differs from the reference's (FCT-style methods reuse Independent's by design)."""
    if cell.method == "bct":
        return True
    if ref is None or cell.method == ref.method or cell.method in UNCHANGED_NEW_MODEL:
        return False
    return any(
        abs(cell.mean(f"new_new_{k}") - ref.mean(f"new_new_{k}")) > NEW_NEW_TOLERANCE
        for k, _ in CASE_COLUMNS
    )


def paper_table(summary: Summary, scenario: str) -> Table:
    """The paper-style table of one scenario (with published columns where they apply)."""
    config = summary.configs[scenario]
    dataset = _eval_dataset(config)
    show_pub = is_paper(config) and published.has_dataset(dataset)
    old_ref = summary.reference(scenario, "old/old")
    new_ref = summary.reference(scenario, "new/new")

    rows: list[list[str]] = []
    superseded: list[str] = []
    pub_notes: dict[str, list[str]] = {}

    def add(name: str, cell: Cell | None, case: str, method: str | None) -> None:
        line = [name, *_case_cells(cell, case)]
        if show_pub:
            pub, older = published.lookup(dataset, case, method) if method else (None, [])
            line += _published_cells(pub)
            for p in older:
                superseded.append(f"{name} {p.source}: {p.values()}")
            if pub is not None and pub.notes:
                pub_notes.setdefault(f"{pub.source}: {pub.notes}", []).append(name)
        rows.append(line)

    add("old/old", old_ref, "old/old", "independent")
    add("new/new", new_ref, "new/new", "independent")
    rules = {len(rows) - 1}
    for m in summary.methods_in(scenario):
        cell = summary.cells[(scenario, m)]
        add(cell.label, cell, "cross", m)
        if _own_new_model(cell, new_ref):
            add(f"{cell.label} new/new", cell, "new/new", None)

    header = ["case", *(h for _, h in CASE_COLUMNS)]
    align = ["l"] + ["r"] * len(CASE_COLUMNS)
    groups = None
    if show_pub:
        header += [h for _, h in PUBLISHED_COLUMNS] + ["source"]
        align += ["r"] * len(PUBLISHED_COLUMNS) + ["l"]
        groups = [("", 1), ("Ours", len(CASE_COLUMNS)), ("Published", len(PUBLISHED_COLUMNS) + 1)]
    notes = _notes(summary, scenario, old_ref, new_ref)
    if show_pub:
        notes.append(
            "Published: numbers from fct/reference/published_results.csv (the FCT reference "
            "code's README); where a number was published twice the most recent is shown."
        )
        if superseded:
            notes.append("Older published values: " + "; ".join(superseded) + ".")
        if pub_notes:
            settings = (f"{note} ({', '.join(names)})" for note, names in pub_notes.items())
            notes.append("Published settings: " + "; ".join(settings) + ".")
    return Table(header, rows, align, groups, rules_after=rules, notes=notes)


def _notes(
    summary: Summary, scenario: str, old_ref: Cell | None, new_ref: Cell | None
) -> list[str]:
    cells = [summary.cells[(scenario, m)] for m in summary.methods_in(scenario)]
    notes = [
        "Values in %. Method rows are the cross case: queries embedded by the method's new "
        "model against the gallery as the method updated it. old/old and new/new are the "
        f"reference cases (old/old from {old_ref.label if old_ref else DASH}, new/new from "
        f"{new_ref.label if new_ref else DASH})."
    ]
    if any(_own_new_model(c, new_ref) for c in cells):
        notes.append(
            "A 'new/new' row under a method is that method's own new model against itself "
            "(BCT trains the new model with an influence loss, which can lower it)."
        )
    seeds = sorted({s for c in cells for s in c.seeds})
    if len(seeds) > 1:
        notes.append(f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}.")
    skipped = max(
        (
            int(r["cases"][case].get("n_skipped") or 0)
            for c in cells
            for r in c.records
            for case in CASES  # only the validated cases: a record may carry others
        ),
        default=0,
    )
    if skipped:
        notes.append(
            f"Up to {skipped} queries per case had no same-class item in the gallery and were "
            "left out of every metric."
        )
    return notes


def cost_table(summary: Summary, scenario: str) -> Table:
    """Update costs per method: backfilled fraction, throughputs, speed-up, training time."""
    header = ["method", *(f"{METRICS[k].label}" for k in COST_METRICS)]
    rows = []
    for m in summary.methods_in(scenario):
        cell = summary.cells[(scenario, m)]
        line = [cell.label]
        for k in COST_METRICS:
            stat = cell.stats[k]
            line.append(METRICS[k].format(stat.mean, stat.std))
        rows.append(line)
    notes = [
        "; ".join(
            f"{METRICS[k].label}: {METRICS[k].description}"
            + (f" ({METRICS[k].unit})" if METRICS[k].unit else "")
            for k in COST_METRICS
        )
        + ". s / item = backfilled share / backfill throughput + the rest / h throughput "
        "(0: nothing is updated)."
    ]
    return Table(header, rows, ["l"] + ["r"] * len(COST_METRICS), notes=notes)


_SPEC_FORMAT = {
    "dataset": str,
    "classes": lambda v: f"classes {v}",
    "arch": str,
    "loss": lambda v: f"{v} loss",
    "embedding_dim": lambda v: f"{v}-d",
}


def _model_line(name: str, spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return None
    # None means "the default" (e.g. classes None = all classes): say so rather than print None.
    parts = [
        fmt(spec[key]) if spec[key] is not None else ("all classes" if key == "classes" else "")
        for key, fmt in _SPEC_FORMAT.items()
        if key in spec
    ]
    parts = [p for p in parts if p]
    return f"{name}: {', '.join(parts)}" if parts else None


def describe(config: dict[str, Any]) -> list[str]:
    """Short lines describing a scenario config: kinds, old/new/side models, evaluation."""
    lines = []
    if config.get("description"):
        lines.append(str(config["description"]))
    if config.get("kinds"):
        lines.append("kinds: " + ", ".join(map(str, config["kinds"])))
    for name, key in (("old", "old"), ("new", "new"), ("side-info", "side")):
        line = _model_line(name, config.get(key))
        if line:
            lines.append(line)
    ev = config.get("eval")
    if isinstance(ev, dict):
        lines.append(
            "eval: "
            + ", ".join(f"{k} {ev[k]}" for k in ("dataset", "split", "distance") if k in ev)
            + " (leave-one-out)"
        )
    if is_paper(config):
        lines.append("paper-faithful scenario: published numbers shown where available")
    return lines


def scenario_tables(summary: Summary, scenario: str) -> ScenarioTables:
    """The tables and description of one scenario."""
    config = summary.configs[scenario]
    dataset = _eval_dataset(config) or "the evaluation set"
    caption = (
        f"Compatibility on {dataset}, scenario {scenario}: CMC top-k, mAP and mAP@R (%) over "
        "the whole evaluation split, leave-one-out."
    )
    return ScenarioTables(
        scenario,
        paper_table(summary, scenario),
        cost_table(summary, scenario),
        caption,
        describe(config),
    )


def scenario_markdown(t: ScenarioTables) -> str:
    """tables/SCENARIO.md: description, paper table with notes, cost table."""
    desc = "".join(f"- {md_line(line)}\n" for line in t.description)
    return (
        f"# {md_escape(t.scenario)}\n\n{desc}\n{md_line(t.caption)}\n\n{to_markdown(t.paper)}\n"
        f"## Update cost\n\n{to_markdown(t.costs)}"
    )


def write_tables(summary: Summary, out: Path) -> tuple[list[Path], list[ScenarioTables]]:
    """Write ``tables/SCENARIO.md`` and ``.tex`` for every scenario; return paths and tables."""
    paths, all_tables = [], []
    for s in summary.scenarios:
        t = scenario_tables(summary, s)
        all_tables.append(t)
        name = slug(s)
        paths.append(write_text(out / "tables" / f"{name}.md", scenario_markdown(t)))
        tex = to_latex(t.paper, t.caption, f"tab:fct-{name}")
        paths.append(write_text(out / "tables" / f"{name}.tex", tex))
    return paths, all_tables
