"""Published numbers (``fct/reference/published_results.csv``) and when they may sit beside ours.

A published number is only comparable to a scenario trained and evaluated the same way, so
every source declares the setup its numbers come from (:data:`SETUPS`, one entry per source
and dataset, taken from the rows' ``notes`` and ``fct/reference/README.md``), and a row is
shown beside a scenario only when that setup matches the scenario's ``scenario_config``:

1. the source declares a setup for the row's dataset (a row without one is never shown);
2. the scenario's protocol (``scenario_config.protocol``, ``ml-fct`` when absent) is the
   setup's: BT-2's and the lambda-orthogonality paper's rows were trained and evaluated their
   own way and never sit beside an ml-fct-protocol scenario;
3. every *hard* field matches (:func:`mismatches`): evaluation dataset, the old and new models'
   dataset, architecture and embedding size, full training sets, old classes, new classes
   (all), evaluation distance, and the whole evaluation split;
4. the record's method is the published method (:func:`identity`): by its registered method
   (``method_config.base``), a suite variant only when it is BCT in the published form.

*Soft* fields do not hide a row but are named beside it (:func:`deviations`): where the
side-information model was trained and what it is, and how FCT's transformation h was fitted
(the reference recomputes features from freshly augmented images every step; ours may use
cached embeddings). Rows giving a relative gain ("+18.1", method "fct vs bct") are not a cell
value and are skipped. When several matching rows exist (the ml-fct README of 2022 and of
2023), the most recent is shown and the older ones go to the table's notes.
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

#: The protocol a scenario follows unless its scenario_config names another.
DEFAULT_PROTOCOL = "ml-fct"
#: Classes per dataset: "all classes" (classes = null) is the range 0..N.
DATASET_CLASSES = {"cifar100": 100, "imagenet": 1000}
_DATASET_ALIASES = {"imagenet1k": "imagenet", "imagenet1000": "imagenet", "ilsvrc2012": "imagenet"}


@dataclass(frozen=True)
class SideInfo:
    """The side-information model a published FCT + side-info number used."""

    dataset: str  # dataset key of its training data
    classes: tuple[int, int]  # half-open class range it was trained on
    arch: str
    embedding_dim: int
    loss: str
    text: str  # how the notes name its training data, e.g. "ImageNet-1k"


@dataclass(frozen=True)
class Setup:
    """How a source trained and evaluated the numbers it published for one dataset.

    ``distance`` and ``loss`` (of the old and new models) None: not stated by the source, not
    checked. ``h_features``: how h was fitted ("online": features of freshly augmented images
    every step), None when the source published no transformation or did not say.
    """

    protocol: str
    arch: str
    embedding_dim: int
    old_classes: tuple[int, int]
    n_classes: int
    distance: str | None
    side: SideInfo | None
    h_features: str | None
    text: str  # one line for the docs and the notes
    loss: str | None = "ce"


_ML_FCT_CIFAR = Setup(
    protocol="ml-fct",
    arch="resnet50",
    embedding_dim=128,
    old_classes=(0, 50),
    n_classes=100,
    distance="l2",
    # The reference ships only ImageNet-trained SimCLR side-information models and tells
    # CIFAR-100 users to reuse the ImageNet one; the 2022 row's notes name ImageNet-1000, and
    # the 2023 re-run (whose notes say only "single run") is taken to use the same model.
    side=SideInfo("imagenet", (0, 1000), "resnet50", 128, "simclr", "ImageNet-1k"),
    h_features="online",
    text="ResNet50-128, old on classes 0-49, new on all 100; leave-one-out l2, 10k test split",
)
_ML_FCT_IMAGENET = Setup(
    protocol="ml-fct",
    arch="resnet50",
    embedding_dim=128,
    old_classes=(0, 500),
    n_classes=1000,
    distance="l2",
    side=SideInfo(
        "imagenet", (0, 500), "resnet50", 128, "simclr", "ImageNet-500 (the old classes)"
    ),
    h_features="online",
    text="ResNet50-128, old on classes 0-499, new on all 1000; leave-one-out l2, 50k val split",
)
_BT2 = "BT-2's own training; cosine evaluation of normalised features"
_LAMBDA = "ResNet-34 128-d, old on classes 0-499, new on all 1000 (the paper's own training)"

#: (source without its year, dataset) -> the setup of that source's rows for that dataset.
SETUPS: dict[tuple[str, str], Setup] = {
    ("ml-fct README", "cifar100"): _ML_FCT_CIFAR,
    ("ml-fct README", "imagenet"): _ML_FCT_IMAGENET,
    ("BT-2 README", "cifar100"): Setup(
        "bt2", "resnet50", 128, (0, 50), 100, "cosine", None, None, f"ResNet50-128; {_BT2}"
    ),
    ("BT-2 README", "imagenet"): Setup(
        "bt2", "resnet50", 128, (0, 500), 1000, "cosine", None, None, f"ResNet50-128; {_BT2}"
    ),
    ("lambda-orthogonality paper (arXiv 2509.16664)", "imagenet"): Setup(
        "lambda-orthogonality", "resnet34", 128, (0, 500), 1000, None, None, None, _LAMBDA, None
    ),
}

#: Our registered method (``method_config.base``) -> (published method, side-information).
#: ``bt2`` is BT-2's own method: nothing built in registers it, so its rows stay unmatched
#: unless a plugin registered as ``bt2`` runs.
PUBLISHED_METHOD = {
    "independent": ("independent", False),
    "bct": ("bct", False),
    "fct": ("fct", False),
    "fct_side": ("fct", True),
    "fastfill": ("fastfill", False),
    "fastfill_side": ("fastfill", True),
    "bt2": ("bt2", False),
}
#: The BCT settings each protocol's published "bct" was trained with. For ml-fct (the paper's
#: form) a setting a record does not list counts as the paper's default; BT-2's form must be
#: set explicitly (rows = "means", normalize = true, weight = 10).
BCT_FORMS: dict[str, dict[str, Any]] = {
    "ml-fct": {"rows": "old+means", "normalize": False, "weight": 1.0, "smoothing": None},
    "bt2": {"rows": "means", "normalize": True, "weight": 10.0},
}
#: Methods whose published numbers involve a trained transformation h.
TRANSFORMS = ("fct", "fastfill")
#: The backfilling order a published "backfill-auc" row (no order named) was measured with.
OWN_ORDER = {"fastfill": "uncertainty"}
DEFAULT_ORDER = "random"


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

    @property
    def family(self) -> str:
        """The source without its year: ``ml-fct README (2023)`` -> ``ml-fct README``."""
        return re.sub(r"\s*\(\d{4}\)$", "", self.source)

    @property
    def setup(self) -> Setup | None:
        """The declared setup of this row's source and dataset (None: never shown)."""
        return SETUPS.get((self.family, self.dataset))

    def values(self) -> str:
        """``50.2 / 73.7 / 32.2`` (top-1 / top-5 / mAP)."""
        return " / ".join(
            "–" if v is None else f"{v:.1f}" for v in (self.top1, self.top5, self.mAP)
        )


