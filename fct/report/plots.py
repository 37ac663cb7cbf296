"""Plots: per-scenario bar charts, accuracy vs update cost, backfilling curves (PNG + PDF).

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
from fct.report.summary import Cell, Summary, slug

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


def bar_chart(summary: Summary, scenario: str, stem: Path) -> list[Path]:
    """Cross top-1 and mAP per method, with old/old and new/new as reference lines."""
    import numpy as np

    methods = summary.methods_in(scenario)
    cells = [summary.cells[(scenario, m)] for m in methods]
    keys = ("cross_top1", "cross_mAP")
    with _style():
        fig = _figure()
        ax = fig.add_subplot()
        x = np.arange(len(cells))
        width = 0.38
        colors = ("tab:blue", "tab:orange")
        values: list[float] = []
        for i, (key, color) in enumerate(zip(keys, colors)):
            means = [c.mean(key) for c in cells]
            stds = [c.stats[key].std or 0.0 for c in cells]
            values += [m + s for m, s in zip(means, stds)]
            ax.bar(
                x + (i - 0.5) * width,
                means,
                width,
                yerr=stds if any(stds) else None,
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
                y = ref.mean(f"{prefix}_{key}")
                values.append(y)
                ax.axhline(
                    y,
                    color=color,
                    linestyle=style,
                    linewidth=1.2,
                    label=plain(f"{case} {METRICS[f'{prefix}_{key}'].label}"),
                )
        ax.set_xticks(x, [plain(c.label, 30) for c in cells], rotation=15 if len(cells) > 4 else 0)
        ax.set_ylabel("retrieval accuracy (%, higher is better)")
        _limits(ax, METRICS["cross_mAP"], values)
        ax.set_title(f"{plain(summary.suite, 30)} / {plain(scenario)}: cross case per method")
        ax.grid(axis="y", alpha=0.3)
        fig.legend(loc="outside right upper", fontsize="small")
        return save(fig, stem)


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
    """Per scenario, a full backfill: every item re-encoded, reaching new/new accuracy."""
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
    """Cross mAP against update cost, one point per (scenario, method).

    x is the fraction of the gallery re-encoded, or, when any run measured the
    transformation's throughput, the per-item update cost in seconds on a log axis (runs that
    update nothing are drawn at the left edge, marked "no update"). Grey points: a full
    backfill of each scenario, which reaches the new/new accuracy.
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
        ax.set_title(f"{plain(summary.suite)}: accuracy vs update cost")
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
        return save(fig, stem)


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


def curve_plot(summary: Summary, scenario: str, stem: Path) -> list[Path]:
    """Backfilling curves of one scenario: accuracy as the gallery is progressively backfilled."""
    colors = method_colors(summary.methods)
    styles = ["-", "--", "-.", ":"]
    with _style():
        fig = _figure()
        ax = fig.add_subplot()
        ys: list[float] = []
        for m in summary.methods_in(scenario):
            cell = summary.cells[(scenario, m)]
            for i, (order, curve) in enumerate(sorted(_curves(cell).items())):
                n = len(curve)
                xs = [100.0 * j / (n - 1) if n > 1 else 0.0 for j in range(n)]
                ax.plot(
                    xs,
                    curve,
                    color=colors[m],
                    linestyle=styles[i % len(styles)],
                    marker=".",
                    label=f"{plain(cell.label, 40)}, {plain(order, 20)}",
                )
                ys += curve
        ax.set_xlabel("gallery backfilled (%)")
        ax.set_ylabel("cross retrieval accuracy (%, higher is better)")
        ax.set_xlim(0, 100)
        _limits(ax, METRICS["cross_mAP"], ys)
        ax.grid(alpha=0.3)
        ax.set_title(f"{plain(summary.suite, 30)} / {plain(scenario)}: backfilling curves")
        fig.legend(loc="outside right upper", fontsize="small")
        return save(fig, stem)


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
