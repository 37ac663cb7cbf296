"""Suites and scenarios: TOML files under suites/ turned into frozen, validated dataclasses.

A suite file has a ``[suite]`` table (name, description, methods), optional ``[defaults]``
tables, and ``[[scenario]]`` entries. Specs are merged in this order, later wins::

    defaults.model -> defaults.<role> -> scenario.model -> scenario.<role>

for the roles ``old``, ``new`` and ``side`` (model specs), then ``defaults.transformation``
-> ``scenario.transformation`` and ``defaults.eval`` -> ``scenario.eval``.

Method settings: top-level ``[methods.NAME]`` tables (suite-wide; ``base = "bct"`` makes NAME
a variant of a registered method), then a scenario's ``settings.NAME`` table, then
``fct run --set NAME.KEY=VALUE``. Unknown keys, datasets, losses, methods, settings and timm
architectures are refused on load with a "did you mean" hint; TOML syntax errors name the line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
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
    # What h is fitted on. "cached": old/new/side embeddings of ``views`` views per training
    # image, embedded once and cached (view 0 un-augmented, the others augmented as the new
    # model's training is); "online": the reference's way (ml-fct), every step embeds a freshly
    # augmented batch with the frozen old, new and side models (``views`` is then unused).
    features: str = "cached"
    views: int = 1

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
class MethodSpec:
    """One method as a scenario runs it: its run name, the registered method, its settings."""

    name: str
    base: str
    settings: Any  # an instance of the registered method's Settings dataclass

    def build(self):
        """A fresh Method instance with these settings, running under ``name``."""
        from fct.methods import METHODS

        return METHODS.get(self.base)(self.settings, name=self.name)


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
    methods: tuple[str, ...] = ("independent", "bct", "fct", "fct_side")
    method_specs: tuple[MethodSpec, ...] = ()  # settings of every method the suite names
    kinds: tuple[str, ...] = ()
    description: str = ""
    paper: bool = False  # paper-faithful settings: reports show published numbers beside ours

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the scenario (stored in every run record); each method's
        settings are in its own record's ``method_config``, not here."""
        out = _plain(self)
        del out["method_specs"]
        return out

    def results_key(self) -> dict[str, Any]:
        """What determines a record's results besides its method: the scenario without the
        list of methods, kinds and description (adding a method reruns nothing else)."""
        out = self.as_dict()
        for k in ("methods", "kinds", "description"):
            del out[k]
        return out

    def digest(self) -> str:
        """A hash of everything that determines this scenario's results."""
        return config_hash(self.results_key())

    def method(self, name: str):
        """The Method instance that runs as ``name`` here (a suite variant or a registered
        method with the suite's settings, else with its defaults)."""
        for spec in self.method_specs:
            if spec.name == name:
                return spec.build()
        from fct.methods import METHODS

        return METHODS.get(name)()


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

_SECTIONS = {"suite", "defaults", "scenario", "methods"}
_SUITE_KEYS = {"name", "description", "methods"}
_DEFAULT_KEYS = {"model", "old", "new", "side", "transformation", "eval", "methods", "paper"}
_SCENARIO_KEYS = _DEFAULT_KEYS | {"name", "kinds", "description", "side_info", "settings"}
_MOVED = {"bct": "BCT's settings are set in a [methods.bct] table (or settings.bct per scenario)"}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise FCTError(f"{where} must be a table, got {table!r}; see suites/quickstart.toml")
    for key in table:
        if key in _MOVED and key not in allowed:
            raise FCTError(f"{where}: '{key}' is no longer a key here; {_MOVED[key]}")
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
            if key == "arch_args":
                # Before the value types: a table-valued pretrained_cfg_overlay is refused for
                # what it is (it could load weights), not for being a table.
                _check_arch_keys(value, where)
            for k, v in value.items():
                flat = v if isinstance(v, list) else [v]
                if not all(isinstance(x, bool | int | float | str) for x in flat):
                    raise FCTError(f"{where}: {key}.{k} must be a number, string or list of them")
            value = tuple(
                sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in value.items())
            )
        elif key == "classes" and value is not None:
            if not (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
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


#: timm.create_model arguments a suite may set: shapes and regularisation only. Anything that
#: loads weights (checkpoint_path, pretrained, pretrained_cfg, ...) is refused: models here
#: train from scratch, and a file's content would not be in the cache key.
ARCH_ARGS = frozenset(
    {
        "drop_rate",
        "drop_path_rate",
        "drop_block_rate",
        "channels",
        "layers",
        "stem_width",
        "stem_type",
        "output_stride",
        "width_multiplier",
        "depth_multiplier",
        "channel_multiplier",
        "global_pool",
    }
)
EMBEDDING_DIM_MAX = 1 << 16
IMAGE_SIZE_MAX = 4096
#: timm's pooling names that give one pooled vector per image ('' would return feature maps,
#: which the embedding head cannot take).
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "token", "map")


