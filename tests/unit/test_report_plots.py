"""Plots stay readable: many long method names, close curves, axes that name their metric.

The figures are read back as matplotlib objects (fct.report.plots.*_figure) and drawn, so the
tests measure what a reader would see: tick label boxes, line styles, axis labels.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from report_records import SUITE, make_record

from fct.report.plots import bar_figure, cost_figure, curve_figure, zoom_band
from fct.report.records import SOURCE_KEY, validate_record
from fct.report.summary import Summary, summarize

#: Ten methods with long labels, as a suite with variants and plugins has them.
LONG_LABELS = [
    "Independent",
    "BCT, BT-2 form (class-mean classifier, normalised, weight 10)",
    "BCT, scaled new rows (old rows and scaled class means)",
    "FCT with a wide transformation (hidden 4096, 80 epochs)",
    "FCT + side-info (SimCLR side model trained on the old classes)",
    "FastFill (uncertainty-ordered backfilling, smoothing 0.1)",
    "FastFill + side-info (uncertainty-ordered, smoothing 0.1)",
    "RACT (contrastive compatibility, temperature 0.01, top-10)",
    "L2-BCT (L2 compatibility term on the old embeddings, weight 1)",
    "My plugin: learned orthogonal projection with a long label",
]


def summary_of(records: list[dict[str, Any]]) -> Summary:
    recs = [
        {**validate_record(r, f"{i}.json"), SOURCE_KEY: f"{i}.json"} for i, r in enumerate(records)
    ]
    return summarize(recs, SUITE)


def ten_methods(curves: bool = False) -> Summary:
    """Scenario a with ten methods (plugins with long labels); with ``curves``, six of them
    have backfilling curves within a fraction of a point of each other."""
    records = []
    for i, label in enumerate(LONG_LABELS):
        method = "independent" if i == 0 else f"m{i:02d}"
        extra: dict[str, Any] = {}
        if curves:
            start = 10.0 if i == 0 else 70.0 + 0.1 * i  # methods 1-9 are within a point
            extra["curves"] = {"random": [start + (78.0 - start) * k / 21 for k in range(22)]}
            if i in (4, 5):
                extra["curves"]["uncertainty"] = [v + 0.05 for v in extra["curves"]["random"]]
        records.append(make_record("a", method, (40.0 + i, 20.0 + i), label=label, **extra))
    return summary_of(records)


def overlaps(labels: list[Any]) -> list[tuple[str, str]]:
    """Pairs of drawn tick labels whose boxes intersect."""
    boxes = [(t.get_text(), t.get_window_extent()) for t in labels if t.get_text()]
    return [
        (a, b)
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2)
        if box_a.overlaps(box_b)
    ]


def test_bar_labels_of_ten_long_methods_do_not_overlap() -> None:
    summary = ten_methods()
    fig = bar_figure(summary, "a")
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.get_yticklabels() if t.get_text()]
    assert len(labels) == 10
    assert overlaps(labels) == []
    # Every label is drawn whole, inside the figure (not cut at the left edge).
    width = fig.bbox.width
    for t in labels:
        box = t.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= width, t.get_text()
    # The longest label is shown in full, not cut to a few characters.
    assert LONG_LABELS[8] in [t.get_text() for t in labels]


def test_bar_chart_value_axis_names_both_metrics() -> None:
    fig = bar_figure(ten_methods(), "a")
    ax = fig.axes[0]
    assert "cross CMC top-1" in ax.get_xlabel() and "cross mAP" in ax.get_xlabel()
    assert "%" in ax.get_xlabel()
    assert ax.get_ylabel() == "method"
    assert "accuracy" not in ax.get_xlabel()


def test_close_curves_are_told_apart_and_zoomed() -> None:
    summary = ten_methods(curves=True)
    fig = curve_figure(summary, "a")
    main, zoom = fig.axes[:2]
    lines = [line for line in main.get_lines() if not line.get_label().startswith("_")]
    assert len(lines) == 12  # ten methods, two with a second order
    styles = [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines]
    assert len(set(styles)) == len(styles), "two curves are drawn alike"
    # Neighbouring methods put their markers on different points.
    marks = {line.get_label(): line.get_markevery() for line in lines}
    assert len({str(m) for m in marks.values()}) > 1
    # The close curves (70.1-78) get a zoomed panel whose range is a fraction of the main one.
    lo, hi = zoom.get_ylim()
    main_lo, main_hi = main.get_ylim()
    assert lo > 69 and hi < 79 and (hi - lo) < 0.2 * (main_hi - main_lo)
    for ax in (main, zoom):
        assert "mAP" in ax.get_ylabel() and "accuracy" not in ax.get_ylabel()


def test_no_zoom_panel_when_curves_are_apart() -> None:
    records = [
        make_record("a", m, (40.0, 20.0), curves={"random": [s + k for k in range(22)]})
        for m, s in (("independent", 0.0), ("fct", 30.0), ("bct", 60.0))
    ]
    fig = curve_figure(summary_of(records), "a")
    assert len(fig.axes) == 1
    assert "mAP" in fig.axes[0].get_ylabel()


@pytest.mark.parametrize(
    ("curves", "band"),
    [
        ([[0, 10], [50, 51], [50.5, 51.5], [90, 100]], (50, 51.5)),
        ([[0, 100], [0, 100]], None),  # close, but not narrow against the whole range
        ([[1, 2]], None),
        ([[5, 5], [5, 5]], None),
    ],
)
def test_zoom_band(curves: list[list[float]], band: tuple[float, float] | None) -> None:
    assert zoom_band(curves) == band


def test_update_cost_plot_names_cross_map() -> None:
    fig = cost_figure(ten_methods())
    ax = fig.axes[0]
    assert "cross mAP" in ax.get_ylabel()
    assert "mAP" in ax.get_title() and "accuracy" not in ax.get_title()
