"""Suites and scenarios: TOML files under suites/ turned into frozen, validated dataclasses.

A suite file has a ``[suite]`` table (name, description, methods), optional ``[defaults]``
tables, and ``[[scenario]]`` entries. Specs are merged in this order, later wins::

    defaults.model -> defaults.<role> -> scenario.model -> scenario.<role>

for the roles ``old``, ``new`` and ``side`` (model specs), then ``defaults.transformation``
-> ``scenario.transformation``, ``defaults.eval`` -> ``scenario.eval`` and
``defaults.bct`` -> ``scenario.bct``. Unknown keys, datasets, losses, methods and timm
architectures are refused on load with a "did you mean" hint; TOML syntax errors name the line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.registry import did_you_mean

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
KINDS = ("class-subset", "cross-dataset", "cross-loss", "cross-architecture", "cross-dimension")


@dataclass(frozen=True)
class ModelSpec:
    """How one embedding model (old, new or side-information) is built and trained."""

    dataset: str = "fashion_mnist"
    classes: tuple[int, int] | None = None  # half-open numeric label range; None = all
    max_per_class: int | None = None  # training items kept per class (first in index order)
    arch: str = "resnet18"
    arch_args: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model keyword arguments
    small_stem: bool | None = None  # CIFAR-style stride-1 stem; None = when image_size <= 64
    image_size: int | None = None  # None = the dataset's native size
    embedding_dim: int = 128
    embed_act: str = "none"  # "relu": post-ReLU embedding as in the FCT reference ResNet
    loss: str = "ce"  # a fct.losses.LOSSES name, or "simclr" for side-information
    loss_args: tuple[tuple[str, Any], ...] = ()
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    augment: str = "supervised"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples of pairs become dicts)."""
        return _plain(self)


@dataclass(frozen=True)
class TransformationSpec:
    """Training of FCT's transformation h on cached training-set embeddings."""

    hidden: int = 2048
    epochs: int = 80
    batch_size: int = 1024
    lr: float = 5e-4
    weight_decay: float = 3.0517578125e-5
    warmup_epochs: float = 5.0
    freeze_bn_fraction: float = 0.5  # BatchNorm statistics frozen for the last half
    train_on: str = "new"  # which training split h is fitted on: "new" (all) or "old"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return _plain(self)


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation split: used whole as queries and gallery, leave-one-out."""

    dataset: str = "fashion_mnist"
    split: str = "test"
    classes: tuple[int, int] | None = None
    max_per_class: int | None = None
    distance: str = "l2"
    backend: str = "torch"
    curves: bool = True  # backfilling curves: 22 cross evaluations per ordering and method

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return _plain(self)


@dataclass(frozen=True)
class BCTSpec:
    """BCT's influence loss: weight and label smoothing of the old-classifier term."""

    weight: float = 1.0
    smoothing: float = 0.0  # Shen et al. use plain softmax cross-entropy for the influence loss
    # Rows for classes the old model never saw: "scaled-mean" = the old-model class mean's
    # direction at the old classifier's mean row norm; "mean" = the raw class mean, whose norm
    # is on the embedding's scale, not the classifier's (it dominates the logits).
    new_rows: str = "scaled-mean"

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return _plain(self)


