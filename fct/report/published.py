"""Published FCT numbers (``fct/reference/published_results.csv``), for the "published" columns.

Only absolute numbers are used: rows giving a relative gain ("+18.1", method "fct vs bct") are
not comparable to a table cell and are skipped. When a number was published more than once
(the ml-fct README of 2022 and of 2023), the most recent is shown and the older ones are
listed in the table's notes.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from importlib import resources

#: Record method -> (published method, side-information used).
PUBLISHED_METHOD = {
    "independent": ("independent", False),
    "bct": ("bct", False),
    "fct": ("fct", False),
    "fct_side": ("fct", True),
}
_DATASET_ALIASES = {"imagenet1k": "imagenet", "imagenet1000": "imagenet", "ilsvrc2012": "imagenet"}


@dataclass(frozen=True)
class Published:
    """One published row: source, year, what it measures and its numbers (percent)."""

    source: str
    year: int | None
    dataset: str
    case: str
    method: str
    side_info: bool
    top1: float | None
    top5: float | None
    mAP: float | None
    notes: str

    def values(self) -> str:
        """``50.2 / 73.7 / 32.2`` (top-1 / top-5 / mAP)."""
        return " / ".join(
            "–" if v is None else f"{v:.1f}" for v in (self.top1, self.top5, self.mAP)
        )


def dataset_key(name: str) -> str:
    """Normalise a dataset name: ``CIFAR-100`` and ``cifar100`` match; ImageNet aliases fold."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return _DATASET_ALIASES.get(key, key)


def _number(text: str) -> float | None:
    text = text.strip()
    return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else None


@functools.cache
def load_published() -> tuple[Published, ...]:
    """The absolute-number rows of the packaged published_results.csv."""
    text = resources.files("fct").joinpath("reference/published_results.csv").read_text("utf-8")
    rows = []
    for row in csv.DictReader(text.splitlines()):
        if any(row[k].strip().startswith("+") for k in ("top1", "top5", "mAP")):
            continue  # a relative gain, not a retrieval number
        year = re.search(r"\((\d{4})\)", row["source"])
        rows.append(
            Published(
                source=row["source"].strip(),
                year=int(year.group(1)) if year else None,
                dataset=dataset_key(row["dataset"]),
                case=row["case"].strip(),
                method=row["method"].strip(),
                side_info=row["side_info"].strip().lower() == "yes",
                top1=_number(row["top1"]),
                top5=_number(row["top5"]),
                mAP=_number(row["mAP"]),
                notes=row["notes"].strip(),
            )
        )
    return tuple(rows)


def has_dataset(dataset: str) -> bool:
    """True when any published row is about ``dataset``."""
    key = dataset_key(dataset)
    return any(p.dataset == key for p in load_published())


def lookup(dataset: str, case: str, method: str) -> tuple[Published | None, list[Published]]:
    """The published row for (dataset, case, record method): the most recent, and the older.

    Returns ``(None, [])`` when nothing was published for it (or the method is a plugin).
    """
    if method not in PUBLISHED_METHOD:
        return None, []
    pub_method, side = PUBLISHED_METHOD[method]
    key = dataset_key(dataset)
    matches = [
        p
        for p in load_published()
        if (p.dataset, p.case, p.method, p.side_info) == (key, case, pub_method, side)
    ]
    if not matches:
        return None, []
    # Most recent year first; a row without a year counts as oldest; file order breaks ties.
    ordered = sorted(matches, key=lambda p: -(p.year or 0))
    return ordered[0], ordered[1:]
