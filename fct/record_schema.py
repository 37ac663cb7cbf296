"""The run record's schema: its version, case and metric names, and the validation of every key
the report reads, with one-line errors naming the file and the key.

Split from fct.record (which re-exports these names) so the record's type and its checks each
stay one readable module. A ground-floor module: it imports fct.errors only.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fct.errors import FCTError

SCHEMA = 1
CASES = ("old/old", "new/new", "cross")
CASE_METRICS = ("top1", "top5", "mAP", "mAP@R")
#: Optional per-case flip rates against old/old (fct.flips), in percent: the cross case's.
FLIP_METRICS = ("nfr", "pfr")

#: Training time of a run (``costs``): the total (every artifact it used), and since the split
#: was recorded, the artifacts trained for this method alone and those shared by every method.
TRAIN_SECONDS = ("train_seconds", "train_seconds_method", "train_seconds_shared")


#: Largest magnitude of a number in a record. Ours are percentages, seconds and throughputs,
#: far below it; anything larger is not a measurement, and sums of it overflow a float.
NUMBER_MAX = 1e15
#: Longest suite, scenario, method name or label: they become file names and plot labels.
NAME_MAX = 200


def _hint(rec: dict[str, Any]) -> str:
    suite = shorten(rec["suite"]) if isinstance(rec.get("suite"), str) else "SUITE"
    return f"rerun `fct run {suite}` to rewrite it, or delete the file"


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


def shorten(text: str, limit: int = 60) -> str:
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
        for metric in FLIP_METRICS:  # absent in records written before flip rates
            _optional(rec, path, f"cases.{case}.{metric}", "number")
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
    _validate_sequence(rec, path)
    _validate_recovery(rec, path)
    return rec


def _validate_recovery(rec: dict[str, Any], path: Path) -> None:
    """Optional ``recovery`` (fct.recovery): recall recovery ``top1`` and ``mAP`` (cross over
    new/new), ``direction``, ``fit_seconds``, ``query_latency_us`` {batch: microseconds}."""
    if _optional(rec, path, "recovery", "dict") is None:
        return
    for key in ("top1", "mAP", "fit_seconds"):
        value = _optional(rec, path, f"recovery.{key}", "number")
        if value is not None and value < 0:
            raise FCTError(f"{path}: key 'recovery.{key}' is negative ({value}); {_hint(rec)}")
    _optional(rec, path, "recovery.direction", "str")
    for batch, value in (_optional(rec, path, "recovery.query_latency_us", "dict") or {}).items():
        if not _is_kind(value, "number|null") or (value is not None and value < 0):
            raise FCTError(
                f"{path}: key 'recovery.query_latency_us' holds {_shown(value)} for batch "
                f"{_shown(batch)}, not a non-negative number; {_hint(rec)}"
            )


#: Optional keys the report shows or reads, with the type it needs.
_SHOWN = (
    ("label", "str"),
    ("method_config.label", "str"),
    ("method_config.base", "str"),
    ("method_config.settings", "dict"),
    ("method_config.report_order", "int"),
    ("method_config.role", "str"),
    ("method_config.keeps_new_model", "bool"),
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
    ("backfill_curves.nfr", "dict"),
    ("backfill_curves.pfr", "dict"),
)


def _validate_shown(rec: dict[str, Any], path: Path) -> None:
    """The optional keys the report reads for labels and descriptions: absent, null or typed."""
    for dotted, kind in _SHOWN:
        _optional(rec, path, dotted, kind)
    for dotted, value in (
        ("label", rec.get("label")),
        ("method_config.label", rec["method_config"].get("label")),
        ("method_config.base", rec["method_config"].get("base")),
        ("method_config.role", rec["method_config"].get("role")),
    ):
        if isinstance(value, str) and len(value) > NAME_MAX:
            raise FCTError(
                f"{path}: key '{dotted}' is {len(value)} characters, over {NAME_MAX}; {_hint(rec)}"
            )
    # The cosine cases and top-1 AUCs are shown as numbers: each one present must be one.
    for case in CASES:
        _optional(rec, path, f"cases_cosine.{case}", "dict")
        for metric in CASE_METRICS + FLIP_METRICS:
            _optional(rec, path, f"cases_cosine.{case}.{metric}", "number")
    for key in FLIP_METRICS:  # per order, one flip rate per curve point
        for order, value in ((rec.get("backfill_curves") or {}).get(key) or {}).items():
            if not (isinstance(value, list) and all(_is_kind(v, "number") for v in value)):
                raise FCTError(
                    f"{path}: key 'backfill_curves.{key}' holds {_shown(value)} for order "
                    f"{_shown(order)}, not a list of numbers; {_hint(rec)}"
                )
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
                    f"{path}: key '{key}.{shorten(name)}' must be {what}, got {_shown(value)}; "
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


#: The metrics of a sequence record's compatibility matrix.
SEQUENCE_METRICS = ("top1", "mAP")


def _validate_sequence(rec: dict[str, Any], path: Path) -> None:
    """The optional ``sequence`` of a sequence scenario's record (fct.sequence): a square
    ``matrix`` per metric with numbers on and below the diagonal and null above it, ``AC``
    in [0, 1], ``BC``, ``FC``, ``mean`` numbers, ``models`` a list with one entry per row,
    ``direct`` null or an object of numbers."""
    seq = _optional(rec, path, "sequence", "dict")
    if seq is None:
        return
    n = None
    for metric in SEQUENCE_METRICS:
        rows = _require(rec, path, f"sequence.matrix.{metric}", "list")
        size = len(rows)
        if n is None:
            n = size
        bad = size < 2 or size != n or not all(isinstance(r, list) and len(r) == n for r in rows)
        if not bad:
            bad = any(
                (v is not None) if j > i else not _is_kind(v, "number")
                for i, row in enumerate(rows)
                for j, v in enumerate(row)
            )
        if bad:
            raise FCTError(
                f"{path}: key 'sequence.matrix.{metric}' must be a square list of rows (as many "
                "as the other metric's), numbers on and below the diagonal, null above; "
                f"{_hint(rec)}"
            )
    for key in ("AC", "BC", "FC", "mean"):
        _require(rec, path, f"sequence.{key}", "number|null")
    if seq["AC"] is not None and not 0 <= seq["AC"] <= 1:
        raise FCTError(
            f"{path}: key 'sequence.AC' must be in [0, 1], got {seq['AC']}; {_hint(rec)}"
        )
    models = _require(rec, path, "sequence.models", "list")
    if len(models) != n:
        raise FCTError(
            f"{path}: key 'sequence.models' has {len(models)} entries for a {n}x{n} matrix; "
            f"{_hint(rec)}"
        )
    steps = _optional(rec, path, "sequence.steps", "list") or []
    if len(steps) not in (0, n - 1) or not all(isinstance(s, dict) for s in steps):
        raise FCTError(
            f"{path}: key 'sequence.steps' must hold one object per update ({n - 1} for "
            f"{n} models); {_hint(rec)}"
        )
    for k, step in enumerate(steps):
        for key in ("nfr", "pfr"):
            value = step.get(key)
            if value is not None and not (_is_kind(value, "number") and 0 <= value <= 100):
                raise FCTError(
                    f"{path}: key 'sequence.steps' entry {k}: '{key}' must be a percentage "
                    f"in [0, 100] or null, got {_shown(value)}; {_hint(rec)}"
                )
    direct = _optional(rec, path, "sequence.direct", "dict")
    if direct is not None:
        for metric in SEQUENCE_METRICS:
            _optional(rec, path, f"sequence.direct.{metric}", "number")
