"""Suites and scenarios: suite TOML files (fct/suites/, $FCT_SUITES, a path) turned into frozen, validated dataclasses.

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
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fct.errors import FCTError
from fct.hashing import _plain, config_hash  # noqa: F401  (config_hash: re-exported)
from fct.registry import did_you_mean
from fct.stored_spec import EmbeddingsSpec, stored_embeddings
from fct.suite_checks import (  # noqa: F401  (parse_set: re-exported)
    ARCH_ARGS,
    NAME_MAX,
    _check_arch_keys,
    _check_keys,
    _check_types,
    _string_list,
    _table,
    _validate_scenario,
    apply_set_paths,
    check_name,
    check_sequence_entry,
    parse_set,  # noqa: F401  (ARCH_ARGS, NAME_MAX: re-exported)
    resolve_weights,
    weights_identity,
)
from fct.suite_files import SUITES_DIR, list_suites, suite_folders, suite_path  # noqa: F401

KINDS = (
    "class-subset",
    "cross-dataset",
    "cross-loss",
    "cross-architecture",
    "cross-dimension",
    "sequence",
)


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
    # Trained weights instead of training: an absolute .safetensors path (the suite file's
    # relative path, resolved on load) or "timm:TAG". Hashed as the file's sha256 and only
    # when set, so specs without it keep their hashes.
    weights: str | None = field(
        default=None, metadata={"hash_when_set": True, "plain": weights_identity}
    )

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
    """The evaluation data: by default one split used whole as queries and gallery,
    leave-one-out; or a query set apart from the gallery: another split (``query_split``,
    the gallery ``gallery_split`` or else ``split``), or a seeded, per-class share of the
    split's items (``query_fraction``). See docs/suites.md."""

    dataset: str = "fashion_mnist"
    split: str = "test"
    classes: tuple[int, int] | None = None
    max_per_class: int | None = None
    distance: str = "l2"
    backend: str = "torch"
    curves: bool = True  # backfilling curves: 22 cross evaluations per ordering and method
    query_split: str | None = None  # the queries' split, apart from the gallery's
    gallery_split: str | None = None  # the gallery's split with query_split (default: split)
    query_fraction: float | None = None  # a share of the split's items made queries
    # Ranking metrics beside the default ones (fct.metrics.RANKING_METRICS): "recall@1",
    # "recall@10", "recall@100", "mrr@10".
    metrics: tuple[str, ...] | None = None

    #: Keys that enter ``as_dict`` (and so the config hash) only when set, so scenarios
    #: written before they existed keep their hashes.
    OPTIONAL = ("query_split", "gallery_split", "query_fraction", "metrics")

    @property
    def separate(self) -> bool:
        """Whether the queries are a set apart from the gallery (else leave-one-out)."""
        return self.query_split is not None or self.query_fraction is not None

    @property
    def gallery_data(self) -> str:
        """The split the gallery (and, leave-one-out, the queries) comes from."""
        return self.gallery_split or self.split

    @property
    def query_data(self) -> str:
        """The split the queries come from."""
        return self.query_split or self.gallery_data

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the optional keys only when set)."""
        out = _plain(self)
        for key in self.OPTIONAL:
            if out[key] is None:
                del out[key]
        return out


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
    #: A sequence scenario's model generations, oldest first (three or more; fct.sequence);
    #: ``old`` is then the first and ``new`` the last. Empty for an old/new pair.
    models: tuple[ModelSpec, ...] = ()
    embeddings: EmbeddingsSpec | None = None  # stored embeddings instead of images

    @property
    def is_sequence(self) -> bool:
        """True for a sequence of model updates (kind ``sequence``), False for a pair."""
        return bool(self.models)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the scenario (stored in every run record); each method's
        settings are in its own record's ``method_config``, not here. A pair has no
        ``models`` key, an image scenario no ``embeddings`` key (so the hashes of the
        scenarios written before them are what they always were)."""
        out = _plain(dataclasses.replace(self, embeddings=None))
        del out["method_specs"]
        del out["embeddings"]
        out["eval"] = self.eval.as_dict()  # its optional keys only when set
        if not self.models:
            del out["models"]
        if self.embeddings is not None:
            out["embeddings"] = self.embeddings.as_dict()
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
        if pattern is None:
            return list(self.scenarios)
        pats = [p.strip() for p in pattern.split(",") if p.strip()]
        if not pats:
            raise FCTError(f"--scenarios names no scenario ({pattern!r}); see `fct list scenarios`")
        chosen = [s for s in self.scenarios if any(fnmatch.fnmatchcase(s.name, p) for p in pats)]
        if not chosen:
            names = [s.name for s in self.scenarios]
            raise FCTError(
                f"no scenario of suite '{self.name}' matches '{pattern}'"
                f"{did_you_mean(pats[0], names)}; see `fct list scenarios`"
            )
        return chosen


