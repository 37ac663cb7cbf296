"""The run record: one JSON per (scenario, method, seed), written by the runner, read by the report.

Its home: the schema version, where a record lives (``record_path``), the typed
:class:`RunRecord` (reading, validating, writing), and what a record says about its method
(:class:`MethodTraits`). A ground-floor module: it imports fct.errors and fct.io only, so the
runner and the report share one definition. A record's keys are described in
docs/architecture.md ("Run records").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.io import read_json, write_json

log = logging.getLogger(__name__)

SCHEMA = 1
CASES = ("old/old", "new/new", "cross")
CASE_METRICS = ("top1", "top5", "mAP", "mAP@R")

#: Training time of a run (``costs``): the total (every artifact it used), and since the split
#: was recorded, the artifacts trained for this method alone and those shared by every method.
TRAIN_SECONDS = ("train_seconds", "train_seconds_method", "train_seconds_shared")

#: ``method_config.role`` of the method every other one is measured against (Independent: no
#: compatibility, the reference new model); any other method's role is ``METHOD``.
BASELINE = "baseline"
METHOD = "method"

#: Largest magnitude of a number in a record. Ours are percentages, seconds and throughputs,
#: far below it; anything larger is not a measurement, and sums of it overflow a float.
NUMBER_MAX = 1e15
#: Longest suite, scenario, method name or label: they become file names and plot labels.
NAME_MAX = 200


# ---------------------------------------------------------------------------------------------
# Where a record lives


def record_path(out: Path, scenario: str, method: str, seed: int) -> Path:
    """Where the run record of (scenario, method, seed) lives: ``OUT/runs/SCENARIO/FILE``.

    Suite files can only hold safe names (fct.scenarios.check_name); this is the last line of
    defence for a name that did not come through them (a plugin's method, a Scenario built in
    code) and for a scenario folder that is a symlink out of the results: either would write a
    record outside ``OUT/runs``, which is refused with an FCTError.
    """
    runs = Path(out) / "runs"
    problem = _not_a_file_name(scenario) or _not_a_file_name(method)
    if problem is None:
        stem = method if seed == 0 else f"{method}.seed{seed}"
        path = runs / scenario / f"{stem}.json"
        try:
            # Resolved (symlinks followed), the scenario folder must still be a folder of runs/;
            # OUT and OUT/runs may themselves be links (results kept on another disk). The
            # record file itself is not resolved: a link there is damage that is_current moves
            # aside, and writing a record replaces a link rather than following it.
            if (runs / scenario).resolve().parent != runs.resolve():
                problem = f"{runs / scenario} leads out of {runs}"
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            problem = f"{runs / scenario} cannot be resolved ({getattr(e, 'strerror', None) or e})"
    if problem is not None:
        raise FCTError(
            f"the run record of scenario {scenario!r:.80}, method {method!r:.80} would be outside "
            f"a scenario folder of {runs}: {problem}; use names of letters, digits, '-', '_' "
            "and '.', and no symlink out of OUT/runs"
        )
    return path


def _not_a_file_name(name: object) -> str | None:
    """Why ``name`` cannot be one file or folder name inside a folder, or None when it can."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "\x00" in name
        or "/" in name
        or (os.altsep is not None and os.altsep in name)
    ):
        return f"{name!r:.80} is not a plain file name"
    if len(f"{name}.seed{2**63}.json".encode()) > 255:  # most file systems' limit
        return f"a name of {len(name)} characters is too long for a file name"
    return None


def is_current(path: Path, digest: str, source: str | None, who: str) -> bool:
    """Whether the record at ``path`` was made from this config (``config_hash`` = ``digest``)
    and this method source; ``who`` ("SCENARIO / METHOD") names it in the log. What cannot be
    a record (unreadable, not a JSON object) is moved aside as ``NAME.corrupt``."""
    try:
        rec = read_json(path)
    except FCTError as e:
        log.warning("%s is unreadable (%s); rerunning it", path, e)
        move_aside(path)
        return False
    if isinstance(rec, dict) and rec.get("config_hash") == digest:
        if source is not None and rec.get("method_source") != source:
            log.info(
                "%s: the method's source file changed since %s was written; rerunning "
                "the method and its evaluation (cached shared models are reused)",
                who,
                path,
            )
            return False
        log.info("%s: up to date (%s), skipped", who, path)
        return True
    if not isinstance(rec, dict):
        log.warning("%s is not a run record (a JSON %s); rerunning it", path, type(rec).__name__)
        move_aside(path)
        return False
    log.info("%s: config changed since %s was written; rerunning", who, path)
    return False


def move_aside(path: Path) -> None:
    """Move a damaged record (a file, a folder, a link) out of the way as ``NAME.corrupt``,
    so the rerun can write the record and the damaged one is kept for a look."""
    target = path.with_name(path.name + ".corrupt")
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(path, target)
    except OSError as e:
        raise FCTError(
            f"{path} is damaged and cannot be moved aside ({e.strerror or e}); delete it and rerun"
        ) from e


# ---------------------------------------------------------------------------------------------
# The typed record


