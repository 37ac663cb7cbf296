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
from typing import Any

from fct.report.metric_table import METRICS, Metric, auc_metric
from fct.report.records import CASE_METRICS, CASES, parse_date

log = logging.getLogger(__name__)

#: Display order of the built-in methods; others follow alphabetically.
METHOD_ORDER = (
    "independent",
    "bct",
    "fct",
    "fct_side",
    "fastfill",
    "fastfill_side",
    "ract",
    "l2_bct",
)
DEFAULT_LABELS = {
    "independent": "Independent",
    "bct": "BCT",
    "fct": "FCT",
    "fct_side": "FCT + side-info",
    "fastfill": "FastFill",
    "fastfill_side": "FastFill + side-info",
    "ract": "RACT",
    "l2_bct": "L2-BCT",
}
#: Methods that leave the new model as Independent trains it, so their new/new is its new/new
#: (used for the new/new reference line when Independent was not run).
UNCHANGED_NEW_MODEL = ("independent", "fct", "fct_side", "fastfill", "fastfill_side")

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
        return self.mean("cross_top1") > self.mean("old_old_top1") and self.mean(
            "cross_mAP"
        ) > self.mean("old_old_mAP")


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

    def reference(self, scenario: str, case: str) -> Cell | None:
        """The cell whose ``case`` row is the scenario's reference old/old or new/new.

        old/old is the same old model for every method: Independent's, else the first run.
        new/new is Independent's, else that of a method that does not change the new model.
        """
        candidates = (
            self.methods_in(scenario)
            if case == "old/old"
            else [m for m in UNCHANGED_NEW_MODEL if (scenario, m) in self.cells]
        )
        if "independent" in candidates:
            return self.cells[(scenario, "independent")]
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


def method_sort_key(method: str) -> tuple[int, str]:
    """Built-in methods in their fixed order, then plugins by name."""
    if method in METHOD_ORDER:
        return (METHOD_ORDER.index(method), "")
    return (len(METHOD_ORDER), method)


def _reference_cases(
    by_key: dict[tuple[str, str], list[dict[str, Any]]], scenario: str, seed: int
) -> dict[str, Any] | None:
    """Independent's cases for this scenario: same seed, else the mean over its seeds."""
    runs = by_key.get((scenario, "independent"))
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
    return [*METRICS.values(), *(auc_metric(o) for o in summary_auc_orders)]


def summarize(records: list[dict[str, Any]], suite: str) -> Summary:
    """Group validated records by (scenario, method) and summarise every metric over seeds."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in sorted(records, key=lambda r: (r["scenario"], r["method"], r["seed"])):
        by_key.setdefault((rec["scenario"], rec["method"]), []).append(rec)

    scenarios = sorted({s for s, _ in by_key})
    methods = sorted({m for _, m in by_key}, key=method_sort_key)
    labels = {m: DEFAULT_LABELS.get(m, m) for m in methods}
    for (_, m), runs in sorted(by_key.items()):
        label = runs[0]["method_config"].get("label")
        if isinstance(label, str) and label.strip():
            labels[m] = label.strip()
    configs: dict[str, dict[str, Any]] = {}
    for s in scenarios:
        first = by_key.get((s, "independent")) or next(
            v for (s2, _), v in by_key.items() if s2 == s
        )
        configs[s] = first[0]["scenario_config"]

    auc_orders = sorted({o for r in records for o in (r.get("auc") or {})})
    metrics = metrics_for(auc_orders)
    cells: dict[tuple[str, str], Cell] = {}
    for (s, m), runs in by_key.items():
        per_metric: dict[str, list[float | None]] = {mt.key: [] for mt in metrics}
        for rec in runs:
            ref = _reference_cases(by_key, s, rec["seed"])
            for mt in metrics:
                per_metric[mt.key].append(mt.extract(rec, ref))
        stats = {k: Stat.of(v) for k, v in per_metric.items()}
        cells[(s, m)] = Cell(s, m, labels[m], runs, stats)

    _warn_old_old_mismatch(cells, scenarios)
    return Summary(suite, list(records), scenarios, methods, labels, configs, cells, auc_orders)


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
