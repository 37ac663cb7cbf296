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

#: Training time of a run (``costs``): the total (every artifact it used), and since the split
#: was recorded, the artifacts trained for this method alone and those shared by every method.
TRAIN_SECONDS = ("train_seconds", "train_seconds_method", "train_seconds_shared")
#: Model roles (``models``) shared by every method of a (scenario, seed): they must be one model.
SHARED_ROLES = ("old", "side")

#: Key added to each loaded record: the file it came from (for messages and provenance).
SOURCE_KEY = "_path"


def _hint(rec: dict[str, Any]) -> str:
    suite = _short(rec["suite"]) if isinstance(rec.get("suite"), str) else "SUITE"
    return f"rerun `fct run {suite}` to rewrite it, or delete the file"


#: Largest magnitude of a number in a record. Ours are percentages, seconds and throughputs,
#: far below it; anything larger is not a measurement, and sums of it overflow a float.
NUMBER_MAX = 1e15
#: Longest suite, scenario, method name or label: they become file names and plot labels.
NAME_MAX = 200

_KINDS = {
    "int": "an integer",
    "str": "a string",
    "dict": "an object",
    "list": "a list",
    "bool": "true or false",
    "number": f"a finite number of magnitude at most {NUMBER_MAX:g}",
}


def _describe(kind: str) -> str:
    """'an integer', 'an integer or null' for kind 'int', 'int|null'."""
    base = _KINDS[kind.removesuffix("|null")]
    return base + (" or null" if kind.endswith("|null") else "")


def _is_kind(value: Any, kind: str) -> bool:
    if value is None:
        return kind.endswith("|null")
    kind = kind.removesuffix("|null")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true/false is not a number or a seed
        return False
    if kind == "number":
        if isinstance(value, int):  # exact: math.isfinite() of a 400-digit int overflows
            return abs(value) <= NUMBER_MAX
        # NaN and inf can be read from JSON but are no metric value.
        return isinstance(value, float) and math.isfinite(value) and abs(value) <= NUMBER_MAX
    return isinstance(value, {"int": int, "str": str, "dict": dict, "list": list}[kind])