@dataclass(frozen=True)
class Scenario:
    """One old/new pairing and the methods to run on it."""

    name: str
    suite: str
    old: ModelSpec
    new: ModelSpec
    side: ModelSpec | None
    transformation: TransformationSpec = field(default_factory=TransformationSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    bct: BCTSpec = field(default_factory=BCTSpec)
    methods: tuple[str, ...] = ("independent", "bct", "fct", "fct_side")
    kinds: tuple[str, ...] = ()
    description: str = ""
    paper: bool = False  # paper-faithful settings: reports show published numbers beside ours

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the whole scenario (stored in every run record)."""
        return _plain(self)

    def digest(self) -> str:
        """A hash of everything that determines this scenario's results."""
        return config_hash(self.as_dict())


@dataclass(frozen=True)
class Suite:
    """A named list of scenarios from one TOML file."""

    name: str
    path: Path
    description: str
    scenarios: tuple[Scenario, ...]

    def select(self, pattern: str | None) -> list[Scenario]:
        """Scenarios whose names match the comma-separated wildcards in ``pattern``."""
        if not pattern:
            return list(self.scenarios)
        pats = [p.strip() for p in pattern.split(",") if p.strip()]
        chosen = [s for s in self.scenarios if any(fnmatch.fnmatchcase(s.name, p) for p in pats)]
        if not chosen:
            names = [s.name for s in self.scenarios]
            raise FCTError(
                f"no scenario of suite '{self.name}' matches '{pattern}'"
                f"{did_you_mean(pats[0], names)}; see `fct list scenarios`"
            )
        return chosen


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in fields(obj):
            v = getattr(obj, f.name)
            if f.name in ("arch_args", "loss_args"):
                out[f.name] = {k: _plain(x) for k, x in v}
            else:
                out[f.name] = _plain(v)
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# --- loading and validation -------------------------------------------------------------------

_SECTIONS = {"suite", "defaults", "scenario"}
_SUITE_KEYS = {"name", "description", "methods"}
_DEFAULT_KEYS = {"model", "old", "new", "side", "transformation", "eval", "bct", "methods", "paper"}
_SCENARIO_KEYS = _DEFAULT_KEYS | {"name", "kinds", "description", "side_info"}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise FCTError(
                f"{where}: unknown key '{key}'{did_you_mean(key, allowed)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )


def _build(cls: type, merged: dict, where: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    _check_keys(merged, set(names), where)
    kwargs = {}
    for key, value in merged.items():
        if key in ("arch_args", "loss_args"):
            if not isinstance(value, dict):
                raise FCTError(f"{where}: '{key}' must be a table, e.g. {key} = {{ name = value }}")
            value = tuple(
                sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in value.items())
            )
        elif key == "classes" and value is not None:
            if not (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, int) for v in value)
                and 0 <= value[0] < value[1]
            ):
                raise FCTError(
                    f"{where}: classes must be [first, end) such as [0, 50], got {value!r}"
                )
            value = (value[0], value[1])
        kwargs[key] = value
    try:
        spec = cls(**kwargs)
    except TypeError as e:
        raise FCTError(f"{where}: {e}") from e
    _check_types(spec, where)
    return spec


def _check_types(spec: Any, where: str) -> None:
    for f in fields(spec):
        v = getattr(spec, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool) and not isinstance(v, bool):
            raise FCTError(f"{where}: '{f.name}' must be true or false, got {v!r}")
        if (
            isinstance(default, int)
            and not isinstance(default, bool)
            and not (isinstance(v, int) and not isinstance(v, bool))
        ):
            raise FCTError(f"{where}: '{f.name}' must be an integer, got {v!r}")
        if isinstance(default, float) and not (
            isinstance(v, int | float) and not isinstance(v, bool)
        ):
            raise FCTError(f"{where}: '{f.name}' must be a number, got {v!r}")
        if isinstance(default, str) and not isinstance(v, str):
            raise FCTError(f"{where}: '{f.name}' must be a string, got {v!r}")


def _validate_model(spec: ModelSpec, where: str, side: bool) -> None:
    from fct.data import DATASETS
    from fct.losses import LOSSES
    from fct.models import check_arch

    if spec.dataset not in DATASETS:
        raise FCTError(
            f"{where}: unknown dataset '{spec.dataset}'{did_you_mean(spec.dataset, DATASETS.names())}; see `fct list datasets`"
        )
    losses = set(LOSSES.names()) | {"simclr"}
    if spec.loss not in losses:
        raise FCTError(
            f"{where}: unknown loss '{spec.loss}'{did_you_mean(spec.loss, losses)}; choose one of {', '.join(sorted(losses))}"
        )
    if side and spec.loss != "simclr":
        raise FCTError(f'{where}: side-information is trained without labels; set loss = "simclr"')
    if spec.optimizer not in ("sgd", "adamw", "adam"):
        raise FCTError(
            f"{where}: unknown optimizer '{spec.optimizer}'{did_you_mean(spec.optimizer, ['sgd', 'adamw', 'adam'])}; choose sgd, adamw or adam"
        )
    for key in ("epochs", "batch_size", "embedding_dim"):
        if getattr(spec, key) <= 0:
            raise FCTError(f"{where}: {key} must be positive, got {getattr(spec, key)}")
    if spec.embed_act not in ("none", "relu"):
        raise FCTError(f"{where}: embed_act must be 'none' or 'relu', got {spec.embed_act!r}")
    try:
        check_arch(spec.arch)
    except FCTError as e:  # say which file and scenario, as every other suite error does
        raise FCTError(f"{where}: {e}") from e


def _merge(*tables: dict | None) -> dict:
    out: dict = {}
    for t in tables:
        if t:
            out.update(t)
    return out


