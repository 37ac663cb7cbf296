"""A throughput result as Markdown (header lines and one table) and as a PNG plot.

Table cells go through fct.report.render's Markdown escaping; the table keeps its own
column layout (``---`` for text columns), so the files it writes stay as they were.
"""

from __future__ import annotations

from pathlib import Path

from fct.io import atomic_path
from fct.report.render import md_escape


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _load_range(configs: list[dict]) -> str:
    loads = [c["load_average_1min"] for c in configs if c.get("load_average_1min") is not None]
    return f"{min(loads)}-{max(loads)}" if loads else "unknown"


def to_markdown(result: dict, command: str | None = None) -> str:
    """A markdown table of a result, headed by device, versions and thread count.

    Names and messages in it (sizes, device, a compile failure) are shown as plain text.
    """
    prov = result["provenance"]
    configs = result["configurations"]
    threads = sorted({c["threads"] for c in configs})
    lines = [
        "# Throughput of the transformation step",
        "",
        f"- device: {md_escape(prov['device'])}; torch threads: {', '.join(map(str, threads))}; "
        f"load average during the runs: {_load_range(configs)}",
        f"- versions: fct {prov['fct_version']} ({prov['git_sha']}), torch {prov['torch']}, "
        f"timm {prov['timm']}, python {prov['python']}",
        f"- date: {prov['date']}; wall time {prov['wall_seconds']} s"
        + ("; **quick mode: smoke figures, not for reporting**" if result.get("quick") else ""),
    ]
    if command:
        lines.append(f"- command: `{command}`")
    lines += [
        "",
        "h embeddings/s per variant (median call); GEMM peak = best FLOP/s of a plain GEMM "
        "sequence with h's layer shapes (same batch, dtype, run); fraction = h FLOP/s / GEMM "
        "peak; fastest: folded h's rate in its fastest call (what a quiet "
        "machine gives); backfill = images/s of the new model's forward.",
        "",
        "| sizes | dtype | threads | batch | eager /s | folded /s | compiled /s "
        "| GEMM peak GFLOP/s | folded GFLOP/s | fraction eager / folded / compiled "
        "| folded /s, fastest call | backfill img/s | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for c in configs:
        v = c["variants"]

        def rate(name: str, v: dict = v) -> str:
            return _fmt(v.get(name, {}).get("embeddings_per_s"))

        def frac(name: str, v: dict = v) -> str:
            f = v.get(name, {}).get("fraction_of_gemm_peak")
            return "-" if f is None else f"{f:.2f}"

        lines.append(
            f"| {md_escape(c['sizes'])} | {md_escape(c['dtype'])} | {c['threads']} | "
            f"{c['batch']} | {rate('eager')} | {rate('folded')} | {rate('compiled')} | "
            f"{_fmt(c['gemm_flops_per_s'] / 1e9, 1)} ({md_escape(c['gemm_backend'])}) | "
            f"{_fmt(c['flops_per_s'] / 1e9, 1)} | "
            f"{frac('eager')} / {frac('folded')} / {frac('compiled')} | "
            f"{_fmt(v['folded'].get('embeddings_per_s_fastest'))} | "
            f"{_fmt(c['backfill_images_per_s'], 1)} | {_fmt(c['speedup_vs_backfill'])}x |"
        )
    skipped = {c["variants"].get("compiled", {}).get("skipped") for c in configs} - {None}
    for reason in sorted(skipped):
        lines.append(f"\ncompiled: {md_escape(reason)}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """Embeddings/s against batch size per sizes and variant, with the GEMM bound, as PNG.

    Matplotlib's object API on an Agg canvas (no pyplot: no global state, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    configs = result["configurations"]
    # One panel per (dtype, threads): the curves of one panel share their conditions.
    panels = sorted({(c["dtype"], c["threads"]) for c in configs})
    fig = Figure(figsize=(6.4 * len(panels), 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = {"eager": ":", "folded": "-", "compiled": "--"}
    colors = {name: f"C{i}" for i, name in enumerate(sorted({c["sizes"] for c in configs}))}
    for ax, (dtype, threads) in zip(axes, panels):
        for sizes, color in colors.items():
            rows = sorted(
                (
                    c
                    for c in configs
                    if (c["dtype"], c["threads"]) == (dtype, threads) and c["sizes"] == sizes
                ),
                key=lambda c: c["batch"],
            )
            if not rows:
                continue
            xs = [c["batch"] for c in rows]
            bound = [c["gemm_flops_per_s"] / c["h_flops_per_item"] for c in rows]
            ax.plot(xs, bound, color=color, lw=4, alpha=0.25, label=f"{sizes}: GEMM peak")
            for variant, ls in styles.items():
                pts = [
                    (c["batch"], c["variants"][variant]["embeddings_per_s"])
                    for c in rows
                    if "embeddings_per_s" in c["variants"].get(variant, {})
                ]
                if pts:
                    ax.plot(*zip(*pts), ls=ls, marker="o", ms=3, color=color,
                            label=f"{sizes}: {variant}")  # fmt: skip
            backfill = rows[0]["backfill_images_per_s"]
            ax.axhline(backfill, color=color, lw=0.8, ls="-.", label=f"{sizes}: backfill img/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("items / s")
        ax.set_title(f"{dtype}, {threads} thread{'s' if threads > 1 else ''}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Transformation h throughput, {result['provenance']['device']}", fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path