def _short(text: str, limit: int = 60) -> str:
    """A name from a record, cut for a one-line message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(value: Any, limit: int = 60) -> str:
    """A short repr for a message: a record may hold a megabyte string or a 4,000-digit int."""
    if isinstance(value, dict | list):
        return f"{type(value).__name__} of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        # str() of an int over 4,300 digits raises; the bit length gives the size just as well.
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _require(rec: dict[str, Any], path: Path, dotted: str, kind: str) -> Any:
    """Return ``rec[a][b]...`` for ``dotted`` = 'a.b'; a missing key or wrong type raises."""
    node: Any = rec
    parts = dotted.split(".")
    # Case names contain a slash, never a dot, so splitting on dots is unambiguous.
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            # Say which key has the wrong type, not that the key below it is missing.
            raise FCTError(
                f"{path}: key '{'.'.join(parts[:i])}' must be an object, got {_shown(node)}; "
                f"{_hint(rec)}"
            )
        if part not in node:
            raise FCTError(f"{path}: missing key '{'.'.join(parts[: i + 1])}'; {_hint(rec)}")
        node = node[part]
    if not _is_kind(node, kind):
        raise FCTError(
            f"{path}: key '{dotted}' must be {_describe(kind)}, got {_shown(node)}; {_hint(rec)}"
        )
    return node


def _optional(rec: dict[str, Any], path: Path, dotted: str, kind: str) -> Any:
    """Like _require for a key that may be absent (then None); its parents must be objects."""
    node: Any = rec
    for part in dotted.split(".")[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or dotted.split(".")[-1] not in node:
        return None
    return _require(rec, path, dotted, kind if kind.endswith("|null") else kind + "|null")


def parse_date(value: str, path: Path | str = "record") -> datetime:
    """Parse an ISO-8601 provenance date (``Z`` allowed); a naive date is taken as UTC."""
    try:
        date = datetime.fromisoformat(value)
    except ValueError as e:
        raise FCTError(
            f"{path}: key 'provenance.date' is not an ISO-8601 date ({_shown(value)}); "
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
            f"{path}: key 'schema' is {_shown(schema)}, this fct reads schema {SCHEMA}; "
            "rerun the suite with this fct version or use a matching fct"
        )
    for key in ("suite", "scenario", "method"):
        name = _require(rec, path, key, "str")
        if not name.strip():
            raise FCTError(f"{path}: key '{key}' is empty; {_hint(rec)}")
        if len(name) > NAME_MAX:
            raise FCTError(
                f"{path}: key '{key}' is {len(name)} characters, over {NAME_MAX}; {_hint(rec)}"
            )
    seed = _require(rec, path, "seed", "int")
    if not 0 <= seed < 2**63:
        raise FCTError(f"{path}: key 'seed' must be a non-negative 64-bit integer; {_hint(rec)}")
    _require(rec, path, "scenario_config", "dict")
    _require(rec, path, "method_config", "dict")
    for case in CASES:
        for metric in CASE_METRICS:
            _require(rec, path, f"cases.{case}.{metric}", "number")
        skipped = _optional(rec, path, f"cases.{case}.n_skipped", "int")
        if skipped is not None and skipped < 0:
            raise FCTError(f"{path}: key 'cases.{case}.n_skipped' is negative; {_hint(rec)}")
    fraction = _require(rec, path, "costs.backfill_fraction", "number")
    if not 0 <= fraction <= 1:
        raise FCTError(
            f"{path}: key 'costs.backfill_fraction' must be between 0 and 1, got {fraction}; "
            f"{_hint(rec)}"
        )
    for key in (
        *TRAIN_SECONDS,
        "transform_embeddings_per_s",
        "backfill_images_per_s",
        "speedup_vs_backfill",
    ):
        if key in rec["costs"]:
            value = _require(rec, path, f"costs.{key}", "number|null")
            if value is not None and value < 0:
                raise FCTError(f"{path}: key 'costs.{key}' is negative ({value}); {_hint(rec)}")
    parse_date(_require(rec, path, "provenance.date", "str"), path)
    _require(rec, path, "provenance.device", "str")
    _validate_curves(rec, path)
    _validate_shown(rec, path)
    _validate_artifacts(rec, path)
    _validate_notes(rec, path)
    return rec


#: Optional keys the report shows, with the type it needs to show them.
_SHOWN = (
    ("label", "str"),
    ("method_config.label", "str"),
    ("method_config.base", "str"),
    ("method_config.settings", "dict"),
    ("scenario_config.description", "str"),
    ("scenario_config.kinds", "list"),
    ("scenario_config.paper", "bool"),
    ("scenario_config.old", "dict"),
    ("scenario_config.new", "dict"),
    ("scenario_config.side", "dict"),
    ("scenario_config.eval", "dict"),
    ("scenario_config.eval.dataset", "str"),
    ("scenario_config.eval.distance", "str"),
    ("scenario_config.protocol", "str"),
    ("scenario_config.transformation", "dict"),
    ("scenario_config.transformation.features", "str"),
    ("scenario_config.transformation.views", "int"),
    ("scenario_config.side.dataset", "str"),
    ("smoke", "bool"),
    ("config_hash", "str"),
    ("notes", "dict"),
    ("provenance.fct_version", "str"),
    ("provenance.git_sha", "str"),
    ("provenance.torch", "str"),
    ("provenance.python", "str"),
    ("provenance.world_size", "int"),
    ("cases_cosine", "dict"),
    ("diagnostics", "dict"),
    ("diagnostics.cross_norm_ratio", "number"),
    ("backfill_curves", "dict"),
    ("backfill_curves.auc_top1", "dict"),
)


def _validate_shown(rec: dict[str, Any], path: Path) -> None:
    """The optional keys the report reads for labels and descriptions: absent, null or typed."""
    for dotted, kind in _SHOWN:
        _optional(rec, path, dotted, kind)
    for dotted, value in (
        ("label", rec.get("label")),
        ("method_config.label", rec["method_config"].get("label")),
        ("method_config.base", rec["method_config"].get("base")),
    ):
        if isinstance(value, str) and len(value) > NAME_MAX:
            raise FCTError(
                f"{path}: key '{dotted}' is {len(value)} characters, over {NAME_MAX}; {_hint(rec)}"
            )
    # The cosine cases and top-1 AUCs are shown as numbers: each one present must be one.
    for case in CASES:
        _optional(rec, path, f"cases_cosine.{case}", "dict")
        for metric in CASE_METRICS:
            _optional(rec, path, f"cases_cosine.{case}.{metric}", "number")
    auc_top1 = (rec.get("backfill_curves") or {}).get("auc_top1") or {}
    for order, value in auc_top1.items():
        # Checked here, not with _require: an order name may contain a dot.
        if not _is_kind(value, "number|null"):
            raise FCTError(
                f"{path}: key 'backfill_curves.auc_top1' holds {_shown(value)} for order "
                f"{_shown(order)}, not a finite number; {_hint(rec)}"
            )


def _validate_artifacts(rec: dict[str, Any], path: Path) -> None:
    """Optional ``artifacts`` {"KIND/NAME": key digest}, ``artifact_weights`` {"KIND/NAME":
    weights digest or null} and ``models`` {role: "KIND/NAME"}: what the run was made from."""
    for key, nullable in (("artifacts", False), ("artifact_weights", True), ("models", False)):
        for name, value in (_optional(rec, path, key, "dict") or {}).items():
            if value is None and nullable:
                continue
            if not isinstance(value, str) or not value or len(value) > NAME_MAX:
                what = "an artifact name" if key == "models" else "a digest string"
                raise FCTError(
                    f"{path}: key '{key}.{_short(name)}' must be {what}, got {_shown(value)}; "
                    f"{_hint(rec)}"
                )


def _validate_notes(rec: dict[str, Any], path: Path) -> None:
    """Optional ``notes`` (the method's Deployment.notes): an object whose keys are short."""
    for name in _optional(rec, path, "notes", "dict") or {}:
        if len(name) > NAME_MAX:
            raise FCTError(
                f"{path}: key 'notes' has a key of {len(name)} characters, over {NAME_MAX}; "
                f"{_hint(rec)}"
            )


def is_smoke(rec: dict[str, Any]) -> bool:
    """True for a record of ``fct run --smoke`` (a wiring test); absent in older records."""
    return rec.get("smoke") is True


def _validate_curves(rec: dict[str, Any], path: Path) -> None:
    """The optional backfilling ``curves`` {order: [numbers]} and ``auc`` {order: number}."""
    for key in ("curves", "auc"):
        if rec.get(key) is None:
            continue
        _require(rec, path, key, "dict")
        for order, value in rec[key].items():
            if not order or len(order) > NAME_MAX:  # an order names CSV columns and legends
                raise FCTError(
                    f"{path}: key '{key}' has an order name of {len(order)} characters "
                    f"(1 to {NAME_MAX} allowed); {_hint(rec)}"
                )
            ok = (
                _is_kind(value, "number")
                if key == "auc"
                else isinstance(value, list) and value and all(_is_kind(v, "number") for v in value)
            )
            if not ok:
                want = "a number" if key == "auc" else "a non-empty list of numbers"
                raise FCTError(f"{path}: key '{key}.{order}' must be {want}; {_hint(rec)}")


def method_base(rec: dict[str, Any]) -> str:
    """The registered method a record ran: ``method_config.base``, else its run name.

    A suite variant (``bct_scaled``) names its base (``bct``); records written before variants
    existed have no ``base``, and their run name was the registered name.
    """
    base = rec["method_config"].get("base")
    return base.strip() if isinstance(base, str) and base.strip() else rec["method"]


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
            f"{_short(smoke['suite'])} --smoke` writes results/SUITE-smoke) and move or delete "
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
                    "key": (f"different versions of {_short(name)}", "--force"),
                    "weights": (f"different trained weights of {_short(name)}", "--rerun"),
                    "role": (f"different {name} models", "--force"),
                }[kind]
                differ = f"{_short(first, 30)} vs {_short(value, 30)}"
                raise _mixed(other, rec, f"{what} ({differ})", flag)


def _mixed(first: dict[str, Any], rec: dict[str, Any], what: str, flag: str) -> FCTError:
    """The one-line error for two records of one scenario and seed made from other models."""
    seed = rec["seed"]
    rerun = f"fct run {_short(rec['suite'])} --scenarios {_short(rec['scenario'])}" + (
        f" --seeds {seed}" if seed else ""
    )
    return FCTError(
        f"run records {first[SOURCE_KEY]} and {rec[SOURCE_KEY]} (scenario "
        f"{_short(rec['scenario'])}, seed {seed}) were made from {what}, so they cannot be "
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
