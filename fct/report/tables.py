"""Paper-style tables, one per scenario: ``tables/SCENARIO.md`` and ``tables/SCENARIO.tex``.

Rows as in the FCT paper: the reference cases old/old and new/new, then each method's cross
case; a method that trains its own new model (BCT, RACT, L2-BCT, their variants, a plugin
whose new model is not Independent's) also gets a "LABEL new/new" row, because lowering
new/new is the price BCT pays. For scenarios marked ``"paper": true`` a "Published" column
group shows the numbers of ``fct/reference/published_results.csv`` whose source's setup
matches the scenario (fct.report.published), with a footnote mark where the setups differ in
a named way. Scenarios with backfilling curves also get a table of their AUCs, beside the
published AUCs where those match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fct.io import write_text
from fct.record import CASES
from fct.report import published
from fct.report.details import methods_table, training_table, transformation_line
from fct.report.metric_table import DASH, METRICS, auc_metric, auc_top1_metric
from fct.report.records import method_settings
from fct.report.render import Table, md_escape, md_line, to_latex, to_markdown
from fct.report.summary import SMOKE_TITLE, Cell, Summary, slug

CASE_COLUMNS = (("top1", "CMC top-1"), ("top5", "CMC top-5"), ("mAP", "mAP"), ("mAP@R", "mAP@R"))
PUBLISHED_COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("mAP", "mAP"))
COST_METRICS = (
    "backfill_fraction",
    "transform_embeddings_per_s",
    "update_cost_s",
    "speedup_vs_backfill",
    "train_seconds_method",
    "train_seconds_shared",
    "train_seconds",
)
#: The split of the training time, which records written before it lack ("n/a").
TRAIN_SPLIT = ("train_seconds_method", "train_seconds_shared")
NOT_RECORDED = "n/a"
#: A method's new/new row is shown when it differs from the reference new/new by more than
#: this (percentage points): below it the difference is seed noise or rounding.
NEW_NEW_TOLERANCE = 0.05

#: The published identity of the old/old and new/new reference rows.
INDEPENDENT = ("independent", False)
PUBLISHED_NOTE = (
    "Published: numbers from fct/reference/published_results.csv whose source trained and "
    "evaluated in this scenario's setup (sources: fct/reference/README.md); where a number was "
    "published twice the most recent is shown; a mark [x] names a difference in setup."
)
BACKFILL_TITLE = "Backfilling (area under the curve)"


@dataclass
class ScenarioTables:
    """What one scenario's report shows: the paper table, the cost table, a description and
    the settings it ran with (models, transformation, methods)."""

    scenario: str
    paper: Table
    costs: Table
    caption: str
    description: list[str]
    backfill: Table | None = None
    training: Table | None = None
    transformation: str | None = None
    methods: Table | None = None
    title: str = ""


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


class Footnotes:
    """Marks ``[a]``, ``[b]``... for the named differences between a published setup and the
    scenario's; one mark per distinct text, in order of first use."""

    def __init__(self) -> None:
        self.marks: dict[str, str] = {}

    def mark(self, texts: tuple[str, ...]) -> str:
        """`` [a]`` / `` [a,b]`` for ``texts`` (empty when there are none)."""
        for text in texts:
            if text not in self.marks:
                n = len(self.marks)
                self.marks[text] = chr(ord("a") + n) if n < 26 else str(n + 1)
        # In the order the notes list them, whatever order the differences came in.
        letters = [m for t, m in self.marks.items() if t in texts]
        return f" [{','.join(letters)}]" if letters else ""

    def notes(self) -> list[str]:
        """One note per mark: ``[a] published: ...; ours: ....``"""
        return [f"[{m}] {text}." for text, m in self.marks.items()]


def _published_cells(match: published.Match | None, marks: Footnotes) -> list[str]:
    """Published top-1, top-5, mAP and source (with its footnote marks); blank without one."""
    if match is None:
        return [""] * (len(PUBLISHED_COLUMNS) + 1)
    values = [getattr(match.row, k) for k, _ in PUBLISHED_COLUMNS]
    cells = [DASH if v is None else f"{v:.1f}" for v in values]
    return cells + [match.row.source + marks.mark(match.deviations)]


def _who(cell: Cell, config: dict[str, Any]) -> tuple[str, bool] | None:
    """The published method ``cell``'s method stands for (fct.report.published.identity)."""
    settings = method_settings(cell.records[0])
    return published.identity(cell.base or cell.method, cell.method, settings, config)


def _own_new_model(summary: Summary, cell: Cell, ref: Cell | None) -> bool:
    """True when the method's new model is not the reference one: by the records' artifact
    digests or what they declare (Summary.shares_new_model); for a plugin that neither tells,
    when its new/new differs from the reference's."""
    shares = summary.shares_new_model(cell.scenario, cell.method)
    if shares is not None:
        return not shares
    if ref is None or cell.method == ref.method:
        return False
    return any(
        abs(cell.mean(f"new_new_{k}") - ref.mean(f"new_new_{k}")) > NEW_NEW_TOLERANCE
        for k, _ in CASE_COLUMNS
    )


