"""Plots: per-scenario bar charts, cross mAP vs update cost, backfilling curves (PNG + PDF).

matplotlib is imported inside the functions that draw, so ``import fct.report`` stays fast.
Figures are made with ``matplotlib.figure.Figure`` on an explicit Agg canvas instead of
pyplot: no global backend switch (a user's notebook keeps its backend) and no figure manager
to leak. Output is deterministic: fixed size and dpi, matplotlib's default style whatever the
user's matplotlibrc says, and no dates or software versions in the file metadata.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fct.io import atomic_path
from fct.report.metric_table import METRICS, Metric, update_cost_per_item
from fct.report.summary import SMOKE_TITLE, Cell, Summary, slug

FIGSIZE = (8.0, 4.5)
DPI = 110
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None}
MARKERS = "osD^vP*Xph<>"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: Number of points of a backfilling curve: 0 %, 20 intermediate steps, 100 %.
CURVE_POINTS = 22


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib.style

    # The default style, not the user's rc: the same records give the same image everywhere.
    with matplotlib.style.context("default"):
        yield


def plain(text: str, limit: int = 60) -> str:
    """``text`` for a matplotlib label, drawn as the characters it is, at most ``limit`` long.

    Labels, scenario and suite names come from run records: a ``$`` pair would be parsed as
    mathtext (``$\\frac{$`` raises deep inside savefig), so every ``$`` is escaped, which
    matplotlib draws as a plain dollar. A legend skips labels starting with ``_``, so one gets
    a leading space. Control characters (a newline in a tick label) become spaces, and a long
    name is cut with "…" (it would squeeze the axes to nothing).
    """
    text = _CONTROL.sub(" ", str(text))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically, without dates in their metadata."""
    paths = []
    for ext, metadata in (("png", PNG_METADATA), ("pdf", PDF_METADATA)):
        path = stem.with_name(f"{stem.name}.{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, metadata=metadata)
        paths.append(path)
    return paths


def method_colors(methods: list[str]) -> dict[str, Any]:
    """A fixed colour per method (tab10 in display order), the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _limits(ax: Any, metric: Metric, values: list[float], axis: str = "y") -> None:
    """Axis limits from the metric table, tightened to the data (with headroom)."""
    lo, hi = metric.lim
    if not values:
        return
    top = max(values) * 1.15 if max(values) > 0 else 1.0
    if hi is not None:
        top = min(top, hi)
    bottom = lo if lo is not None else min(values)
    getattr(ax, f"set_{axis}lim")(bottom, top)


def _title(summary: Summary, text: str) -> str:
    """A plot title, under a first line saying SMOKE RUN for a smoke report."""
    return f"{SMOKE_TITLE}\n{text}" if summary.smoke else text


#: Height of one method's row in the bar chart (inches), and of everything else around it.
BAR_ROW = 0.42
BAR_FRAME = 1.9


def bar_figure(summary: Summary, scenario: str) -> Any:
    """Cross top-1 and mAP per method as horizontal bars (one row per method, so any number
    of long method names stay apart), with old/old (dashed) and new/new (dotted) as reference
    lines; the value axis names both metrics."""
    import numpy as np

    methods = summary.methods_in(scenario)
    cells = [summary.cells[(scenario, m)] for m in methods]
    keys = ("cross_top1", "cross_mAP")
    with _style():
        fig = _figure((FIGSIZE[0], max(FIGSIZE[1] - 1.0, BAR_FRAME + BAR_ROW * len(cells))))
        ax = fig.add_subplot()
        y = np.arange(len(cells))
        height = 0.38
        colors = ("tab:blue", "tab:orange")
        values: list[float] = []
        for i, (key, color) in enumerate(zip(keys, colors)):
            means = [c.mean(key) for c in cells]
            stds = [c.stats[key].std or 0.0 for c in cells]
            values += [m + s for m, s in zip(means, stds)]
            ax.barh(
                y + (i - 0.5) * height,
                means,
                height,
                xerr=stds if any(stds) else None,
                capsize=3,
                color=color,
                label=plain(METRICS[key].description),
            )
        refs = (("old/old", "--"), ("new/new", ":"))
        for case, style in refs:
            ref = summary.reference(scenario, case)
            if ref is None:
                continue
            prefix = case.replace("/", "_")
            for key, color in zip(("top1", "mAP"), colors):
                x = ref.mean(f"{prefix}_{key}")
                values.append(x)
                ax.axvline(
                    x,
                    color=color,
                    linestyle=style,
                    linewidth=1.2,
                    label=plain(f"{case} {METRICS[f'{prefix}_{key}'].label}"),
                )
        ax.set_yticks(y, [plain(c.label, 64) for c in cells])
        ax.invert_yaxis()  # display order, top to bottom
        ax.set_ylabel("method")
        top1, mAP = METRICS["cross_top1"], METRICS["cross_mAP"]
        ax.set_xlabel(f"{top1.description} and {mAP.description} ({mAP.unit}, {mAP.direction})")
        _limits(ax, mAP, values, axis="x")
        ax.set_title(
            _title(
                summary, f"{plain(summary.suite, 30)} / {plain(scenario)}: cross case per method"
            )
        )
        ax.grid(axis="x", alpha=0.3)
        fig.legend(loc="outside lower center", ncols=3, fontsize="small")
        return fig


def bar_chart(summary: Summary, scenario: str, stem: Path) -> list[Path]:
    """``bars_SCENARIO.{png,pdf}``: :func:`bar_figure`, saved."""
    with _style():
        return save(bar_figure(summary, scenario), stem)


def _cost_mode(records: list[dict[str, Any]]) -> str:
    """'throughput' when any run measured h's throughput, else 'fraction'."""
    if any(r["costs"].get("transform_embeddings_per_s") for r in records):
        return "throughput"
    return "fraction"


def _cost_points(summary: Summary, mode: str) -> list[tuple[Cell, float, float]]:
    """(cell, x, cross mAP) per (scenario, method); x per the mode, seed-averaged."""
    points = []
    for cell in summary.cells.values():
        if mode == "fraction":
            xs = [float(r["costs"]["backfill_fraction"]) for r in cell.records]
        else:
            xs = [update_cost_per_item(r) for r in cell.records]
            xs = [x for x in xs if x is not None]
        if xs:
            points.append((cell, sum(xs) / len(xs), cell.mean("cross_mAP")))
    return points


def _backfill_points(summary: Summary, mode: str) -> list[tuple[str, float, float]]:
    """Per scenario, a full backfill: every item re-encoded, reaching new/new mAP."""
    out = []
    for s in summary.scenarios:
        ref = summary.reference(s, "new/new")
        if ref is None:
            continue
        if mode == "fraction":
            out.append((s, 1.0, ref.mean("new_new_mAP")))
            continue
        rates = [
            r["costs"].get("backfill_images_per_s")
            for c in summary.cells.values()
            if c.scenario == s
            for r in c.records
        ]
        rates = [float(r) for r in rates if r]
        if rates:
            out.append((s, 1.0 / (sum(rates) / len(rates)), ref.mean("new_new_mAP")))
    return out


def cost_scatter(summary: Summary, stem: Path) -> list[Path]:
    """``update_cost.{png,pdf}``: :func:`cost_figure`, saved."""
    with _style():
        return save(cost_figure(summary), stem)


def cost_figure(summary: Summary) -> Any:
    """Cross mAP against update cost, one point per (scenario, method).

    x is the fraction of the gallery re-encoded, or, when any run measured the
    transformation's throughput, the per-item update cost in seconds on a log axis (runs that
    update nothing are drawn at the left edge, marked "no update"). Grey points: a full
    backfill of each scenario, which reaches the new/new mAP.
    """
    from matplotlib.lines import Line2D

    mode = _cost_mode(summary.records)
    points = _cost_points(summary, mode)
    backfill = _backfill_points(summary, mode)
    colors = method_colors(summary.methods)
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(summary.scenarios)}
    with _style():
        fig = _figure()
        ax = fig.add_subplot()
        if mode == "throughput":
            positive = [x for _, x, _ in points if x > 0] + [x for _, x, _ in backfill]
            floor = min(positive) / 10 if positive else 1e-9
            place = lambda x: x if x > 0 else floor  # noqa: E731 - log axis cannot show 0
            ax.set_xscale("log")
            if any(x == 0 for _, x, _ in points):
                ax.axvline(floor * 3, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(METRICS["update_cost_s"].axis_label + ", log scale")
        else:
            place = lambda x: x  # noqa: E731
            ax.set_xlim(-0.05, 1.05)
            ax.set_xlabel(METRICS["backfill_fraction"].axis_label)
        for cell, x, y in points:
            ax.scatter(
                place(x),
                y,
                color=colors[cell.method],
                marker=markers[cell.scenario],
                s=50,
                zorder=3,
            )
        for s, x, y in backfill:
            ax.scatter(x, y, color="grey", marker=markers[s], s=50, facecolors="none", zorder=2)
        if mode == "throughput" and any(x == 0 for _, x, _ in points):
            _zero_tick(ax, floor)
        ax.set_ylabel(METRICS["cross_mAP"].axis_label)
        ys = [y for _, _, y in points] + [y for _, _, y in backfill]
        _limits(ax, METRICS["cross_mAP"], ys)
        ax.grid(alpha=0.3)
        ax.set_title(_title(summary, f"{plain(summary.suite)}: cross mAP vs update cost"))
        handles = [
            Line2D(
                [],
                [],
                color=colors[m],
                marker="o",
                linestyle="",
                label=plain(summary.labels[m], 40),
            )
            for m in summary.methods
        ]
        handles += [
            Line2D(
                [],
                [],
                color="black",
                marker=markers[s],
                linestyle="",
                markerfacecolor="none",
                label=plain(s, 40),
            )
            for s in summary.scenarios
        ]
        if backfill:
            handles.append(
                Line2D(
                    [],
                    [],
                    color="grey",
                    marker="o",
                    linestyle="",
                    markerfacecolor="none",
                    label="full backfill (new/new)",
                )
            )
        fig.legend(handles=handles, loc="outside right upper", fontsize="small")
        return fig


def _zero_tick(ax: Any, floor: float) -> None:
    """Label the left edge of a log axis "0" (where zero-cost runs are drawn), powers of ten
    to the right of the separator; no minor ticks, which would suggest a scale near 0."""
    from matplotlib.ticker import NullLocator

    lo, hi = floor / 2, ax.get_xlim()[1]
    ax.set_xlim(lo, hi)
    powers = range(math.ceil(math.log10(floor * 3)), math.floor(math.log10(hi)) + 1)
    ticks = [floor] + [10.0**p for p in powers]
    ax.set_xticks(ticks, ["0\n(no update)"] + [f"$10^{{{p}}}$" for p in powers])
    ax.xaxis.set_minor_locator(NullLocator())


def _curves(cell: Cell) -> dict[str, list[float]]:
    """The seed-mean backfilling curve of each order a cell recorded (equal lengths only)."""
    out: dict[str, list[float]] = {}
    orders = sorted({o for r in cell.records for o in (r.get("curves") or {})})
    for order in orders:
        runs = [r["curves"][order] for r in cell.records if order in (r.get("curves") or {})]
        if len({len(c) for c in runs}) == 1:
            out[order] = [sum(v) / len(v) for v in zip(*runs)]
    return out


#: Line styles of the backfilling curves, cycled per (method, order) with the markers.
LINESTYLES = ("-", "--", "-.", ":")
#: Curves whose values all lie within this share of the plot's range get a zoomed panel.
ZOOM_BAND = 0.15


def zoom_band(curves: list[list[float]]) -> tuple[float, float] | None:
    """The narrow y band holding the most curves (at least 2), each curve whole, when it is
    under ZOOM_BAND of the range of all curves: where close methods hide each other."""
    if len(curves) < 2:
        return None
    lo, hi = min(min(c) for c in curves), max(max(c) for c in curves)
    width = ZOOM_BAND * (hi - lo)
    if width <= 0:
        return None
    bands = sorted((min(c), max(c)) for c in curves)
    best: list[tuple[float, float]] = []
    for start, _ in bands:
        inside = [b for b in bands if b[0] >= start and b[1] <= start + width]
        if len(inside) > len(best):
            best = inside
    if len(best) < 2:
        return None
    return min(b[0] for b in best), max(b[1] for b in best)


def curve_figure(summary: Summary, scenario: str) -> Any:
    """Backfilling curves of one scenario: cross mAP as the gallery is progressively
    backfilled, one line per (method, order). Close methods stay apart: each method has its
    own colour and marker, its markers sit on other points than the next method's, line
    styles cycle over methods and orders, and when several curves lie in a narrow band a
    second panel below zooms on it (:func:`zoom_band`)."""
    colors = method_colors(summary.methods)
    lines = []
    for i, m in enumerate(summary.methods_in(scenario)):
        cell = summary.cells[(scenario, m)]
        for j, (order, curve) in enumerate(sorted(_curves(cell).items())):
            n = len(curve)
            style = {
                "color": colors[m],
                "linestyle": LINESTYLES[(i + j) % len(LINESTYLES)],
                "marker": MARKERS[i % len(MARKERS)],
                "markersize": 5,
                "markevery": (i % 3, 3),
                "label": f"{plain(cell.label, 40)}, {plain(order, 20)}",
            }
            lines.append(([100.0 * k / (n - 1) if n > 1 else 0.0 for k in range(n)], curve, style))
    band = zoom_band([curve for _, curve, _ in lines])
    ylabel = METRICS["cross_mAP"].axis_label
    with _style():
        fig = _figure((FIGSIZE[0], FIGSIZE[1] + 2.5) if band else FIGSIZE)
        if band:
            ax, zoom = fig.subplots(2, 1, height_ratios=[3, 2])
        else:
            ax, zoom = fig.add_subplot(), None
        for axes in (ax, zoom) if zoom is not None else (ax,):
            for xs, curve, style in lines:
                axes.plot(xs, curve, **style)
            axes.set_xlim(0, 100)
            axes.grid(alpha=0.3)
            axes.set_ylabel(ylabel)
        ax.set_xlabel("gallery backfilled (%)")
        _limits(ax, METRICS["cross_mAP"], [y for _, curve, _ in lines for y in curve])
        ax.set_title(
            _title(summary, f"{plain(summary.suite, 30)} / {plain(scenario)}: backfilling curves")
        )
        if zoom is not None:
            pad = max(0.1 * (band[1] - band[0]), 0.05)
            zoom.set_ylim(band[0] - pad, band[1] + pad)
            zoom.set_xlabel("gallery backfilled (%)")
            zoom.set_title(f"zoom on the close curves: {band[0]:.1f} to {band[1]:.1f} % mAP")
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
        return fig


def curve_plot(summary: Summary, scenario: str, stem: Path) -> list[Path]:
    """``curves_SCENARIO.{png,pdf}``: :func:`curve_figure`, saved."""
    with _style():
        return save(curve_figure(summary, scenario), stem)


def has_curves(summary: Summary, scenario: str) -> bool:
    """True when any run of ``scenario`` recorded a backfilling curve."""
    return any(
        r.get("curves")
        for m in summary.methods_in(scenario)
        for r in summary.cells[(scenario, m)].records
    )


def write_plots(summary: Summary, out: Path) -> list[Path]:
    """Write every plot under ``out/plots``; return the paths (PNG then PDF per figure)."""
    folder = out / "plots"
    paths = []
    for s in summary.scenarios:
        paths += bar_chart(summary, s, folder / f"bars_{slug(s)}")
        if has_curves(summary, s):
            paths += curve_plot(summary, s, folder / f"curves_{slug(s)}")
    paths += cost_scatter(summary, folder / "update_cost")
    return paths