@dataclass(frozen=True)
class Match:
    """The published row shown in one cell, the older rows it supersedes, and the named
    differences between its setup and the scenario's (each one a footnote)."""

    row: Published
    older: tuple[Published, ...]
    deviations: tuple[str, ...]


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


# ---------------------------------------------------------------------------------------------
# Reading a scenario_config. Records are validated for the keys the report needs, but a spec's
# fields may hold anything: whatever cannot be read simply does not match.

_ALL = "all"


def _dict(node: Any, key: str) -> dict[str, Any]:
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _classes(value: Any) -> tuple[int, int] | str | None:
    """A class range as a tuple, ``_ALL`` for null (all classes), None when unreadable."""
    if value is None:
        return _ALL
    if isinstance(value, list | tuple) and len(value) == 2:
        lo, hi = (_int(v) for v in value)
        if lo is not None and hi is not None:
            return (lo, hi)
    return None


def _full(classes: tuple[int, int] | str | None, dataset: str) -> tuple[int, int] | str | None:
    """``_ALL`` written as the dataset's whole range, so [0, 100] and null compare equal."""
    n = DATASET_CLASSES.get(dataset)
    return (0, n) if classes == _ALL and n is not None else classes


def _text(value: Any) -> str:
    return value.strip().lower() if isinstance(value, str) else ""


