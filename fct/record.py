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
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.io import read_json, write_json
from fct.record_schema import (  # noqa: F401  (re-exported: the record's one definition)
    CASE_METRICS,
    CASES,
    NAME_MAX,
    NUMBER_MAX,
    SCHEMA,
    TRAIN_SECONDS,
    parse_date,
    shorten,
    validate_record,
)

log = logging.getLogger(__name__)

#: ``method_config.role`` of the method every other one is measured against (Independent: no
#: compatibility, the reference new model); any other method's role is ``METHOD``.
BASELINE = "baseline"
METHOD = "method"


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
    recovery: dict[str, Any] | None = None  # fct.recovery: recall recovery, fit, latency
    provenance: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    #: Keys not written when None: a scenario without backfilling curves has none of them.
    OMITTED_WHEN_NONE = ("curves", "auc", "backfill_curves", "recovery")

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
