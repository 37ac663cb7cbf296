"""Reading run records: find, validate, merge several results folders.

A run record is one JSON per (scenario, method, seed) under ``RESULTS/runs/``; what it holds
and how it is checked is fct.record (``RunRecord``, shared with the runner). Records are
grouped by what they say (their ``suite``, ``scenario``, ``method`` and ``seed`` keys), not by
their file names, so folders copied from several machines can be merged as they are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.io import read_json
from fct.record import (  # noqa: F401  (validate_record: re-exported for fct.report)
    RunRecord,
    parse_date,
    shorten,
    validate_record,
)

log = logging.getLogger(__name__)

#: Model roles (``models``) shared by every method of a (scenario, seed): they must be one model.
SHARED_ROLES = ("old", "side")

#: Key added to each loaded record: the file it came from (for messages and provenance).
SOURCE_KEY = "_path"


def is_smoke(rec: dict[str, Any]) -> bool:
    """True for a record of ``fct run --smoke`` (a wiring test); absent in older records."""
    return rec.get("smoke") is True


def method_settings(rec: dict[str, Any]) -> dict[str, Any]:
    """The method's settings (``method_config.settings``); empty for older records."""
    settings = rec["method_config"].get("settings")
    return settings if isinstance(settings, dict) else {}


def record_label(rec: dict[str, Any]) -> str | None:
    """The display label a record gives its method: ``label``, else ``method_config.label``."""
    for label in (rec.get("label"), rec["method_config"].get("label")):
        if isinstance(label, str) and label.strip():
            return label.strip()
    return None


def record_files(folder: Path) -> list[Path]:
    """Every ``*.json`` under ``folder/runs`` (hidden temp files aside); [] without runs/."""
    runs = folder / "runs"
    if not runs.is_dir():
        return []
    # Skip hidden files: fct.io writes '.NAME.xxx.tmp' beside the target while writing. Keep
    # everything else named *.json, folders and FIFOs included: read_json names what is not a
    # regular file, where an is_file() filter would drop a record without a word.
    return sorted(p for p in runs.rglob("*.json") if not p.name.startswith("."))


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
        for path in record_files(folder):
            rec = {**RunRecord.from_json(read_json(path), path).as_dict(), SOURCE_KEY: str(path)}
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
    check_same_artifacts(records)
    check_not_mixed_smoke(records)
    return records


def check_not_mixed_smoke(records: list[dict[str, Any]]) -> None:
    """Refuse a report mixing ``--smoke`` records (a wiring test) with full runs."""
    smoke = next((r for r in records if is_smoke(r)), None)
    full = next((r for r in records if not is_smoke(r)), None)
    if smoke is not None and full is not None:
        raise FCTError(
            f"run records {smoke[SOURCE_KEY]} (a --smoke run) and {full[SOURCE_KEY]} (a full "
            "run) cannot be reported together; keep smoke runs in their own folder (`fct run "
            f"{shorten(smoke['suite'])} --smoke` writes results/SUITE-smoke) and move or delete "
            "the other records"
        )


def check_same_artifacts(records: list[dict[str, Any]]) -> None:
    """Refuse records of one (suite, scenario, seed) made from different models.

    Every record lists the artifacts it used (``artifacts``: ``"models/NAME": key digest``),
    since ``artifact_weights`` the digest of each one's trained weights, and in ``models`` which
    artifact played which part. Two records of the same scenario and seed are not ranked
    together (FCTError naming both files) when they name one artifact with different key
    digests (one was retrained with other settings since), or with different weights (the same
    settings trained again elsewhere: another machine or library version), or when their old
    or side-information models are different artifacts. One pass, one dict lookup each.
    """
    seen: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    for rec in records:
        where = (rec["suite"], rec["scenario"], rec["seed"])
        models = rec.get("models") or {}
        checks = [
            *(("key", *item) for item in (rec.get("artifacts") or {}).items()),
            # null: the runner could not read that artifact's manifest
            *(("weights", *item) for item in (rec.get("artifact_weights") or {}).items()),
            *(("role", role, models.get(role)) for role in SHARED_ROLES),
        ]
        for kind, name, value in checks:
            if value is None:
                continue
            first, other = seen.setdefault((*where, kind, name), (value, rec))
            if first != value:
                what, flag = {
                    "key": (f"different versions of {shorten(name)}", "--force"),
                    "weights": (f"different trained weights of {shorten(name)}", "--rerun"),
                    "role": (f"different {name} models", "--force"),
                }[kind]
                differ = f"{shorten(first, 30)} vs {shorten(value, 30)}"
                raise _mixed(other, rec, f"{what} ({differ})", flag)


def _mixed(first: dict[str, Any], rec: dict[str, Any], what: str, flag: str) -> FCTError:
    """The one-line error for two records of one scenario and seed made from other models."""
    seed = rec["seed"]
    rerun = f"fct run {shorten(rec['suite'])} --scenarios {shorten(rec['scenario'])}" + (
        f" --seeds {seed}" if seed else ""
    )
    return FCTError(
        f"run records {first[SOURCE_KEY]} and {rec[SOURCE_KEY]} (scenario "
        f"{shorten(rec['scenario'])}, seed {seed}) were made from {what}, so they cannot be "
        f"ranked together; rerun them with `{rerun} {flag}`, or keep one in its own --out"
    )


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