def parse_suite(text: str, name: str, path: Path) -> Suite:
    """Parse and validate suite TOML ``text``; ``path`` is used in messages."""
    from fct.methods import METHODS

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FCTError(f"{path}: TOML error: {e}; fix the file") from e
    _check_keys(doc, _SECTIONS, str(path))
    head = doc.get("suite", {})
    _check_keys(head, _SUITE_KEYS, f"{path} [suite]")
    defaults = doc.get("defaults", {})
    _check_keys(defaults, _DEFAULT_KEYS, f"{path} [defaults]")
    entries = doc.get("scenario", [])
    if not entries:
        raise FCTError(f"{path}: no [[scenario]] entries; add at least one")
    suite_name = head.get("name", name)
    default_methods = defaults.get(
        "methods", head.get("methods", ["independent", "bct", "fct", "fct_side"])
    )
    scenarios = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path} scenario #{i + 1}"
        _check_keys(entry, _SCENARIO_KEYS, where)
        sname = entry.get("name")
        if not sname or not isinstance(sname, str):
            raise FCTError(f'{where}: every scenario needs a name = "..."')
        where = f"{path} scenario '{sname}'"
        if sname in seen:
            raise FCTError(f"{where}: duplicate scenario name; names must be unique in a suite")
        seen.add(sname)
        specs = {}
        for role in ("old", "new", "side"):
            merged = _merge(
                defaults.get("model"), defaults.get(role), entry.get("model"), entry.get(role)
            )
            if role == "side" and "loss" not in _merge(defaults.get("side"), entry.get("side")):
                merged["loss"] = (
                    "simclr"  # side-information is self-supervised unless told otherwise
                )
            specs[role] = _build(ModelSpec, merged, f"{where} [{role}]")
        use_side = entry.get("side_info", True)
        side_table = _merge(defaults.get("side"), entry.get("side"))
        if use_side and "classes" not in side_table and "dataset" not in side_table:
            # Side-information is trained on the old training data unless told otherwise.
            specs["side"] = dataclasses.replace(
                specs["side"],
                classes=specs["old"].classes,
                dataset=specs["old"].dataset,
                max_per_class=specs["old"].max_per_class,
            )
        methods = tuple(entry.get("methods", default_methods))
        for m in methods:
            if m not in METHODS:
                raise FCTError(
                    f"{where}: unknown method '{m}'{did_you_mean(m, METHODS.names())}; see `fct list methods` (plugins: --plugin MODULE)"
                )
        kinds = tuple(entry.get("kinds", ()))
        for k in kinds:
            if k not in KINDS:
                raise FCTError(
                    f"{where}: unknown kind '{k}'{did_you_mean(k, KINDS)}; choose from {', '.join(KINDS)}"
                )
        sc = Scenario(
            name=sname,
            suite=suite_name,
            old=specs["old"],
            new=specs["new"],
            side=specs["side"] if use_side else None,
            transformation=_build(
                TransformationSpec,
                _merge(defaults.get("transformation"), entry.get("transformation")),
                f"{where} [transformation]",
            ),
            eval=_build(
                EvalSpec, _merge(defaults.get("eval"), entry.get("eval")), f"{where} [eval]"
            ),
            bct=_build(BCTSpec, _merge(defaults.get("bct"), entry.get("bct")), f"{where} [bct]"),
            methods=methods,
            kinds=kinds,
            description=entry.get("description", ""),
            paper=bool(entry.get("paper", defaults.get("paper", False))),
        )
        _validate_scenario(sc, where)
        scenarios.append(sc)
    return Suite(suite_name, path, head.get("description", ""), tuple(scenarios))


def _validate_scenario(sc: Scenario, where: str) -> None:
    _validate_model(sc.old, f"{where} [old]", side=False)
    _validate_model(sc.new, f"{where} [new]", side=False)
    if sc.side is not None:
        _validate_model(sc.side, f"{where} [side]", side=True)
    if sc.eval.distance not in ("l2", "cosine"):
        raise FCTError(f"{where} [eval]: distance must be l2 or cosine, got {sc.eval.distance!r}")
    if sc.eval.backend not in ("torch", "faiss"):
        raise FCTError(f"{where} [eval]: backend must be torch or faiss, got {sc.eval.backend!r}")
    if sc.bct.new_rows not in ("scaled-mean", "mean"):
        raise FCTError(
            f"{where} [bct]: new_rows must be 'scaled-mean' or 'mean', got {sc.bct.new_rows!r}"
        )
    if sc.transformation.train_on not in ("new", "old"):
        raise FCTError(f"{where} [transformation]: train_on must be 'new' or 'old'")
    if "fct_side" in sc.methods and sc.side is None:
        raise FCTError(
            f"{where}: method fct_side needs side-information; remove side_info = false or the method"
        )