# --- loading and validation -------------------------------------------------------------------

_SECTIONS = {"suite", "defaults", "scenario", "methods"}
_SUITE_KEYS = {"name", "description", "methods"}
_DEFAULT_KEYS = {"model", "old", "new", "side", "transformation", "eval", "methods", "paper"}
_SCENARIO_KEYS = _DEFAULT_KEYS | {
    "name",
    "kinds",
    "description",
    "side_info",
    "settings",
    "models",
    "embeddings",
}


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
        elif key == "metrics":
            value = tuple(_string_list(value, "metrics", where))
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


def _merge(*tables: dict | None) -> dict:
    out: dict = {}
    for t in tables:
        if t:
            out.update(t)
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
    are ``--set`` overrides (see parse_set): method settings, and keys of the file."""
    overrides = overrides or {}
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FCTError(f"{path}: TOML error: {e}; fix the file") from e
    apply_set_paths(doc, overrides, str(path))
    overrides = {k: v for k, v in overrides.items() if not isinstance(k, tuple)}
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
    kinds = _string_list(entry.get("kinds", []), "kinds", where)
    for k in kinds:
        if k not in KINDS:
            raise FCTError(
                f"{where}: unknown kind '{k}'{did_you_mean(k, KINDS)}; choose from {', '.join(KINDS)}"
            )
    specs = {}
    for role in ("old", "new", "side"):
        merged = _merge(
            defaults.get("model"), defaults.get(role), entry.get("model"), entry.get(role)
        )
        if role == "side" and "loss" not in _merge(defaults.get("side"), entry.get("side")):
            merged["loss"] = "simclr"  # side-information is self-supervised unless told otherwise
        if merged.get("weights") is not None:
            merged["weights"] = resolve_weights(merged["weights"], path, f"{where} [{role}]")
        specs[role] = _build(ModelSpec, merged, f"{where} [{role}]")
    generations = _generations(entry, defaults, kinds, where)
    if generations:  # a sequence: old is the first generation, new the last
        specs["old"], specs["new"] = generations[0], generations[-1]
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
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise FCTError(f"{where}: description must be a string")
    paper = entry.get("paper", defaults.get("paper", False))
    if not isinstance(paper, bool):
        raise FCTError(f"{where}: paper must be true or false, got {paper!r}")
    per_scenario = entry.get("settings", {})
    names = set(methods) | set(tables) | set(per_scenario) | set(overrides)
    stored = None
    if "embeddings" in entry:
        stored, specs = stored_embeddings(entry["embeddings"], path, specs, where)
        use_side = specs["side"] is not None
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
        models=generations,
        embeddings=stored,
    )
    _validate_scenario(sc, where)
    return sc


def _generations(
    entry: dict, defaults: dict, kinds: tuple[str, ...], where: str
) -> tuple[ModelSpec, ...]:
    """A sequence scenario's model generations: each ``models`` entry merged over
    ``defaults.model`` and the scenario's ``model`` table (empty for a pair scenario)."""
    check_sequence_entry(entry, kinds, where)
    return tuple(
        _build(
            ModelSpec,
            _merge(defaults.get("model"), entry.get("model"), generation),
            f"{where} models[{k}]",
        )
        for k, generation in enumerate(entry.get("models", []))
    )


SUITE_MAX_BYTES = 4 << 20


def load_suite(
    name: str,
    suites_dir: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Suite:
    """Load and validate a suite by name (see suite_folders) or by path to a .toml file;
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