def _check_arch_keys(args: dict, where: str) -> None:
    """Refuse any timm argument outside ARCH_ARGS (whatever its value)."""
    for key in args:
        if key not in ARCH_ARGS:
            raise FCTError(
                f"{where}: arch_args key '{key}' is not allowed{did_you_mean(key, ARCH_ARGS)}; "
                f"a suite may set {', '.join(sorted(ARCH_ARGS))} (models train from scratch; "
                "no weights are loaded)"
            )


def _check_arch_value(key: str, value: Any, where: str) -> None:
    """Refuse an allowed timm argument whose value timm would reject only when the model is
    built, mid-run and with a traceback (a string rate, a negative width, a bad stride)."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    def size(v: Any, high: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= high

    if key in ("drop_rate", "drop_path_rate", "drop_block_rate"):
        ok, want = number(value) and 0 <= value < 1, "a number in [0, 1)"
    elif key in ("channels", "layers"):  # per stage: widths, or numbers of blocks
        high = 1 << 16 if key == "channels" else 1000
        ok = isinstance(value, tuple) and 0 < len(value) <= 16
        ok = ok and all(size(x, high) for x in value)
        want = f"a list of 1-16 integers in [1, {high}]"
    elif key == "stem_width":
        ok, want = size(value, 1 << 16), f"an integer in [1, {1 << 16}]"
    elif key == "output_stride":
        ok, want = value in (8, 16, 32) and not isinstance(value, bool), "8, 16 or 32"
    elif key in ("width_multiplier", "depth_multiplier", "channel_multiplier"):
        ok, want = number(value) and 0 < value <= 64, "a number in (0, 64]"
    elif key == "global_pool":
        ok, want = value in GLOBAL_POOLS, f"one of {', '.join(GLOBAL_POOLS)}"
    else:  # stem_type: each timm family has its own names ('deep', 'patch', ...)
        ok, want = isinstance(value, str) and len(value) <= 64, "a string"
    if not ok:
        raise FCTError(f"{where}: arch_args.{key} must be {want}, got {value!r}")


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
    for key, high in (
        ("epochs", 100_000),
        ("batch_size", 1 << 20),
        ("embedding_dim", EMBEDDING_DIM_MAX),
    ):
        v = getattr(spec, key)
        if not 0 < v <= high:
            raise FCTError(f"{where}: {key} must be an integer in [1, {high}], got {v}")
    if spec.image_size is not None and not (
        isinstance(spec.image_size, int) and 8 <= spec.image_size <= IMAGE_SIZE_MAX
    ):
        raise FCTError(
            f"{where}: image_size must be an integer in [8, {IMAGE_SIZE_MAX}], got {spec.image_size!r}"
        )
    if spec.max_per_class is not None and not (
        isinstance(spec.max_per_class, int)
        and not isinstance(spec.max_per_class, bool)  # true would read as 1 image per class
        and spec.max_per_class > 0
    ):
        raise FCTError(
            f"{where}: max_per_class must be a positive integer, got {spec.max_per_class!r}"
        )
    if spec.small_stem is not None and not isinstance(spec.small_stem, bool):
        raise FCTError(f"{where}: small_stem must be true or false")
    if not 0 < spec.lr < math.inf:
        raise FCTError(f"{where}: lr must be a positive number, got {spec.lr}")
    for key in ("momentum", "weight_decay"):
        v = getattr(spec, key)
        if not 0 <= v < 1:
            raise FCTError(f"{where}: {key} must be in [0, 1), got {v}")
    if not 0 <= spec.warmup_epochs <= spec.epochs:
        raise FCTError(f"{where}: warmup_epochs must be in [0, epochs], got {spec.warmup_epochs}")
    if spec.embed_act not in ("none", "relu"):
        raise FCTError(f"{where}: embed_act must be 'none' or 'relu', got {spec.embed_act!r}")
    from fct.data.loader import AUGMENTS

    if spec.augment not in AUGMENTS:
        raise FCTError(
            f"{where}: augment must be one of {', '.join(AUGMENTS)}, got {spec.augment!r}"
        )
    _check_arch_keys(dict(spec.arch_args), where)
    for key, value in spec.arch_args:
        _check_arch_value(key, value, where)
    try:
        if spec.loss == "simclr":
            from fct.losses import _check_positive

            for key, value in spec.loss_args:
                if key != "temperature":
                    raise FCTError(
                        f"loss 'simclr' got unknown argument {key}; allowed: temperature"
                    )
                _check_positive("temperature", value)
        else:
            # The registered factory, not make_loss(name, **args): an argument called 'name'
            # would collide with make_loss's own parameter (a TypeError, not a message).
            LOSSES.get(spec.loss)(**dict(spec.loss_args))
    except FCTError as e:
        raise FCTError(f"{where} loss_args: {e}") from e
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


#: Names of suites, scenarios and methods become folder and file names: a safe slug only.
NAME_MAX = 100
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


#: Endings a name may not have, as they are the runner's own: the record of method 'fct' at
#: seed 1 is ``fct.seed1.json``, which a method named 'fct.seed1' would share at seed 0; and
#: ``fct report`` reads every ``*.json`` under runs/, so a scenario folder 'x.json' would be
#: taken for a record. Case-insensitive, as some file systems are.
_RESERVED_ENDING = re.compile(r"\.(json|seed[0-9]+)$", re.IGNORECASE)


def check_name(value: Any, what: str, where: str) -> str:
    """``value`` if it is a safe name (letters, digits, ``-``, ``_``, ``.``; not starting with
    a dot; not ending in ``.json`` or ``.seedN``; at most NAME_MAX characters), else
    FCTError: names become folder and file names under --out."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > NAME_MAX
        or not set(value) <= _NAME_CHARS
        or value.startswith(".")
    ):
        shown = (
            repr(value)
            if not isinstance(value, str) or len(value) <= 60
            else repr(value[:60]) + "..."
        )
        raise FCTError(
            f"{where}: {what} name {shown} is not allowed; use 1-{NAME_MAX} letters, digits, "
            "'-', '_' or '.', not starting with '.'"
        )
    if _RESERVED_ENDING.search(value):
        raise FCTError(
            f"{where}: {what} name {value!r} is not allowed: names ending in '.json' or "
            "'.seedN' would clash with run record files; rename it"
        )
    return value