def paper_table(summary: Summary, scenario: str) -> Table:
    """The paper-style table of one scenario (with published columns where they apply)."""
    config = summary.configs[scenario]
    show_pub = is_paper(config) and published.applies(config)
    old_ref = summary.reference(scenario, "old/old")
    new_ref = summary.reference(scenario, "new/new")

    rows: list[list[str]] = []
    superseded: list[str] = []
    pub_notes: dict[str, list[str]] = {}
    marks = Footnotes()

    def add(name: str, cell: Cell | None, case: str, who: tuple[str, bool] | None) -> None:
        line = [name, *_case_cells(cell, case)]
        if show_pub:
            match = published.lookup(config, case, who)
            line += _published_cells(match, marks)
            if match is not None:
                for p in match.older:
                    superseded.append(f"{name} {p.source}: {p.values()}")
                if match.row.notes:
                    key = f"{match.row.source}: {match.row.notes}"
                    pub_notes.setdefault(key, []).append(name)
        rows.append(line)

    add("old/old", old_ref, "old/old", INDEPENDENT)
    add("new/new", new_ref, "new/new", INDEPENDENT)
    rules = {len(rows) - 1}
    for m in summary.methods_in(scenario):
        cell = summary.cells[(scenario, m)]
        who = _who(cell, config)
        add(cell.label, cell, "cross", who)
        if _own_new_model(summary, cell, new_ref):
            add(f"{cell.label} new/new", cell, "new/new", who)

    header = ["case", *(h for _, h in CASE_COLUMNS)]
    align = ["l"] + ["r"] * len(CASE_COLUMNS)
    groups = None
    if show_pub:
        header += [h for _, h in PUBLISHED_COLUMNS] + ["source"]
        align += ["r"] * len(PUBLISHED_COLUMNS) + ["l"]
        groups = [("", 1), ("Ours", len(CASE_COLUMNS)), ("Published", len(PUBLISHED_COLUMNS) + 1)]
    notes = _notes(summary, scenario, old_ref, new_ref)
    if show_pub:
        notes.append(f"{PUBLISHED_NOTE} Setups: {'; '.join(published.matched_setups(config))}.")
        notes += marks.notes()
        if superseded:
            notes.append("Older published values: " + "; ".join(superseded) + ".")
        if pub_notes:
            settings = (f"{note} ({', '.join(names)})" for note, names in pub_notes.items())
            notes.append("Published settings: " + "; ".join(settings) + ".")
    elif is_paper(config) and (why := published.unmatched(config)):
        notes.append(
            "No published numbers shown: this scenario's setup differs from every published "
            "one (" + "; ".join(why) + ")."
        )
    return Table(header, rows, align, groups, rules_after=rules, notes=notes)


def backfill_table(summary: Summary, scenario: str) -> Table | None:
    """The AUC of every backfilling curve of the scenario, one row per (method, order), with
    the published AUC beside it where one matches (None when no run recorded curves)."""
    config = summary.configs[scenario]
    show_pub = is_paper(config) and published.applies(config)
    marks = Footnotes()
    rows = []
    for m in summary.methods_in(scenario):
        cell = summary.cells[(scenario, m)]
        who = _who(cell, config)
        for order in summary.auc_orders:
            mean = cell.stats.get(f"auc_{order}")
            if mean is None or mean.n == 0:
                continue
            top1 = cell.stats[f"top1_auc_{order}"]
            line = [
                cell.label,
                order,
                auc_top1_metric(order).format(top1.mean, top1.std),
                auc_metric(order).format(mean.mean, mean.std),
            ]
            if show_pub:
                line += _published_cells(published.lookup_auc(config, order, who), marks)
            rows.append(line)
    if not rows:
        return None
    header = ["method", "order", "AUC top-1", "AUC mAP"]
    align = ["l", "l", "r", "r"]
    groups = None
    notes = [
        "AUC: the cross case's metric averaged over the backfilling curve (0 %, 20 steps, "
        "100 % of the gallery re-encoded, 22 points), backfilled in the given order "
        "(random, or the method's own, e.g. FastFill's by decreasing uncertainty)."
    ]
    if show_pub:
        header += [h for _, h in PUBLISHED_COLUMNS] + ["source"]
        align += ["r"] * len(PUBLISHED_COLUMNS) + ["l"]
        groups = [("", 2), ("Ours", 2), ("Published", len(PUBLISHED_COLUMNS) + 1)]
        notes.append(
            "Published AUCs are rows of case 'backfill-auc ORDER' (or 'backfill-auc' for the "
            "published method's own order: FastFill uncertainty, FCT random) of "
            "fct/reference/published_results.csv whose setup matches this scenario."
        )
        notes += marks.notes()
    return Table(header, rows, align, groups, notes=notes)


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
    if any(_own_new_model(summary, c, new_ref) for c in cells):
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


