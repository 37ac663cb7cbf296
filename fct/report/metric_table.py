"""The metric table: what each reported number means, and how to show it.

One entry per number the reports show (the idea of ann-benchmarks' ``plotting/metrics.py``):
the leaderboard's column names, the paper tables' headers and the plots' axis labels and
limits all come from here, so a metric is described once.

A metric is read from one run record by ``extract(record, reference)``. ``reference`` is the
``cases`` dict of the scenario's baseline run (Independent: ``method_config.role`` is
"baseline"), of the same seed when there is one: it is what a new/new change is measured
against, and ``None`` when no baseline was run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fct.record import BASELINE, method_traits

Record = dict[str, Any]
Extract = Callable[[Record, "dict[str, Any] | None"], "float | None"]

DASH = "–"  # shown in markdown / HTML / LaTeX for a number that is not available


@dataclass(frozen=True)
class Metric:
    """One reported number: its names, unit, direction, axis limits and how to read it.

    ``key`` is used in CSV column names (``SCENARIO/KEY``); ``label`` heads table columns;
    ``description`` labels plot axes and the docs. ``lim`` is the valid range, used as axis
    limits (``None`` on a side means "let the data decide"). ``signed`` shows a leading ``+``
    (for differences); ``log`` asks plots for a log axis; ``sci`` allows scientific notation
    for values too large or small for ``decimals`` (throughputs, per-item costs). ``ideal``,
    when set, is the best value and overrides ``higher_is_better`` as the direction (a ratio
    whose best is 1 is neither "higher" nor "lower" is better).
    """

    key: str
    label: str
    description: str
    unit: str
    higher_is_better: bool
    extract: Extract
    lim: tuple[float | None, float | None] = (None, None)
    decimals: int = 1
    signed: bool = False
    log: bool = False
    sci: bool = False
    ideal: float | None = None

    @property
    def direction(self) -> str:
        """``higher is better``, ``lower is better`` or ``closer to 1 is better``."""
        if self.ideal is not None:
            return f"closer to {self.ideal:g} is better"
        return f"{'higher' if self.higher_is_better else 'lower'} is better"

    @property
    def axis_label(self) -> str:
        """Axis label with unit and direction, e.g. ``cross mAP (%, higher is better)``."""
        unit = f"{self.unit}, " if self.unit else ""
        return f"{self.description} ({unit}{self.direction})"

    def format(self, mean: float | None, std: float | None = None) -> str:
        """Human-readable value: ``50.6``, ``+1.2`` or ``50.6 ± 0.3`` (std shown when given)."""
        if mean is None:
            return DASH
        text = _fmt(mean, self.decimals, self.signed, self.sci)
        if std is not None:
            text += f" ± {_fmt(std, self.decimals, False, self.sci)}"
        return text


def _fmt(x: float, decimals: int, signed: bool, sci: bool) -> str:
    if sci and (abs(x) >= 1e4 or (x != 0 and abs(x) < 10 ** (-decimals))):
        text = f"{x:.2e}"  # throughputs and tiny per-item costs do not fit fixed decimals
    else:
        text = f"{x:.{decimals}f}"
        if float(text) == 0:
            text = f"{0:.{decimals}f}"  # no "-0.0"
    if signed and not text.startswith("-") and float(text) != 0:
        text = "+" + text
    return text


def csv_value(x: float | None) -> str:
    """A number for the CSV: rounded to 4 decimals (or 4 significant digits), blank when absent."""
    if x is None:
        return ""
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.4g}"
    return repr(round(x, 4))


# ---------------------------------------------------------------------------------------------
# Extractors. Each takes (record, reference cases) and returns a float or None.


def _case(case: str, key: str) -> Extract:
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        return float(rec["cases"][case][key])

    return extract


def _cosine_case(case: str, key: str) -> Extract:
    # Records written before the cosine cases existed have no ``cases_cosine``: blank.
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = ((rec.get("cases_cosine") or {}).get(case) or {}).get(key)
        return None if value is None else float(value)

    return extract


def _flip(case: str, key: str) -> Extract:
    # Records written before flip rates existed have no ``nfr``/``pfr``: blank.
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = (rec["cases"].get(case) or {}).get(key)
        return None if value is None else float(value)

    return extract


def _diagnostic(key: str) -> Extract:
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = (rec.get("diagnostics") or {}).get(key)
        return None if value is None else float(value)

    return extract


def _cost(key: str) -> Extract:
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = rec["costs"].get(key)
        return None if value is None else float(value)

    return extract


def _recovery(key: str, batch: str | None = None) -> Extract:
    """A number of the record's optional ``recovery`` (fct.recovery); ``batch``: a latency."""

    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        node = rec.get("recovery") or {}
        value = (node.get(key) or {}).get(batch) if batch else node.get(key)
        return None if value is None else float(value)

    return extract


def _gain(key: str) -> Extract:
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        return float(rec["cases"]["cross"][key]) - float(rec["cases"]["old/old"][key])

    return extract


