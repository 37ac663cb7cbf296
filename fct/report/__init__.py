"""Reports built from run records only: leaderboard, paper tables, plots, index.html.

Nothing here trains or loads a model (no torch import); matplotlib is imported only where
plots are drawn. Entry points: :func:`build_report` and :func:`load_records`.
"""

from fct.report.build import build_report
from fct.report.metric_table import METRICS, Metric
from fct.report.records import load_records, validate_record

__all__ = ["METRICS", "Metric", "build_report", "load_records", "validate_record"]
