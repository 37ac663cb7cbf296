"""From run records to per-(scenario, method) statistics: the one model every report reads.

Seeds are aggregated here, once: each metric of the metric table is read from every seed's
record and summarised as mean and sample standard deviation.
"""

from __future__ import annotations

import hashlib
import logging
import re
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fct.record import (
    BASELINE,
    CASE_METRICS,
    CASES,
    MethodTraits,
    label_of_older_record,
    method_base,
    method_traits,
    parse_date,
)
from fct.report.metric_table import METRICS, Metric, auc_metric, auc_top1_metric
from fct.report.records import is_smoke, record_label

if TYPE_CHECKING:
    from fct.report.reproduction import Reproduction

log = logging.getLogger(__name__)

#: How every report of ``fct run --smoke`` records is titled and marked.
SMOKE_TITLE = "SMOKE RUN (wiring test, not results)"
#: What a verdict whose margin is within one standard deviation says (CSV and notes).
WITHIN_STD = "within 1 std"

#: old/old should be identical across methods of a scenario (same old model); a larger gap
#: means runs from different old models were merged.
OLD_OLD_TOLERANCE = 0.05


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds; ``std`` is None with fewer than 2."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        """Summarise the values that are present (None = not available for that seed)."""
        xs = [v for v in values if v is not None]
        if not xs:
            return cls(None, None, 0)
        std = statistics.stdev(xs) if len(xs) > 1 else None
        return cls(statistics.fmean(xs), std, len(xs))


@dataclass
class Cell:
    """All seeds of one (scenario, method), with every metric summarised."""

    scenario: str
    method: str
    label: str
    records: list[dict[str, Any]]
    stats: dict[str, Stat] = field(default_factory=dict)
    base: str = ""
    #: What the records say about the method (fct.record.method_traits).
    traits: MethodTraits = field(default_factory=MethodTraits)

    @property
    def seeds(self) -> list[int]:
        """The seeds that ran, ascending."""
        return [r["seed"] for r in self.records]

    def mean(self, key: str) -> float | None:
        """The seed-mean of metric ``key`` (None when not available)."""
        stat = self.stats.get(key)
        return stat.mean if stat else None

    @property
    def compatible(self) -> bool:
        """BCT's criterion on seed means: cross beats old/old on both top-1 and mAP."""
        return all(margin > 0 for margin, _ in self.margins())

    def margins(self) -> list[tuple[float, float | None]]:
        """(cross − old/old seed mean, sample std of the cross case over seeds) for top-1 and
        mAP, the two measures of the criterion; the std is None with fewer than 2 seeds."""
        return [
            (self.mean(f"cross_{k}") - self.mean(f"old_old_{k}"), self.stats[f"cross_{k}"].std)
            for k in ("top1", "mAP")
        ]

    @property
    def within_std(self) -> bool:
        """True when the verdict rests on a margin no larger than the seeds' spread.

        With several seeds, a margin counts as within noise when its size is at most the
        cross case's sample standard deviation over seeds. "Compatible" is then uncertain
        when either margin is; "not compatible" when every failing margin is.
        """
        margins = self.margins()
        if not self.compatible:
            margins = [(m, s) for m, s in margins if m <= 0]
        near = [s is not None and abs(m) <= s for m, s in margins]
        return any(near) if self.compatible else all(near)

    def verdict(self, yes: str, no: str) -> str:
        """``yes`` or ``no`` by the criterion, with `` (within 1 std)`` when uncertain."""
        text = yes if self.compatible else no
        return f"{text} ({WITHIN_STD})" if self.within_std else text