def _new_new_change(key: str) -> Extract:
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        if method_traits(rec).role == BASELINE:
            return 0.0  # by definition: the baseline's (Independent's) is the reference new model
        if ref is None:
            return None
        return float(rec["cases"]["new/new"][key]) - float(ref["new/new"][key])

    return extract


def _sequence(key: str) -> Extract:
    # A sequence scenario's record (fct.sequence) has ``sequence``; any other record: blank.
    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = (rec.get("sequence") or {}).get(key)
        return None if value is None else float(value)

    return extract


def update_cost_per_item(rec: Record) -> float | None:
    """Seconds to update one gallery item: backfilled share by re-encoding, the rest by h.

    ``f / backfill_images_per_s + (1 - f) / transform_embeddings_per_s`` with ``f`` the
    backfill fraction; a term whose throughput is unknown counts as zero when its share is
    zero. 0.0 means nothing is updated (Independent, BCT); None means a needed throughput is
    missing.
    """
    costs = rec["costs"]
    f = float(costs["backfill_fraction"])
    transform = costs.get("transform_embeddings_per_s")
    backfill = costs.get("backfill_images_per_s")
    total = 0.0
    if f > 0:
        if not backfill:
            return None
        total += f / float(backfill)
    if f < 1 and transform:
        total += (1 - f) / float(transform)
    return total


def _update_cost(rec: Record, ref: dict[str, Any] | None) -> float | None:
    return update_cost_per_item(rec)


PERCENT = (0.0, 100.0)
GAIN = (-100.0, 100.0)


def _accuracy(case: str, key: str, what: str, label: str) -> Metric:
    return Metric(
        key=f"{_CASE_KEY[case]}_{key}",
        label=label,
        description=f"{case} {what}",
        unit="%",
        higher_is_better=True,
        extract=_case(case, key),
        lim=PERCENT,
    )


_CASE_KEY = {"old/old": "old_old", "new/new": "new_new", "cross": "cross"}
_WHAT = {"top1": "CMC top-1", "top5": "CMC top-5", "mAP": "mAP", "mAP@R": "mAP@R"}
_LABEL = {"top1": "top-1", "top5": "top-5", "mAP": "mAP", "mAP@R": "mAP@R"}

#: Every metric the reports know, by key.
METRICS: dict[str, Metric] = {}
for _c in ("cross", "old/old", "new/new"):
    for _k in ("top1", "top5", "mAP", "mAP@R"):
        _m = _accuracy(_c, _k, _WHAT[_k], _LABEL[_k])
        METRICS[_m.key] = _m