@dataclass(kw_only=True)
class RunRecord:
    """One run record. ``to_json()`` is the file's content (``write`` sorts its keys);
    ``from_json``/``read`` validate first (``validate_record``: an FCTError names the file and
    the key). Keys of a file this fct does not know are kept in ``extra``; the optional keys a
    file lacks are None (the backfilling trio, absent when the scenario has no curves, is not
    written then)."""

    schema: int = SCHEMA
    suite: str
    scenario: str
    method: str  # the run name
    label: str | None = None
    seed: int
    smoke: bool = False
    config_hash: str | None = None
    method_source: str | None = None  # 20 hex of the method's module file
    scenario_config: dict[str, Any]
    method_config: dict[str, Any]  # name, base, label, settings, report_order, role, ...
    cases: dict[str, dict[str, Any]]
    costs: dict[str, Any]
    curves: dict[str, list[float]] | None = None
    auc: dict[str, float] | None = None
    backfill_curves: dict[str, Any] | None = None
    cases_cosine: dict[str, dict[str, Any]] | None = None
    diagnostics: dict[str, Any] | None = None
    artifacts: dict[str, str] | None = None
    artifact_weights: dict[str, str | None] | None = None
    models: dict[str, str] | None = None
    notes: dict[str, Any] | None = None
    provenance: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    #: Keys not written when None: a scenario without backfilling curves has none of them.
    OMITTED_WHEN_NONE = ("curves", "auc", "backfill_curves")

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON data (what ``write`` writes)."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name in self.OMITTED_WHEN_NONE):
                continue
            data[f.name] = value
        return {**data, **self.extra}

    def as_dict(self) -> dict[str, Any]:
        """``to_json()``: the report works on plain dicts."""
        return self.to_json()

    @classmethod
    def from_json(cls, data: Any, path: Path | str = "record") -> RunRecord:
        """A validated record from JSON data (FCTError naming ``path`` and the key)."""
        validate_record(data, path)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, path: Path | str) -> RunRecord:
        """Read and validate the record at ``path`` (FCTError for anything else)."""
        return cls.from_json(read_json(path), path)

    def write(self, path: Path | str) -> Path:
        """Write the record to ``path`` atomically (fct.io.write_json)."""
        return write_json(path, self.to_json())

    @property
    def traits(self) -> MethodTraits:
        """What the record says about its method (``method_traits``)."""
        return method_traits(self.to_json())


# ---------------------------------------------------------------------------------------------
# What a record says about its method


@dataclass(frozen=True)
class MethodTraits:
    """A method's class attributes as its records carry them in ``method_config``
    (fct.methods.Method): where it comes in reports (``report_order``, None: after those that
    have one, by name), its ``role`` (``BASELINE`` for Independent) and whether its queries
    use Independent's new model (``keeps_new_model``; None: not declared)."""

    report_order: int | None = None
    role: str = METHOD
    keeps_new_model: bool | None = None


TRAIT_KEYS = ("report_order", "role", "keeps_new_model")


def method_base(rec: dict[str, Any]) -> str:
    """The registered method a record ran: ``method_config.base``, else its run name.

    A suite variant (``bct_scaled``) names its base (``bct``); records written before variants
    existed have no ``base``, and their run name was the registered name.
    """
    base = rec["method_config"].get("base")
    return base.strip() if isinstance(base, str) and base.strip() else rec["method"]


def method_traits(rec: dict[str, Any]) -> MethodTraits:
    """The traits a (validated) record names in ``method_config``; for a record written before
    records carried them, the rule the report used by name (``traits_of_older_record``)."""
    config = rec["method_config"]
    if not any(key in config for key in TRAIT_KEYS):
        return traits_of_older_record(method_base(rec))
    return MethodTraits(
        config.get("report_order"), config.get("role") or METHOD, config.get("keeps_new_model")
    )


def traits_of_older_record(base: str) -> MethodTraits:
    """For records written before methods declared their traits ONLY (no ``report_order``,
    ``role`` or ``keeps_new_model`` in ``method_config``: the committed results/reference/
    records are such): the report's former rule by registered name. The numbers and flags are
    those the built-ins declare now (fct/methods/*.py); a plugin's record gets the defaults."""
    order = ("independent", "bct", "fct", "fct_side", "fastfill", "fastfill_side", "ract", "l2_bct")
    keeps = {"independent", "fct", "fct_side", "fastfill", "fastfill_side"}
    own = {"bct", "ract", "l2_bct"}
    return MethodTraits(
        report_order=10 * (order.index(base) + 1) if base in order else None,
        role=BASELINE if base == "independent" else METHOD,
        keeps_new_model=True if base in keeps else False if base in own else None,
    )


def label_of_older_record(method: str) -> str:
    """For records written before labels were recorded ONLY (neither ``label`` nor
    ``method_config.label``): the label the report gave a built-in by its run name, else the
    run name itself."""
    labels = {
        "independent": "Independent",
        "bct": "BCT",
        "fct": "FCT",
        "fct_side": "FCT + side-info",
        "fastfill": "FastFill",
        "fastfill_side": "FastFill + side-info",
        "ract": "RACT",
        "l2_bct": "L2-BCT",
    }
    return labels.get(method, method)


# ---------------------------------------------------------------------------------------------
# Validation: every key the report reads, with one-line errors naming the file and the key


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