#: Cost columns from the records' optional ``recovery`` key (fct.recovery), shown when any
#: record of the scenario has it.
RECOVERY_COSTS = ("fit_seconds", "query_latency_us_1", "query_latency_us_1024")


def cost_table(summary: Summary, scenario: str) -> Table:
    """Update costs per method: backfilled fraction, throughputs, speed-up, training time;
    the methods' own fit time and query-side latency when the records have them."""
    has_recovery = any(r.get("recovery") and r["scenario"] == scenario for r in summary.records)
    keys = COST_METRICS + (RECOVERY_COSTS if has_recovery else ())
    header = ["method", *(f"{METRICS[k].label}" for k in keys)]
    rows = []
    split_missing = False
    for m in summary.methods_in(scenario):
        cell = summary.cells[(scenario, m)]
        line = [cell.label]
        for k in keys:
            stat = cell.stats[k]
            if k in TRAIN_SPLIT and stat.n == 0:
                line.append(NOT_RECORDED)  # a record written before the split existed
                split_missing = True
            else:
                line.append(METRICS[k].format(stat.mean, stat.std))
        rows.append(line)
    notes = [
        "; ".join(
            f"{METRICS[k].label}: {METRICS[k].description}"
            + (f" ({METRICS[k].unit})" if METRICS[k].unit else "")
            for k in keys
        )
        + ". s / item = backfilled share / backfill throughput + the rest / h throughput "
        "(0: nothing is updated). Training times are those of the runs that trained each "
        "model; a model taken from the cache keeps the time it took when it was trained."
    ]
    if split_missing:
        notes.append(
            f"{NOT_RECORDED}: the record predates the split of training time into the "
            "method's own and the shared models'; only the total is known."
        )
    return Table(header, rows, ["l"] + ["r"] * len(keys), notes=notes)


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
    generations = config.get("models")
    if isinstance(generations, list) and generations:  # a sequence (fct.sequence)
        for k, spec in enumerate(generations):
            line = _model_line(f"generation {k}", spec)
            if line:
                lines.append(line)
        roles = (("side-info", "side"),)
    else:
        roles = (("old", "old"), ("new", "new"), ("side-info", "side"))
    for name, key in roles:
        line = _model_line(name, config.get(key))
        if line:
            lines.append(line)
    h = config.get("transformation")
    if isinstance(h, dict) and isinstance(h.get("features"), str):
        features = h["features"]
        views = h.get("views") or 1
        lines.append(
            "h: fitted online (features of freshly augmented images every step)"
            if features == "online"
            else f"h: fitted on {features} embeddings, {views} view{'s' * (views != 1)} per image"
        )
    ev = config.get("eval")
    if isinstance(ev, dict):
        lines.append(
            "eval: "
            + ", ".join(f"{k} {ev[k]}" for k in ("dataset", "split", "distance") if k in ev)
            + " (leave-one-out)"
        )
    if isinstance(config.get("protocol"), str):
        lines.append(f"protocol: {config['protocol']}")
    if is_paper(config):
        lines.append("paper-faithful scenario: published numbers shown where the setup matches")
    return lines


def scenario_tables(summary: Summary, scenario: str) -> ScenarioTables:
    """The tables and description of one scenario."""
    config = summary.configs[scenario]
    dataset = _eval_dataset(config) or "the evaluation set"
    caption = (
        f"Compatibility on {dataset}, scenario {scenario}: CMC top-k, mAP and mAP@R (%) over "
        "the whole evaluation split, leave-one-out."
    )
    if summary.smoke:
        caption = f"{SMOKE_TITLE}. {caption}"
    return ScenarioTables(
        scenario,
        paper_table(summary, scenario),
        cost_table(summary, scenario),
        caption,
        describe(config),
        backfill_table(summary, scenario),
        training_table(config),
        transformation_line(config),
        methods_table(summary, scenario),
        summary.title(scenario),
    )


SETTINGS_TITLE = "Settings"


def scenario_markdown(t: ScenarioTables) -> str:
    """tables/SCENARIO.md: description, paper table with notes, backfilling AUCs (when
    recorded), cost table, settings (models, transformation, methods)."""
    desc = "".join(f"- {md_line(line)}\n" for line in t.description)
    backfill = (
        f"## {BACKFILL_TITLE}\n\n{to_markdown(t.backfill)}\n" if t.backfill is not None else ""
    )
    settings = "".join(
        [
            f"\n## {SETTINGS_TITLE}\n\n",
            f"{to_markdown(t.training)}\n" if t.training is not None else "",
            f"{md_line(t.transformation)}\n\n" if t.transformation else "",
            to_markdown(t.methods) if t.methods is not None else "",
        ]
    )
    return (
        f"# {md_escape(t.title or t.scenario)}\n\n{desc}\n{md_line(t.caption)}\n\n"
        f"{to_markdown(t.paper)}\n{backfill}## Update cost\n\n{to_markdown(t.costs)}{settings}"
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