def suite_path(name: str, suites_dir: Path | None = None) -> Path:
    """The file of suite ``name``: a path to a .toml, or suites/NAME.toml."""
    p = Path(name)
    if p.suffix == ".toml":
        if not p.is_file():
            raise FCTError(f"suite file {p} does not exist")
        return p
    folder = suites_dir or Path(os.environ.get("FCT_SUITES", SUITES_DIR))
    path = folder / f"{name}.toml"
    if not path.is_file():
        raise FCTError(
            f"unknown suite '{name}'{did_you_mean(name, list_suites(folder))}; see `fct list suites`"
        )
    return path


def list_suites(folder: Path | None = None) -> list[str]:
    """Names of the suites in the suites folder."""
    folder = folder or Path(os.environ.get("FCT_SUITES", SUITES_DIR))
    return sorted(p.stem for p in folder.glob("*.toml"))


def load_suite(name: str, suites_dir: Path | None = None) -> Suite:
    """Load and validate a suite by name (suites/NAME.toml) or by path to a .toml file."""
    path = suite_path(name, suites_dir)
    return parse_suite(path.read_text(encoding="utf-8"), path.stem, path)


# --- smoke mode -------------------------------------------------------------------------------

SMOKE_CLASSES = 10
SMOKE_PER_CLASS = 4
SMOKE_IMAGE = 32


def _smoke_classes(rng: tuple[int, int] | None, factor: float) -> tuple[int, int]:
    if rng is None:
        return (0, SMOKE_CLASSES)
    lo = int(round(rng[0] * factor))
    return (lo, max(lo + 1, int(round(rng[1] * factor))))


def smoke(sc: Scenario) -> Scenario:
    """Shrink a scenario so its whole wiring runs on a CPU in minutes.

    Class ranges are scaled onto the first 10 classes keeping their proportions (old on the
    first half stays the first half); a range of "all classes" becomes classes 0-9. Every
    split keeps 4 items per class, images are at most 32 px (with the architecture's own stem,
    not the small-image one, to stay cheap), models train 1 epoch and h 2 epochs.
    """
    specs = [sc.old, sc.new, sc.eval] + ([sc.side] if sc.side else [])
    ends = [s.classes[1] for s in specs if s.classes]
    total = max(ends, default=SMOKE_CLASSES)
    if ends and any(s.classes is None for s in (sc.new, sc.eval)):
        total = 2 * total  # "old = first half" is the usual pairing with an all-classes new model
    factor = SMOKE_CLASSES / total

    def model(s: ModelSpec) -> ModelSpec:
        size = min(s.image_size or SMOKE_IMAGE, SMOKE_IMAGE)
        return dataclasses.replace(
            s,
            classes=_smoke_classes(s.classes, factor),
            max_per_class=SMOKE_PER_CLASS,
            image_size=size,
            epochs=1,
            batch_size=min(s.batch_size, 32),
            warmup_epochs=0.0,
            small_stem=False,
        )

    return dataclasses.replace(
        sc,
        old=model(sc.old),
        new=model(sc.new),
        side=model(sc.side) if sc.side else None,
        transformation=dataclasses.replace(
            sc.transformation,
            epochs=2,
            warmup_epochs=0.0,
            batch_size=min(sc.transformation.batch_size, 64),
            hidden=min(sc.transformation.hidden, 256),
        ),
        eval=dataclasses.replace(
            sc.eval, classes=_smoke_classes(sc.eval.classes, factor), max_per_class=SMOKE_PER_CLASS
        ),
    )


def smoke_suite(suite: Suite) -> Suite:
    """The suite with every scenario shrunk by ``smoke`` (results go to a separate folder)."""
    return dataclasses.replace(
        suite, name=suite.name, scenarios=tuple(smoke(s) for s in suite.scenarios)
    )


def with_global_batch(suite: Suite, batch: int) -> Suite:
    """Every backbone (old, new, side) trained with global batch ``batch``, its learning rate
    scaled by ``batch / batch_size`` (the linear scaling rule of Goyal et al., 2017).

    For multi-GPU runs that want a larger batch than the suite's: the suite's batch sizes are
    global batches already, so leaving them alone gives the same training on any number of
    processes. The transformation h (trained on stored embeddings) keeps its settings.
    """
    if batch < 1:
        raise FCTError(f"--global-batch must be a positive integer, got {batch}")

    def model(s: ModelSpec) -> ModelSpec:
        return dataclasses.replace(s, batch_size=batch, lr=s.lr * batch / s.batch_size)

    scenarios = tuple(
        dataclasses.replace(
            sc, old=model(sc.old), new=model(sc.new), side=model(sc.side) if sc.side else None
        )
        for sc in suite.scenarios
    )
    return dataclasses.replace(suite, scenarios=scenarios)