METRICS.update(
    {
        m.key: m
        for m in (
            Metric(
                key="gain_mAP",
                label="gain",
                description="gain over old/old: cross mAP − old/old mAP",
                unit="pp",
                higher_is_better=True,
                extract=_gain("mAP"),
                lim=GAIN,
                signed=True,
            ),
            Metric(
                key="gain_top1",
                label="gain top-1",
                description="gain over old/old: cross top-1 − old/old top-1",
                unit="pp",
                higher_is_better=True,
                extract=_gain("top1"),
                lim=GAIN,
                signed=True,
            ),
            Metric(
                key="new_new_change_mAP",
                label="new/new change",
                description="new/new change: method new/new mAP − Independent new/new mAP",
                unit="pp",
                higher_is_better=True,  # positive: the method's new model beats Independent's
                extract=_new_new_change("mAP"),
                lim=GAIN,
                signed=True,
            ),
            Metric(
                key="cross_nfr",
                label="NFR",
                description="cross negative flip rate: right under old/old, wrong in the cross case",
                unit="%",
                higher_is_better=False,
                extract=_flip("cross", "nfr"),
                lim=PERCENT,
            ),
            Metric(
                key="cross_pfr",
                label="PFR",
                description="cross positive flip rate: wrong under old/old, right in the cross case",
                unit="%",
                higher_is_better=True,
                extract=_flip("cross", "pfr"),
                lim=PERCENT,
            ),
            Metric(
                key="cross_cos_top1",
                label="cos top-1",
                description="cross CMC top-1 under cosine distance",
                unit="%",
                higher_is_better=True,
                extract=_cosine_case("cross", "top1"),
                lim=PERCENT,
            ),
            Metric(
                key="cross_cos_mAP",
                label="cos mAP",
                description="cross mAP under cosine distance",
                unit="%",
                higher_is_better=True,
                extract=_cosine_case("cross", "mAP"),
                lim=PERCENT,
            ),
            Metric(
                key="cross_norm_ratio",
                label="norm ratio",
                description="cross case: mean query norm / mean gallery norm",
                unit="",
                higher_is_better=False,  # superseded by ideal: 1 means the same scale
                extract=_diagnostic("cross_norm_ratio"),
                lim=(0.0, None),
                decimals=2,
                sci=True,
                ideal=1.0,
            ),
            Metric(
                key="seq_AC",
                label="AC",
                description="sequence: average compatibility (share of pairs i > j with "
                "M[i][j] > M[j][j], mAP)",
                unit="",
                higher_is_better=True,
                extract=_sequence("AC"),
                lim=(0.0, 1.0),
                decimals=2,
            ),
            Metric(
                key="seq_mean_mAP",
                label="seq. mean mAP",
                description="sequence: mean mAP of the compatibility matrix's lower triangle",
                unit="%",
                higher_is_better=True,
                extract=_sequence("mean"),
                lim=PERCENT,
            ),
            Metric(
                key="recovery_top1",
                label="recovery top-1",
                description="recall recovery: cross top-1 / new/new top-1",
                unit="",
                higher_is_better=True,
                extract=_recovery("top1"),
                lim=(0.0, None),
                decimals=3,
            ),
            Metric(
                key="recovery_mAP",
                label="recovery mAP",
                description="recall recovery: cross mAP / new/new mAP",
                unit="",
                higher_is_better=True,
                extract=_recovery("mAP"),
                lim=(0.0, None),
                decimals=3,
            ),
            Metric(
                key="fit_seconds",
                label="fit s",
                description="the method's own fit (adapter, h): seconds",
                unit="s",
                higher_is_better=False,
                extract=_recovery("fit_seconds"),
                lim=(0.0, None),
                decimals=2,
                sci=True,
            ),
            Metric(
                key="query_latency_us_1",
                label="µs/query b1",
                description="added latency per query of a query-side map, batch 1",
                unit="µs",
                higher_is_better=False,
                extract=_recovery("query_latency_us", "1"),
                lim=(0.0, None),
                decimals=2,
                sci=True,
            ),
            Metric(
                key="query_latency_us_1024",
                label="µs/query b1024",
                description="added latency per query of a query-side map, batch 1024",
                unit="µs",
                higher_is_better=False,
                extract=_recovery("query_latency_us", "1024"),
                lim=(0.0, None),
                decimals=3,
                sci=True,
            ),
            Metric(
                key="backfill_fraction",
                label="backfilled",
                description="fraction of the gallery re-encoded by the new model",
                unit="",
                higher_is_better=False,
                extract=_cost("backfill_fraction"),
                lim=(0.0, 1.0),
                decimals=2,
            ),
            Metric(
                key="update_cost_s",
                label="s / item",
                description="per-item update cost",
                unit="s",
                higher_is_better=False,
                extract=_update_cost,
                lim=(None, None),
                decimals=2,
                log=True,
                sci=True,
            ),
            Metric(
                key="transform_embeddings_per_s",
                label="h emb/s",
                description="transformation throughput",
                unit="embeddings/s",
                higher_is_better=True,
                extract=_cost("transform_embeddings_per_s"),
                decimals=0,
                log=True,
                sci=True,
            ),
            Metric(
                key="backfill_images_per_s",
                label="backfill img/s",
                description="backfill (re-encoding) throughput",
                unit="images/s",
                higher_is_better=True,
                extract=_cost("backfill_images_per_s"),
                decimals=0,
                log=True,
                sci=True,
            ),
            Metric(
                key="speedup_vs_backfill",
                label="speed-up",
                description="update speed-up over a full backfill",
                unit="×",
                higher_is_better=True,
                extract=_cost("speedup_vs_backfill"),
                decimals=0,
                log=True,
                sci=True,
            ),
            Metric(
                key="train_seconds_method",
                label="train s (method)",
                description="training time of what this method trained for itself (h, BCT's "
                "new model, ...)",
                unit="s",
                higher_is_better=False,
                extract=_cost("train_seconds_method"),
                decimals=1,
            ),
            Metric(
                key="train_seconds_shared",
                label="train s (shared)",
                description="training time of the models it shares with every method of the "
                "scenario (old model, Independent's new model, side-information model)",
                unit="s",
                higher_is_better=False,
                extract=_cost("train_seconds_shared"),
                decimals=1,
            ),
            Metric(
                key="train_seconds",
                label="train s (total)",
                description="training time of every model the run used (method + shared)",
                unit="s",
                higher_is_better=False,
                extract=_cost("train_seconds"),
                decimals=1,
            ),
        )
    }
)


def auc_metric(order: str) -> Metric:
    """The metric for a backfilling curve's area under the curve, for one backfill order."""

    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = (rec.get("auc") or {}).get(order)
        return None if value is None else float(value)

    return Metric(
        key=f"auc_{order}",
        label=f"AUC {order}",
        description=f"area under the backfilling curve, {order} order",
        unit="%",
        higher_is_better=True,
        extract=extract,
        lim=PERCENT,
    )


def auc_top1_metric(order: str) -> Metric:
    """The top-1 counterpart of :func:`auc_metric` (``backfill_curves.auc_top1``)."""

    def extract(rec: Record, ref: dict[str, Any] | None) -> float | None:
        value = ((rec.get("backfill_curves") or {}).get("auc_top1") or {}).get(order)
        return None if value is None else float(value)

    return Metric(
        key=f"top1_auc_{order}",  # not "auc_...": an order may be named "top1_x"
        label=f"AUC top-1 {order}",
        description=f"area under the top-1 backfilling curve, {order} order",
        unit="%",
        higher_is_better=True,
        extract=extract,
        lim=PERCENT,
    )


def finite(x: float | None) -> bool:
    """True for a real, finite number."""
    return x is not None and math.isfinite(x)
