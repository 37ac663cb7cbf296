"""What a report's numbers were made from: provenance of the runs and each scenario's settings.

Read from the records only (``provenance``, ``scenario_config``, ``method_config`` and
``notes``), whose values may be any JSON: every value is shown through :func:`value_text`,
which never fails and never runs long.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC
from typing import Any

from fct.record import NUMBER_MAX, parse_date
from fct.report.metric_table import DASH
from fct.report.records import method_settings
from fct.report.render import Table
from fct.report.summary import Summary

#: Longest text a setting, note or provenance value is shown with.
TEXT_MAX = 160

#: Columns of the training-settings table: (key in a model spec, header).
MODEL_COLUMNS = (
    ("dataset", "dataset"),
    ("classes", "classes"),
    ("max_per_class", "images per class"),
    ("arch", "arch"),
    ("image_size", "image size"),
    ("loss", "loss"),
    ("embedding_dim", "embedding dim"),
    ("epochs", "epochs"),
    ("lr", "lr"),
    ("batch_size", "batch"),
    ("optimizer", "optimizer"),
)
MODEL_ROLES = (("old", "old"), ("new", "new (Independent's)"), ("side", "side-information"))

#: Provenance rows: (key in ``provenance``, row title).
PROVENANCE_KEYS = (
    ("fct_version", "fct version"),
    ("git_sha", "git sha"),
    ("device", "device"),
    ("world_size", "world size (processes)"),
    ("python", "python"),
    ("torch", "torch"),
)


def value_text(value: Any, limit: int = TEXT_MAX) -> str:
    """A compact, bounded text of any JSON value: ``0.1``, ``true``, ``[0, 5]``, ``{a: 1}``."""
    parts: list[str] = []
    budget = [limit + 1]

    def put(text: str) -> bool:
        parts.append(text)
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(v: Any) -> bool:
        if isinstance(v, bool) or v is None:
            return put(json.dumps(v))
        if isinstance(v, int):
            # str() of an int over 4,300 digits raises; a record is untrusted.
            return put(str(v) if abs(v) <= NUMBER_MAX else f"~1e{int(v.bit_length() * 0.30103)}")
        if isinstance(v, float):
            return put(f"{v:g}")
        if isinstance(v, str):
            return put(v[: budget[0]])
        items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
        if not put("{" if isinstance(v, dict) else "["):
            return False
        for i, (k, x) in enumerate(items):
            if (i and not put(", ")) or (isinstance(v, dict) and not put(f"{k[:TEXT_MAX]}: ")):
                return False
            if not walk(x):
                return False
        return put("}" if isinstance(v, dict) else "]")

    if not isinstance(value, dict | list | str | int | float | type(None)):
        value = str(value)
    walk(value)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mapping_text(values: dict[str, Any]) -> str:
    """``key=value, ...`` sorted by key (``–`` for an empty mapping)."""
    if not values:
        return DASH
    return value_text(", ".join(f"{k}={value_text(values[k])}" for k in sorted(values)))


def _model_value(key: str, value: Any) -> str:
    if value is None:
        return "all" if key in ("classes", "max_per_class") else "default"
    if (
        key == "classes"
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    ):
        return f"{value[0]}-{value[1] - 1}"  # a half-open range [first, end)
    return value_text(value)


def training_table(config: dict[str, Any]) -> Table | None:
    """The models' training settings (old, new, side-information), one row per model; None
    when the record carries no model spec. Columns no model has are left out."""
    specs = [(title, config.get(key)) for key, title in MODEL_ROLES]
    specs = [(title, spec) for title, spec in specs if isinstance(spec, dict)]
    columns = [(k, h) for k, h in MODEL_COLUMNS if any(k in spec for _, spec in specs)]
    if not specs or not columns:
        return None
    rows = [
        [title, *(_model_value(k, spec[k]) if k in spec else DASH for k, _ in columns)]
        for title, spec in specs
    ]
    header = ["model", *(h for _, h in columns)]
    notes = [
        "classes: the training classes (a range of label numbers); images per class: training "
        "items kept per class (all: the whole training split)."
    ]
    return Table(header, rows, ["l"] * len(header), notes=notes)


def transformation_line(config: dict[str, Any]) -> str | None:
    """The transformation h's settings as one ``key=value`` line (None when not recorded)."""
    h = config.get("transformation")
    if not isinstance(h, dict) or not h:
        return None
    return "transformation h: " + mapping_text(h)


def _notes_text(records: list[dict[str, Any]]) -> str:
    """A method's ``notes`` over its seeds: once when every seed says the same, else per seed."""
    by_seed = {r["seed"]: r.get("notes") for r in records if r.get("notes")}
    texts = {seed: mapping_text(notes) for seed, notes in by_seed.items()}
    if not texts:
        return ""
    if len(set(texts.values())) == 1 and len(texts) == len(records):
        return next(iter(texts.values()))
    return value_text("; ".join(f"seed {s}: {t}" for s, t in sorted(texts.items())), 2 * TEXT_MAX)


def methods_table(summary: Summary, scenario: str) -> Table:
    """Each method of the scenario: run name, registered base, settings and (when any method
    has some) its notes (``Deployment.notes``)."""
    rows = []
    for m in summary.methods_in(scenario):
        cell = summary.cells[(scenario, m)]
        rec = cell.records[0]
        rows.append(
            [
                cell.label,
                m,
                summary.base(m),
                mapping_text(method_settings(rec)),
                _notes_text(cell.records),
            ]
        )
    header = ["method", "run name", "base", "settings"]
    if any(r[-1] for r in rows):
        header.append("notes")
    else:
        rows = [r[:-1] for r in rows]
    notes = ["settings: the method's settings as the suite set them (method_config.settings)."]
    if "notes" in header:
        notes.append("notes: what the method reported about its fit (Deployment.notes).")
    return Table(header, rows, ["l"] * len(header), notes=notes)


def _counted(values: list[Any]) -> str:
    """``a (3 runs); b (1 run)``, most common first; ``unknown`` for records without one."""
    counts = Counter("unknown" if v is None else value_text(v) for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(
        f"{v} ({n} run{'s' * (n != 1)})" for v, n in sorted(counts.items(), key=lambda i: -i[1])
    )


def provenance_table(records: list[dict[str, Any]]) -> Table:
    """Where and with what the records were made: versions, git sha, devices, dates."""
    rows = [
        [title, _counted([r["provenance"].get(key) for r in records])]
        for key, title in PROVENANCE_KEYS
    ]
    dates = sorted(parse_date(r["provenance"]["date"]) for r in records)
    first, last = (d.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") for d in (dates[0], dates[-1]))
    rows.insert(3, ["dates", first if first == last else f"{first} to {last}"])
    notes = [
        "From the run records' provenance; a value that differs between runs is listed with "
        "its number of runs (unknown: the record predates that field)."
    ]
    return Table(["", "value"], rows, ["l", "l"], notes=notes)