@dataclass
class Summary:
    """Everything the reports show, computed once from the merged records."""

    suite: str
    records: list[dict[str, Any]]
    scenarios: list[str]
    methods: list[str]
    labels: dict[str, str]
    configs: dict[str, dict[str, Any]]
    cells: dict[tuple[str, str], Cell]
    auc_orders: list[str]
    bases: dict[str, str] = field(default_factory=dict)
    #: Per method, what its records say about it (order in reports, role, new model).
    traits: dict[str, MethodTraits] = field(default_factory=dict)
    #: The reproduction check against reference records, when the report was given some.
    reproduction: Reproduction | None = None

    @property
    def smoke(self) -> bool:
        """True for a report of ``fct run --smoke`` records (never mixed with full runs)."""
        return any(is_smoke(r) for r in self.records)

    def title(self, text: str) -> str:
        """``text``, followed by the smoke-run mark for a smoke report."""
        return f"{text} — {SMOKE_TITLE}" if self.smoke else text

    @property
    def multi_seed(self) -> bool:
        """True when any (scenario, method) ran with more than one seed."""
        return any(len(c.records) > 1 for c in self.cells.values())

    def cell(self, scenario: str, method: str) -> Cell | None:
        """The cell of (scenario, method), or None when that pair was not run."""
        return self.cells.get((scenario, method))

    def methods_in(self, scenario: str) -> list[str]:
        """The methods run on ``scenario``, in display order."""
        return [m for m in self.methods if (scenario, m) in self.cells]

    def base(self, method: str) -> str:
        """The registered method ``method`` ran (itself unless it is a suite variant)."""
        return self.bases.get(method, method)

    def traits_of(self, method: str) -> MethodTraits:
        """What the records of ``method`` say about it (the first record decides)."""
        return self.traits.get(method, MethodTraits())

    def sort_key(self, method: str) -> tuple[bool, int, str, bool, str]:
        """Where ``method`` comes in the reports (``method_sort_key``)."""
        return method_sort_key(method, self.base(method), self.traits_of(method).report_order)

    def baseline(self, scenario: str) -> str | None:
        """The baseline run on ``scenario`` (Independent, or a variant of it): the first in
        display order whose records have the role ``baseline``."""
        return next(
            (m for m in self.methods_in(scenario) if self.traits_of(m).role == BASELINE), None
        )

    def shares_new_model(self, scenario: str, method: str) -> bool | None:
        """Whether ``method`` queries with the baseline's (Independent's) new model.

        The baseline does. Else decided by the records' artifact digests where both carry
        them: the method used the baseline's new model when its record lists every
        ``models/`` digest of the baseline's record of the same seed. Else by what the records
        say (``method_config.keeps_new_model``: FCT and FastFill keep it; BCT, RACT and L2-BCT
        train their own). None when neither tells (a plugin that does not say): the caller
        compares the numbers.
        """
        traits = self.traits_of(method)
        if traits.role == BASELINE:
            return True
        ind = self.baseline(scenario)
        if ind is not None and ind != method:
            same = _same_new_model(self.cells[(scenario, ind)], self.cells[(scenario, method)])
            if same is not None:
                return same
        return traits.keeps_new_model

    def reference(self, scenario: str, case: str) -> Cell | None:
        """The cell whose ``case`` row is the scenario's reference old/old or new/new.

        old/old is the same old model for every method: Independent's, else the first run.
        new/new is the baseline's, else that of a method that uses the baseline's new model.
        """
        candidates = (
            self.methods_in(scenario)
            if case == "old/old"
            else [m for m in self.methods_in(scenario) if self.shares_new_model(scenario, m)]
        )
        ind = self.baseline(scenario)
        if ind in candidates:
            return self.cells[(scenario, ind)]
        return self.cells[(scenario, candidates[0])] if candidates else None

    def header(self) -> str:
        """One line: suite, number of runs, date range, devices."""
        dates = sorted(parse_date(r["provenance"]["date"]) for r in self.records)
        first, last = dates[0].strftime("%Y-%m-%d"), dates[-1].strftime("%Y-%m-%d")
        span = first if first == last else f"{first} to {last}"
        devices = sorted({r["provenance"]["device"] for r in self.records})
        seeds = sorted({r["seed"] for r in self.records})
        n = len(self.records)
        return (
            f"suite {self.suite}: {n} run{'s' * (n != 1)} "
            f"({len(self.scenarios)} scenario{'s' * (len(self.scenarios) != 1)}, "
            f"{len(self.methods)} method{'s' * (len(self.methods) != 1)}, "
            f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}); "
            f"{span}; device{'s' * (len(devices) != 1)}: {'; '.join(devices)}"
        )


def method_sort_key(
    method: str, base: str | None = None, order: int | None = None
) -> tuple[bool, int, str, bool, str]:
    """Methods by their records' ``report_order`` (the built-ins declare one), each registered
    method followed by its suite variants (by name); then those without an order (plugins) by
    registered name, again with their variants after."""
    base = base or method
    return (order is None, 0 if order is None else order, base, method != base, method)


def _same_new_model(ind: Cell, cell: Cell) -> bool | None:
    """Whether ``cell``'s records queried with Independent's new model (seed by seed): the
    same ``models.query`` artifact and digest where both records name it, else whether they
    list Independent's new-model digests; None when no seed of both carries artifacts."""
    by_seed = {r["seed"]: r for r in ind.records}
    verdicts = []
    for rec in cell.records:
        other = by_seed.get(rec["seed"])
        mine = rec.get("artifacts") or {}
        theirs = (other or {}).get("artifacts") or {}
        query = (rec.get("models") or {}).get("query")
        if query is not None and query == ((other or {}).get("models") or {}).get("query"):
            verdicts.append(mine.get(query) == theirs.get(query))
            continue
        if query is not None and ((other or {}).get("models") or {}).get("query") is not None:
            verdicts.append(False)  # another artifact answered the queries
            continue
        # Independent lists its old and its new model: a run that queried with Independent's
        # new model lists both digests too; one with its own new model lacks the second.
        models = {d for k, d in theirs.items() if k.startswith("models/")} or set(theirs.values())
        if models and mine:
            verdicts.append(models <= set(mine.values()))
    return all(verdicts) if verdicts else None