def _string_list(value: Any, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FCTError(
            f'{where}: {what} must be a list of names such as ["fct", "bct"], got {value!r}'
        )
    return tuple(value)


def _table(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise FCTError(f"{where}: '{key}' must be a table ({key} = {{ ... }}), got {value!r}")
    return value


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--set NAME.KEY=VALUE`` overrides as {method: {key: value}}; VALUE is read as TOML
    (``0.5``, ``true``, ``"mean"``; a bare word is taken as a string)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, raw = item.partition("=")
        method, dot, key = head.strip().partition(".")
        if not eq or not dot or not method or not key:
            raise FCTError(f"--set takes METHOD.SETTING=VALUE, e.g. bct.weight=0.5; got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(method, {})[key] = value
    return out


def _method_specs(
    names: set[str],
    tables: dict[str, dict],
    per_scenario: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    where: str,
) -> tuple[MethodSpec, ...]:
    """Settings of every method in ``names``: suite table, then scenario table, then --set."""
    from fct.methods import METHODS, make_settings

    specs = []
    for name in sorted(names):
        table = dict(tables.get(name, {}))
        base = table.pop("base", name)
        if not isinstance(base, str) or base not in METHODS:
            shown = base if isinstance(base, str) else repr(base)
            raise FCTError(
                f"{where}: unknown method '{shown}'{did_you_mean(str(shown), METHODS.names())}; "
                "see `fct list methods` (plugins: --plugin MODULE; a variant: "
                f'[methods.{name}] base = "bct")'
            )
        if base != name and name in METHODS:
            raise FCTError(
                f"{where} [methods.{name}]: '{name}' is a registered method; "
                "give the variant another name"
            )
        scenario_table = per_scenario.get(name, {})
        if not isinstance(scenario_table, dict):
            raise FCTError(f"{where}: settings.{name} must be a table, got {scenario_table!r}")
        merged = {**table, **scenario_table, **overrides.get(name, {})}
        try:
            settings = make_settings(METHODS.get(base).Settings, merged)
        except FCTError as e:
            raise FCTError(f"{where} [methods.{name}]: {e}") from e
        specs.append(MethodSpec(name, base, settings))
    return tuple(specs)


def parse_suite(
    text: str, name: str, path: Path, overrides: dict[str, dict[str, Any]] | None = None
) -> Suite:
    """Parse and validate suite TOML ``text``; ``path`` is used in messages; ``overrides``
    are ``--set`` method settings (see parse_set)."""
    overrides = overrides or {}
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FCTError(f"{path}: TOML error: {e}; fix the file") from e
    _check_keys(doc, _SECTIONS, str(path))
    head = _table(doc, "suite", str(path))
    _check_keys(head, _SUITE_KEYS, f"{path} [suite]")
    defaults = _table(doc, "defaults", str(path))
    _check_keys(defaults, _DEFAULT_KEYS, f"{path} [defaults]")
    for key in _DEFAULT_KEYS - {"methods", "paper"}:
        _table(defaults, key, f"{path} [defaults]")
    tables = _table(doc, "methods", str(path))
    for mname, table in tables.items():
        check_name(mname, "method", f"{path} [methods]")
        if not isinstance(table, dict):
            raise FCTError(f"{path}: [methods.{mname}] must be a table of settings, got {table!r}")
    for mname in overrides:
        if mname not in tables:
            from fct.methods import METHODS

            if mname not in METHODS:
                raise FCTError(
                    f"--set {mname}.…: unknown method '{mname}'"
                    f"{did_you_mean(mname, list(METHODS.names()) + list(tables))}"
                )
    entries = doc.get("scenario", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise FCTError(f"{path}: scenarios are [[scenario]] tables, got scenario = {entries!r}")
    if not entries:
        raise FCTError(f"{path}: no [[scenario]] entries; add at least one")
    suite_name = check_name(head.get("name", name), "suite", f"{path} [suite]")
    description = head.get("description", "")
    if not isinstance(description, str):
        raise FCTError(f"{path} [suite]: description must be a string")
    default_methods = _string_list(
        defaults.get("methods", head.get("methods", ["independent", "bct", "fct", "fct_side"])),
        "methods",
        f"{path} [suite]",
    )
    scenarios = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(entries):
        sc = _parse_scenario(
            entry, i, path, suite_name, defaults, default_methods, tables, overrides
        )
        folded = sc.name.lower()  # a case-insensitive file system would merge these folders
        if seen.get(folded) == sc.name:
            raise FCTError(
                f"{path} scenario '{sc.name}': duplicate scenario name; names must be unique in a suite"
            )
        if folded in seen:
            raise FCTError(
                f"{path} scenario '{sc.name}': the name clashes with '{seen[folded]}' "
                "(names must differ in more than letter case: they become folder names)"
            )
        seen[folded] = sc.name
        scenarios.append(sc)
    return Suite(suite_name, path, description, tuple(scenarios))


def _parse_scenario(
    entry: dict,
    i: int,
    path: Path,
    suite_name: str,
    defaults: dict,
    default_methods: tuple[str, ...],
    tables: dict[str, dict],
    overrides: dict[str, dict[str, Any]],
) -> Scenario:
    where = f"{path} scenario #{i + 1}"
    _check_keys(entry, _SCENARIO_KEYS, where)
    sname = entry.get("name")
    if sname is None:
        raise FCTError(f'{where}: every scenario needs a name = "..."')
    sname = check_name(sname, "scenario", where)
    where = f"{path} scenario '{sname}'"
    for key in ("model", "old", "new", "side", "transformation", "eval", "settings"):
        _table(entry, key, where)
    specs = {}
    for role in ("old", "new", "side"):
        merged = _merge(
            defaults.get("model"), defaults.get(role), entry.get("model"), entry.get(role)
        )
        if role == "side" and "loss" not in _merge(defaults.get("side"), entry.get("side")):
            merged["loss"] = "simclr"  # side-information is self-supervised unless told otherwise
        specs[role] = _build(ModelSpec, merged, f"{where} [{role}]")
    use_side = entry.get("side_info", True)
    if not isinstance(use_side, bool):
        raise FCTError(f"{where}: side_info must be true or false, got {use_side!r}")
    side_table = _merge(defaults.get("side"), entry.get("side"))
    if use_side and "classes" not in side_table and "dataset" not in side_table:
        # Side-information is trained on the old training data unless told otherwise.
        specs["side"] = dataclasses.replace(
            specs["side"],
            classes=specs["old"].classes,
            dataset=specs["old"].dataset,
            max_per_class=specs["old"].max_per_class,
        )
    methods = _string_list(entry.get("methods", list(default_methods)), "methods", where)
    for m in methods:
        check_name(m, "method", where)
    if len(set(methods)) != len(methods):
        raise FCTError(f"{where}: methods lists a method twice: {list(methods)}")
    folded: dict[str, str] = {}
    for m in methods:  # their records are files in one folder: see the scenario name check
        if m.lower() in folded:
            raise FCTError(
                f"{where}: methods '{folded[m.lower()]}' and '{m}' differ only in letter case; "
                "their record files would be one file on some file systems, rename one"
            )
        folded[m.lower()] = m
    kinds = _string_list(entry.get("kinds", []), "kinds", where)
    for k in kinds:
        if k not in KINDS:
            raise FCTError(
                f"{where}: unknown kind '{k}'{did_you_mean(k, KINDS)}; choose from {', '.join(KINDS)}"
            )
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise FCTError(f"{where}: description must be a string")
    paper = entry.get("paper", defaults.get("paper", False))
    if not isinstance(paper, bool):
        raise FCTError(f"{where}: paper must be true or false, got {paper!r}")
    per_scenario = entry.get("settings", {})
    names = set(methods) | set(tables) | set(per_scenario) | set(overrides)
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
        eval=_build(EvalSpec, _merge(defaults.get("eval"), entry.get("eval")), f"{where} [eval]"),
        methods=methods,
        method_specs=_method_specs(names, tables, per_scenario, overrides, where),
        kinds=kinds,
        description=description,
        paper=paper,
    )
    _validate_scenario(sc, where)
    return sc


def _validate_scenario(sc: Scenario, where: str) -> None:
    _validate_model(sc.old, f"{where} [old]", side=False)
    _validate_model(sc.new, f"{where} [new]", side=False)
    if sc.side is not None:
        _validate_model(sc.side, f"{where} [side]", side=True)
    if sc.eval.distance not in ("l2", "cosine"):
        raise FCTError(f"{where} [eval]: distance must be l2 or cosine, got {sc.eval.distance!r}")
    if sc.eval.backend not in ("torch", "faiss"):
        raise FCTError(f"{where} [eval]: backend must be torch or faiss, got {sc.eval.backend!r}")
    if sc.eval.max_per_class is not None and not (
        isinstance(sc.eval.max_per_class, int)
        and not isinstance(sc.eval.max_per_class, bool)
        and sc.eval.max_per_class > 0
    ):
        raise FCTError(f"{where} [eval]: max_per_class must be a positive integer")
    _validate_transformation(sc.transformation, f"{where} [transformation]")
    if "fct_side" in sc.methods and sc.side is None:
        raise FCTError(
            f"{where}: method fct_side needs side-information; remove side_info = false or the method"
        )


def _validate_transformation(t: TransformationSpec, where: str) -> None:
    if t.train_on not in ("new", "old"):
        raise FCTError(f"{where}: train_on must be 'new' or 'old', got {t.train_on!r}")
    for key, low, high in (
        ("hidden", 1, 1 << 16),
        ("epochs", 1, 100_000),
        ("batch_size", 1, 1 << 24),
        ("views", 1, 64),
    ):
        v = getattr(t, key)
        if not low <= v <= high:
            raise FCTError(f"{where}: {key} must be an integer in [{low}, {high}], got {v}")
    if not 0 < t.lr < math.inf:
        raise FCTError(f"{where}: lr must be a positive number, got {t.lr}")
    if not (0 <= t.weight_decay < 1):
        raise FCTError(f"{where}: weight_decay must be in [0, 1), got {t.weight_decay}")
    if not (0 <= t.warmup_epochs <= t.epochs):
        raise FCTError(f"{where}: warmup_epochs must be in [0, epochs], got {t.warmup_epochs}")
    if not (0 <= t.freeze_bn_fraction <= 1):
        raise FCTError(f"{where}: freeze_bn_fraction must be in [0, 1], got {t.freeze_bn_fraction}")
    if t.features not in ("cached", "online"):
        raise FCTError(
            f"{where}: features must be 'cached' (embeddings of `views` views per image) or "
            f"'online' (recomputed from augmented images every step), got {t.features!r}"
        )


def suite_path(name: str, suites_dir: Path | None = None) -> Path:
    """The file of suite ``name``: a path to a .toml, or suites/NAME.toml."""
    p = Path(name)
    if p.suffix == ".toml":
        if not p.exists() and not p.is_symlink():
            raise FCTError(f"suite file {p} does not exist; check the path")
        return p  # not a regular file: load_suite's bounded read names the problem
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


SUITE_MAX_BYTES = 4 << 20


def load_suite(
    name: str,
    suites_dir: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Suite:
    """Load and validate a suite by name (suites/NAME.toml) or by path to a .toml file;
    ``overrides``: ``--set`` method settings (see parse_set)."""
    from fct.io import read_regular_bytes

    path = suite_path(name, suites_dir)
    data = read_regular_bytes(
        path, SUITE_MAX_BYTES, "suite file", "pass a TOML suite file (at most 4 MB)"
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FCTError(f"{path}: a suite file must be UTF-8 text; fix the file") from e
    return parse_suite(text, path.stem, path, overrides)


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
