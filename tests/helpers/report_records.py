"""Crafted run records for report tests: a factory (make_record, base_records), a writer, and
readers (read_csv, check_latex_structure) shared by the report, record and fuzz tests."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from fct.io import write_json

SUITE = "quickstart"


def case(top1: float, mAP: float, top5: float | None = None, mAP_R: float | None = None) -> dict:
    """One case's metrics; top-5 and mAP@R default to values derived from top-1 / mAP."""
    return {
        "top1": top1,
        "top5": top1 + 20 if top5 is None else top5,
        "mAP": mAP,
        "mAP@R": mAP / 2 if mAP_R is None else mAP_R,
        "n_query": 1000,
        "n_gallery": 1000,
        "n_skipped": 0,
    }


def make_record(
    scenario: str,
    method: str,
    cross: tuple[float, float],
    *,
    seed: int = 0,
    old: tuple[float, float] = (30.0, 15.0),
    new: tuple[float, float] = (55.0, 35.0),
    suite: str = SUITE,
    date: str = "2026-11-26T13:00:00Z",
    device: str = "cpu (test)",
    dataset: str = "fashion_mnist",
    paper: bool = False,
    label: str | None = None,
    costs: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A complete, valid run record with the given cross / old/old / new/new (top-1, mAP)."""
    transform = method.startswith("fct")
    method_config: dict[str, Any] = {"name": method}
    if label:
        method_config["label"] = label
    rec = {
        "schema": 1,
        "suite": suite,
        "scenario": scenario,
        "method": method,
        "seed": seed,
        "scenario_config": {
            "name": scenario,
            "paper": paper,
            "kinds": ["class-subset"],
            "description": f"{scenario}: old on half the classes, new on all",
            "old": {
                "dataset": dataset,
                "classes": [0, 5],
                "arch": "resnet18",
                "loss": "ce",
                "embedding_dim": 128,
            },
            "new": {
                "dataset": dataset,
                "classes": [0, 10],
                "arch": "resnet18",
                "loss": "ce",
                "embedding_dim": 128,
            },
            "side": None,
            "eval": {"dataset": dataset, "split": "test", "distance": "l2"},
        },
        "method_config": method_config,
        "cases": {"old/old": case(*old), "new/new": case(*new), "cross": case(*cross)},
        "costs": {
            "train_seconds": 12.3,
            "backfill_fraction": 0.0,
            "transform_embeddings_per_s": 1.0e6 if transform else None,
            "backfill_images_per_s": 1000.0,
            "speedup_vs_backfill": 1000.0 if transform else None,
            **(costs or {}),
        },
        "provenance": {
            "fct_version": "0.1.0",
            "git_sha": "0" * 40,
            "torch": "2.4",
            "numpy": "2.0",
            "python": "3.11",
            "device": device,
            "seed": seed,
            "date": date,
            "wall_seconds": 1.0,
        },
    }
    rec.update(extra)
    return rec


def write_record(results: Path, rec: dict[str, Any], name: str | None = None) -> Path:
    """Write ``rec`` where the runner would: runs/SCENARIO/METHOD[.seedN].json."""
    if name is None:
        name = (
            f"{rec['method']}.json"
            if rec["seed"] == 0
            else f"{rec['method']}.seed{rec['seed']}.json"
        )
    return write_json(results / "runs" / rec["scenario"] / name, rec)


# Two scenarios, four methods; numbers chosen so every derived value is easy to check by hand.
#   method        scenario a (cross top-1, mAP)   scenario b     mean cross mAP
#   independent   (5, 1)                          (6, 2)          1.5
#   bct           (40, 20) new/new (50, 30)       (38, 14)        17.0
#   fct           (45, 25)                        (44, 24)        24.5
#   fct_side      (50, 28)                        (49, 29)        28.5
# old/old = (30, 15) everywhere; Independent's new/new = (55, 35).
BASE = {
    ("a", "independent"): (5.0, 1.0),
    ("a", "bct"): (40.0, 20.0),
    ("a", "fct"): (45.0, 25.0),
    ("a", "fct_side"): (50.0, 28.0),
    ("b", "independent"): (6.0, 2.0),
    ("b", "bct"): (38.0, 14.0),  # mAP below old/old's 15: not compatible
    ("b", "fct"): (44.0, 24.0),
    ("b", "fct_side"): (49.0, 29.0),
}


def base_records(**kw: Any) -> list[dict[str, Any]]:
    recs = []
    for (scenario, method), cross in BASE.items():
        new = (50.0, 30.0) if method == "bct" else (55.0, 35.0)
        recs.append(make_record(scenario, method, cross, new=new, **kw))
    return recs


def scenario_a(**kw: Any) -> list[dict[str, Any]]:
    """The base records of scenario a only: a report with the fewest plots (quicker)."""
    return [r for r in base_records(**kw) if r["scenario"] == "a"]


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


def check_latex_structure(tex: str) -> None:
    """Balanced braces, booktabs rules in order, one cell per column in every row."""
    unescaped = re.sub(r"\\[{}]", "", tex)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "closing brace without an opening one"
    assert depth == 0, "unbalanced braces"
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") == 1
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 1
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", tex).group(1)
    body = tex[tex.index("\\toprule") : tex.index("\\bottomrule")]
    rows = [line.strip() for line in body.splitlines() if line.strip().endswith("\\\\")]
    assert len(rows) >= 4
    for row in rows:
        cells = re.split(r"(?<!\\)&", row[: -len("\\\\")])
        width = sum(
            int(m.group(1)) if (m := re.search(r"\\multicolumn\{(\d+)\}", c)) else 1 for c in cells
        )
        assert width == len(spec), f"row has {width} columns, tabular has {len(spec)}: {row}"
    assert re.search(r"(?<!\\)[_%]", re.sub(r"^%.*$", "", tex, flags=re.M)) is None, (
        "unescaped _ or %"
    )


def ml_fct_setup(rec: dict[str, Any], side_dataset: str = "imagenet") -> dict[str, Any]:
    """Give ``rec`` the setup of ml-fct's CIFAR-100 numbers (ResNet50-128, old on classes
    0-49, h fitted online), so its published rows match; the side-information model is trained
    on ``side_dataset`` (all its classes for ImageNet, the old classes for CIFAR-100)."""
    config = rec["scenario_config"]
    for role, classes in (("old", [0, 50]), ("new", None)):
        config[role].update(dataset="cifar100", arch="resnet50", embedding_dim=128, classes=classes)
    config["side"] = {
        "dataset": side_dataset,
        "classes": None if side_dataset == "imagenet" else [0, 50],
        "arch": "resnet50",
        "embedding_dim": 128,
        "loss": "simclr",
    }
    config["transformation"] = {"features": "online", "views": 1}
    return rec


def paper_records() -> list[dict[str, Any]]:
    kw = {"dataset": "cifar100", "paper": True, "old": (33.0, 16.0), "new": (56.0, 36.0)}
    return [
        ml_fct_setup(rec)
        for rec in (
            make_record("cifar100-half", "independent", (1.0, 0.5), **kw),
            make_record("cifar100-half", "bct", (40.0, 20.0), **{**kw, "new": (52.0, 31.0)}),
            make_record("cifar100-half", "fct", (47.0, 25.0), **kw),
            make_record("cifar100-half", "fct_side", (50.3, 33.3, 74.0, 16.0), **kw),
        )
    ]


def table_row(md: str, name: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]