def _reference_cases(
    by_key: dict[tuple[str, str], list[dict[str, Any]]],
    scenario: str,
    seed: int,
    baseline: str | None,
) -> dict[str, Any] | None:
    """The baseline's cases for this scenario: same seed, else the mean over its seeds."""
    runs = by_key.get((scenario, baseline)) if baseline else None
    if not runs:
        return None
    for rec in runs:
        if rec["seed"] == seed:
            return rec["cases"]
    return {
        case: {k: statistics.fmean(r["cases"][case][k] for r in runs) for k in CASE_METRICS}
        for case in CASES
    }


def metrics_for(summary_auc_orders: list[str]) -> list[Metric]:
    """The metric-table entries summarised for every cell (AUC ones only when present)."""
    return [
        *METRICS.values(),
        *(auc_metric(o) for o in summary_auc_orders),
        *(auc_top1_metric(o) for o in summary_auc_orders),
    ]


def summarize(records: list[dict[str, Any]], suite: str) -> Summary:
    """Group validated records by (scenario, method) and summarise every metric over seeds."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in sorted(records, key=lambda r: (r["scenario"], r["method"], r["seed"])):
        by_key.setdefault((rec["scenario"], rec["method"]), []).append(rec)

    scenarios = sorted({s for s, _ in by_key})
    bases: dict[str, str] = {}
    traits: dict[str, MethodTraits] = {}
    labels: dict[str, str] = {}
    for (_, m), runs in sorted(by_key.items()):
        # The first record (by scenario, then seed) that names a base or a label decides.
        bases.setdefault(m, method_base(runs[0]))
        traits.setdefault(m, method_traits(runs[0]))
        label = record_label(runs[0])
        if label is not None:
            labels.setdefault(m, label)
    methods = sorted(bases, key=lambda m: method_sort_key(m, bases[m], traits[m].report_order))
    for m in methods:
        labels.setdefault(m, label_of_older_record(m))
    # Per scenario, the run every new/new cost is measured against: the baseline, Independent
    # (or a variant of it when only that ran).
    baseline = {
        s: next((m for m in methods if traits[m].role == BASELINE and (s, m) in by_key), None)
        for s in scenarios
    }
    configs: dict[str, dict[str, Any]] = {}
    for s in scenarios:
        first = by_key.get((s, baseline[s])) or next(v for (s2, _), v in by_key.items() if s2 == s)
        configs[s] = first[0]["scenario_config"]

    auc_orders = sorted({o for r in records for o in (r.get("auc") or {})})
    metrics = metrics_for(auc_orders)
    cells: dict[tuple[str, str], Cell] = {}
    for (s, m), runs in by_key.items():
        per_metric: dict[str, list[float | None]] = {mt.key: [] for mt in metrics}
        for rec in runs:
            ref = _reference_cases(by_key, s, rec["seed"], baseline[s])
            for mt in metrics:
                per_metric[mt.key].append(mt.extract(rec, ref))
        stats = {k: Stat.of(v) for k, v in per_metric.items()}
        cells[(s, m)] = Cell(s, m, labels[m], runs, stats, bases[m], traits[m])

    _warn_old_old_mismatch(cells, scenarios)
    return Summary(
        suite, list(records), scenarios, methods, labels, configs, cells, auc_orders, bases, traits
    )


def _warn_old_old_mismatch(cells: dict[tuple[str, str], Cell], scenarios: list[str]) -> None:
    # Compared per seed: different seeds may train different old models.
    for s in scenarios:
        by_seed: dict[int, dict[str, float]] = {}
        for (s2, m), cell in cells.items():
            if s2 == s:
                for rec in cell.records:
                    by_seed.setdefault(rec["seed"], {})[m] = float(rec["cases"]["old/old"]["mAP"])
        for seed, values in sorted(by_seed.items()):
            if max(values.values()) - min(values.values()) > OLD_OLD_TOLERANCE:
                log.warning(
                    "scenario %s seed %d: old/old mAP differs between methods (%s); were runs "
                    "of different old models merged?",
                    s,
                    seed,
                    ", ".join(f"{m} {v:.2f}" for m, v in sorted(values.items())),
                )


#: Longest slug kept as is; a longer name is cut and told apart by its hash.
SLUG_MAX = 80


def slug(name: str) -> str:
    """A file-name-safe form of a scenario name (letters, digits, '.', '_', '-').

    A safe name of at most SLUG_MAX characters is its own slug. Any other name is cleaned and
    gets ``-`` and 8 hex digits of its sha256, so two names that clean to the same text ('a b'
    and 'a_b') never write to the same files, and no name makes a file name too long.
    """
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scenario"
    if clean == name and len(name) <= SLUG_MAX:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[:SLUG_MAX]}-{digest}"
