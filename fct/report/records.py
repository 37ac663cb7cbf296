"""Reading run records: find, validate, merge several results folders.

A run record is one JSON per (scenario, method, seed) under ``RESULTS/runs/``. Records are
grouped by what they say (their ``suite``, ``scenario``, ``method`` and ``seed`` keys), not by
their file names, so folders copied from several machines can be merged as they are.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.io import read_json

log = logging.getLogger(__name__)

SCHEMA = 1
CASES = ("old/old", "new/new", "cross")
CASE_METRICS = ("top1", "top5", "mAP", "mAP@R")

#: Key added to each loaded record: the file it came from (for messages and provenance).
SOURCE_KEY = "_path"


def _hint(rec: dict[str, Any]) -> str:
    suite = rec.get("suite") if isinstance(rec.get("suite"), str) else "SUITE"
    return f"rerun `fct run {suite}` to rewrite it, or delete the file"


_KINDS = {
    "int": "an integer",
    "str": "a string",
    "dict": "an object",
    "list": "a list",
    "number": "a finite number",
    "number|null": "a finite number or null",
}


def _is_kind(value: Any, kind: str) -> bool:
    if value is None:
        return kind == "number|null"
    if isinstance(value, bool):  # JSON true/false is not a number or a seed
        return False
    if kind.startswith("number"):
        # NaN and inf can be read from JSON but are no metric value.
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, {"int": int, "str": str, "dict": dict, "list": list}[kind])


def _require(rec: dict[str, Any], path: Path, dotted: str, kind: str) -> Any:
    """Return ``rec[a][b]...`` for ``dotted`` = 'a.b'; a missing key or wrong type raises."""
    node: Any = rec
    parts = dotted.split(".")
    # Case names contain a slash, never a dot, so splitting on dots is unambiguous.
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise FCTError(f"{path}: missing key '{'.'.join(parts[: i + 1])}'; {_hint(rec)}")
        node = node[part]
    if not _is_kind(node, kind):
        raise FCTError(f"{path}: key '{dotted}' must be {_KINDS[kind]}, got {node!r}; {_hint(rec)}")
    return node


def parse_date(value: str, path: Path | str = "record") -> datetime:
    """Parse an ISO-8601 provenance date (``Z`` allowed); a naive date is taken as UTC."""
    try:
        date = datetime.fromisoformat(value)
    except ValueError as e:
        raise FCTError(
            f"{path}: key 'provenance.date' is not an ISO-8601 date ({value!r}); "
            "rerun the scenario or fix the date"
        ) from e
    return date if date.tzinfo else date.replace(tzinfo=UTC)


def validate_record(rec: Any, path: Path | str) -> dict[str, Any]:
    """Check one record against the schema; return it, or raise FCTError naming file and key.

    Required: ``schema`` (= 1), ``suite``, ``scenario``, ``method``, ``seed``,
    ``scenario_config``, ``method_config``, every case's top1/top5/mAP/mAP@R,
    ``costs.backfill_fraction`` and ``provenance.date``/``provenance.device``. The other cost
    keys may be null or absent. Optional ``curves`` and ``auc`` are checked when present.
    """
    path = Path(path)
    if not isinstance(rec, dict):
        raise FCTError(f"{path}: a run record must be a JSON object; delete the file and rerun")
    schema = _require(rec, path, "schema", "int")
    if schema != SCHEMA:
        raise FCTError(
            f"{path}: key 'schema' is {schema}, this fct reads schema {SCHEMA}; "
            "rerun the suite with this fct version or use a matching fct"
        )
    for key in ("suite", "scenario", "method"):
        if not _require(rec, path, key, "str"):
            raise FCTError(f"{path}: key '{key}' is empty; {_hint(rec)}")
    _require(rec, path, "seed", "int")
    _require(rec, path, "scenario_config", "dict")
    _require(rec, path, "method_config", "dict")
    for case in CASES:
        for metric in CASE_METRICS:
            _require(rec, path, f"cases.{case}.{metric}", "number")
    fraction = _require(rec, path, "costs.backfill_fraction", "number")
    if not 0 <= fraction <= 1:
        raise FCTError(
            f"{path}: key 'costs.backfill_fraction' must be between 0 and 1, got {fraction}; "
            f"{_hint(rec)}"
        )
    for key in (
        "train_seconds",
        "transform_embeddings_per_s",
        "backfill_images_per_s",
        "speedup_vs_backfill",
    ):
        if key in rec["costs"]:
            _require(rec, path, f"costs.{key}", "number|null")
    parse_date(_require(rec, path, "provenance.date", "str"), path)
    _require(rec, path, "provenance.device", "str")
    _validate_curves(rec, path)
    return rec


def _validate_curves(rec: dict[str, Any], path: Path) -> None:
    """The optional backfilling ``curves`` {order: [numbers]} and ``auc`` {order: number}."""
    for key in ("curves", "auc"):
        if rec.get(key) is None:
            continue
        _require(rec, path, key, "dict")
        for order, value in rec[key].items():
            ok = (
                _is_kind(value, "number")
                if key == "auc"
                else isinstance(value, list) and value and all(_is_kind(v, "number") for v in value)
            )
            if not ok:
                want = "a number" if key == "auc" else "a non-empty list of numbers"
                raise FCTError(f"{path}: key '{key}.{order}' must be {want}; {_hint(rec)}")


def _record_files(folder: Path) -> list[Path]:
    runs = folder / "runs"
    if not runs.is_dir():
        return []
    # Skip hidden files: fct.io writes '.NAME.xxx.tmp' beside the target while writing.
    return sorted(p for p in runs.rglob("*.json") if p.is_file() and not p.name.startswith("."))


def _identity(rec: dict[str, Any]) -> tuple[str, str, str, int]:
    return (rec["suite"], rec["scenario"], rec["method"], rec["seed"])


def load_records(
    results_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    suite: str | None = None,
) -> list[dict[str, Any]]:
    """Load, validate and merge the run records under each ``RESULTS/runs/`` folder.

    Returns one dict per (suite, scenario, method, seed), sorted by those keys, each with its
    source file under the extra key ``"_path"``. When two records have the same identity (two
    machines ran the same seed), the one with the later ``provenance.date`` is kept and a
    warning is logged; on equal dates the folder listed first wins. ``suite`` keeps only that
    suite's records. No records, or a bad one, raise FCTError.
    """
    if isinstance(results_dirs, str | os.PathLike):
        results_dirs = [results_dirs]
    folders = [Path(d) for d in results_dirs]
    if not folders:
        raise FCTError("no results folder given; pass the folder `fct run` wrote (results/SUITE)")
    for folder in folders:
        if not folder.is_dir():
            raise FCTError(f"results folder {folder} does not exist; check the path")

    kept: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for folder in folders:
        for path in _record_files(folder):
            rec = validate_record(read_json(path), path)
            rec = {**rec, SOURCE_KEY: str(path)}
            key = _identity(rec)
            if key in kept:
                rec = _newer(kept[key], rec)
            kept[key] = rec

    where = ", ".join(f"{f}/runs" for f in folders)
    if not kept:
        raise FCTError(f"no run records under {where}; run `fct run {suite or 'SUITE'}` first")
    records = [kept[k] for k in sorted(kept)]
    if suite is not None:
        others = sorted({r["suite"] for r in records} - {suite})
        records = [r for r in records if r["suite"] == suite]
        if not records:
            raise FCTError(
                f"no run records for suite '{suite}' under {where} (found: {', '.join(others)}); "
                f"run `fct run {suite}` first or pass that suite's results folder"
            )
        if others:
            log.warning(
                "ignoring run records of other suites (%s) under %s", ", ".join(others), where
            )
    return records


def _newer(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Of two records with the same identity, the one with the later provenance date."""
    d_old = parse_date(old["provenance"]["date"], old[SOURCE_KEY])
    d_new = parse_date(new["provenance"]["date"], new[SOURCE_KEY])
    keep, drop = (new, old) if d_new > d_old else (old, new)
    suite, scenario, method, seed = _identity(old)
    log.warning(
        "duplicate run record for %s/%s/%s seed %d: keeping %s (%s), ignoring %s (%s)",
        suite,
        scenario,
        method,
        seed,
        keep[SOURCE_KEY],
        keep["provenance"]["date"],
        drop[SOURCE_KEY],
        drop["provenance"]["date"],
    )
    return keep