def _range_text(classes: tuple[int, int] | str | None) -> str:
    if classes == _ALL:
        return "all classes"
    if isinstance(classes, tuple):
        return f"classes {classes[0]}-{classes[1] - 1}"
    return "unknown classes"


def protocol(config: dict[str, Any]) -> str:
    """The protocol a scenario follows: ``scenario_config.protocol``, else ml-fct's."""
    value = config.get("protocol")
    return value.strip() if isinstance(value, str) and value.strip() else DEFAULT_PROTOCOL


def mismatches(setup: Setup, dataset: str, config: dict[str, Any]) -> list[str]:
    """The hard fields where ``config`` differs from ``setup`` (for ``dataset``); empty = match.

    Each item names the field, ours and the published value, e.g. ``old arch resnet18 (published
    resnet50)``.
    """
    out = []
    ours = protocol(config)
    if ours != setup.protocol:
        out.append(f"protocol {ours} (published {setup.protocol})")
    ev = _dict(config, "eval")
    if dataset_key(str(ev.get("dataset", ""))) != dataset:
        out.append(f"evaluated on {ev.get('dataset')!s:.40} (published {dataset})")
    if setup.distance is not None and _text(ev.get("distance", "l2")) != setup.distance:
        out.append(f"{ev.get('distance')!s:.20} distance (published {setup.distance})")
    if ev.get("classes") is not None or ev.get("max_per_class") is not None:
        out.append("a subset of the evaluation split (published: all of it)")
    for role in ("old", "new"):
        spec = _dict(config, role)
        if dataset_key(str(spec.get("dataset", ""))) != dataset:
            out.append(f"{role} model trained on {spec.get('dataset')!s:.40} (published {dataset})")
        if _text(spec.get("arch")) != setup.arch:
            out.append(f"{role} arch {spec.get('arch')!s:.40} (published {setup.arch})")
        if setup.loss is not None and _text(spec.get("loss", setup.loss)) != setup.loss:
            out.append(f"{role} loss {spec.get('loss')!s:.20} (published {setup.loss})")
        if _int(spec.get("embedding_dim")) != setup.embedding_dim:
            out.append(
                f"{role} embedding {spec.get('embedding_dim')!s:.20}-d "
                f"(published {setup.embedding_dim}-d)"
            )
        if spec.get("max_per_class") is not None:
            out.append(f"{role} model on part of each class (published: every training image)")
    old = _full(_classes(_dict(config, "old").get("classes")), dataset)
    if old != setup.old_classes:
        out.append(f"old on {_range_text(old)} (published {_range_text(setup.old_classes)})")
    new = _full(_classes(_dict(config, "new").get("classes")), dataset)
    if new != (0, setup.n_classes):
        out.append(f"new on {_range_text(new)} (published all {setup.n_classes})")
    return out


def deviations(setup: Setup, row: Published, config: dict[str, Any]) -> list[str]:
    """Named differences that do not hide ``row`` but must be said beside it: the
    side-information model and its training data (side-info rows) and how h was fitted
    (rows of methods with a transformation). Each reads ``published: ...; ours: ...``."""
    out = []
    side = setup.side
    if row.side_info and side is not None:
        spec = _dict(config, "side")
        data = dataset_key(str(spec.get("dataset", "")))
        classes = _classes(spec.get("classes"))
        if not spec:
            out.append(f"published: side-info from {side.text}; ours: no side-info model")
        elif (data, _full(classes, data)) != (side.dataset, side.classes):
            out.append(
                f"published: side-info from {side.text}; "
                f"ours: from {spec.get('dataset')!s:.40} {_range_text(classes)}"
            )
        model = (_text(spec.get("arch")), _int(spec.get("embedding_dim")), _text(spec.get("loss")))
        if spec and model != (side.arch, side.embedding_dim, side.loss):
            out.append(
                f"published: side-info model {side.arch}-{side.embedding_dim} {side.loss}; "
                f"ours: {model[0] or '?'}-{model[1] or '?'} {model[2] or '?'}"
            )
    if setup.h_features is not None and row.method in TRANSFORMS:
        h = _dict(config, "transformation")
        # Records written before h could be fitted online have no "features": they were
        # fitted on cached embeddings of one view.
        features = _text(h.get("features")) or "cached"
        if features != setup.h_features:
            views = _int(h.get("views")) or 1
            ours = (
                f"on cached embeddings of {views} view{'s' * (views != 1)} per training image"
                if features == "cached"
                else f"with features {features:.20}"
            )
            out.append(
                "published: h fitted on features of freshly augmented images every step; "
                f"ours: {ours}"
            )
    return out


def identity(
    base: str, method: str, settings: dict[str, Any], config: dict[str, Any]
) -> tuple[str, bool] | None:
    """The published (method, side-info) a record of ours stands for, or None.

    By the registered method ``base``. A suite variant (run name ``method`` other than its
    base) is a different method, except BCT, whose settings decide: the scenario protocol's
    BCT form (:data:`BCT_FORMS`) is that protocol's published "bct", any other form nothing.
    """
    if base not in PUBLISHED_METHOD:
        return None
    if base == "bct":
        form = BCT_FORMS.get(protocol(config))
        if form is None:
            return None
        paper = protocol(config) == DEFAULT_PROTOCOL  # absent settings are the paper's
        for key, want in form.items():
            if key in settings:
                if settings[key] != want:
                    return None
            elif not paper:
                return None
    elif method != base:
        return None
    return PUBLISHED_METHOD[base]


def _candidates(dataset: str, config: dict[str, Any]) -> list[Published]:
    """The rows about ``dataset`` whose source's setup matches ``config``."""
    key = dataset_key(dataset)
    return [
        p
        for p in load_published()
        if p.dataset == key and p.setup is not None and not mismatches(p.setup, key, config)
    ]


def applies(config: dict[str, Any]) -> bool:
    """True when some published row's setup matches the scenario (evaluation dataset first)."""
    return bool(_candidates(str(_dict(config, "eval").get("dataset", "")), config))


def matched_setups(config: dict[str, Any]) -> list[str]:
    """``SOURCE: setup`` for every source whose setup matches the scenario."""
    dataset = str(_dict(config, "eval").get("dataset", ""))
    found = {(p.family, p.setup.text) for p in _candidates(dataset, config) if p.setup}
    return [f"{family}: {text}" for family, text in sorted(found)]


def unmatched(config: dict[str, Any]) -> list[str]:
    """Why no row about the scenario's dataset matches: ``SOURCE: difference, ...`` per source
    of the scenario's protocol, or per source when none has it (empty when one matches or
    nothing was published for the dataset)."""
    key = dataset_key(str(_dict(config, "eval").get("dataset", "")))
    if applies(config):
        return []
    setups = {p.family: SETUPS.get((p.family, key)) for p in load_published() if p.dataset == key}
    same = {f: s for f, s in setups.items() if s is not None and s.protocol == protocol(config)}
    out = []
    for family, setup in sorted((same or setups).items()):
        why = mismatches(setup, key, config) if setup else ["no declared setup"]
        out.append(f"{family}: {', '.join(why)}")
    return out


def _order(matches: list[Published]) -> list[Published]:
    # Most recent year first; a row without a year counts as oldest; file order breaks ties.
    return sorted(matches, key=lambda p: -(p.year or 0))


def lookup(config: dict[str, Any], case: str, who: tuple[str, bool] | None) -> Match | None:
    """The published row for ``case`` and published method ``who`` (from :func:`identity`)
    beside a scenario with ``config``; None when none matches."""
    if who is None:
        return None
    dataset = str(_dict(config, "eval").get("dataset", ""))
    rows = [
        p for p in _candidates(dataset, config) if (p.case, p.method, p.side_info) == (case, *who)
    ]
    if not rows:
        return None
    first, *older = _order(rows)
    return Match(first, tuple(older), tuple(deviations(first.setup, first, config)))


def lookup_auc(config: dict[str, Any], order: str, who: tuple[str, bool] | None) -> Match | None:
    """The published backfilling AUC for our curve of ``order``: a row of case
    ``backfill-auc ORDER``, or of case ``backfill-auc`` when ``order`` is the one the published
    method backfills by (FastFill: uncertainty; others: random)."""
    match = lookup(config, f"backfill-auc {order}", who)
    if match is None and who is not None and order == OWN_ORDER.get(who[0], DEFAULT_ORDER):
        match = lookup(config, "backfill-auc", who)
    return match
