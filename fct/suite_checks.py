"""Validation of suite files: safe names, table and list types, model and transformation
ranges, the timm-argument allow-list. fct.scenarios parses; this module checks.

Imports nothing above the ground floor at module level (the data and loss registries are
imported where a model spec is checked), so fct.scenarios can import it freely.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fct.errors import FCTError
from fct.registry import did_you_mean

if TYPE_CHECKING:
    from fct.scenarios import ModelSpec, Scenario, TransformationSpec

_MOVED = {"bct": "BCT's settings are set in a [methods.bct] table (or settings.bct per scenario)"}


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


TIMM_WEIGHTS = "timm:"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from fct.io import sha256_regular

    return sha256_regular(path)[0]


def weights_identity(value: str) -> str:
    """What identifies a model spec's ``weights`` in hashes and records: ``timm:TAG`` as it is,
    a file by its content (``sha256:HEX``), so a record or cache entry follows the weights,
    not where they lie. A file that cannot be read is ``missing:NAME`` (the run's checks then
    refuse it in one line before anything trains)."""
    if value.startswith(TIMM_WEIGHTS):
        return value
    try:
        st = os.stat(value)
        return f"sha256:{_file_sha256(value, st.st_size, st.st_mtime_ns)}"
    except (OSError, ValueError):
        return f"missing:{os.path.basename(value)}"


def resolve_weights(value: Any, suite_file: Path, where: str) -> str:
    """A ``weights`` value checked and made absolute: ``timm:TAG``, or a ``.safetensors`` path
    relative to the suite file's folder (the file itself is checked before anything trains)."""
    if not isinstance(value, str) or not value.strip():
        raise FCTError(f'{where}: weights must be "PATH.safetensors" or "timm:TAG", got {value!r}')
    if value.startswith(TIMM_WEIGHTS):
        if not value[len(TIMM_WEIGHTS) :] or "/" in value:
            raise FCTError(
                f'{where}: weights = "timm:TAG" names a timm pretrained tag of the arch, e.g. "timm:a1_in1k"; got {value!r}'
            )
        return value
    if not value.endswith(".safetensors"):
        raise FCTError(
            f'{where}: weights must be a .safetensors file (or "timm:TAG"), got {value!r}'
        )
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (suite_file.parent / path).resolve())


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


#: The most model generations a sequence scenario may have (every one is trained).
SEQUENCE_MAX = 32


def check_sequence_entry(entry: dict, kinds: tuple[str, ...], where: str) -> None:
    """A ``[[scenario]]`` entry's ``models`` list against its kinds: a list of three or more
    model tables exactly when the scenario is of kind ``sequence``, and then no ``old`` or
    ``new`` table (each generation is a ``models`` entry)."""
    models = entry.get("models")
    if "sequence" not in kinds:
        if models is not None:
            raise FCTError(
                f"{where}: 'models' (a list of model generations) is for sequence scenarios; "
                'add "sequence" to kinds, or use old/new tables for a pair'
            )
        return
    if models is None:
        raise FCTError(
            f"{where}: a sequence scenario needs models = [{{...}}, {{...}}, {{...}}], three or "
            "more model generations, oldest first"
        )
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise FCTError(
            f"{where}: models must be a list of model tables, e.g. "
            f"models = [{{ classes = [0, 4] }}, {{ classes = [0, 7] }}, {{}}], got {models!r}"[:300]
        )
    if not 3 <= len(models) <= SEQUENCE_MAX:
        raise FCTError(
            f"{where}: a sequence needs 3 to {SEQUENCE_MAX} model generations, got {len(models)}; "
            "for a single update use old/new tables without kind 'sequence'"
        )
    for role in ("old", "new"):
        if role in entry:
            raise FCTError(
                f"{where}: a sequence scenario takes no [{role}] table; set each generation in "
                "models = [...] (keys they share in model = {...})"
            )


def _validate_scenario(sc: Scenario, where: str) -> None:
    _validate_model(sc.old, f"{where} [old]", side=False)
    _validate_model(sc.new, f"{where} [new]", side=False)
    for k, spec in enumerate(sc.models):
        _validate_model(spec, f"{where} models[{k}]", side=False)
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
    _validate_eval_sets(sc.eval, f"{where} [eval]")
    _validate_transformation(sc.transformation, f"{where} [transformation]")
    from fct.metrics import RANKING_METRICS

    for m in sc.eval.metrics or ():
        if m not in RANKING_METRICS:
            raise FCTError(
                f"{where} [eval]: unknown metric {m!r}{did_you_mean(m, RANKING_METRICS)}; "
                f"metrics can be {', '.join(RANKING_METRICS)}"
            )
    if sc.embeddings is not None and (
        sc.transformation.features != "cached" or sc.transformation.views != 1
    ):
        raise FCTError(
            f"{where} [transformation]: a scenario on stored embeddings fits h on them as they "
            "are: features = 'cached' and views = 1 (augmented views need images)"
        )
    if sc.embeddings is not None:
        _validate_stored_eval(sc, where)
    if "fct_side" in sc.methods and sc.side is None:
        raise FCTError(
            f"{where}: method fct_side needs side-information; remove side_info = false or the method"
        )


def _validate_stored_eval(sc: Scenario, where: str) -> None:
    """A scenario on stored embeddings has no image splits: its queries come apart through
    query and gallery files or ``query_fraction``, and it is one update, not a sequence."""
    if sc.models:
        raise FCTError(
            f"{where}: a sequence scenario needs a model per generation; stored embeddings hold "
            "an old and a new model only (remove kind 'sequence' or the embeddings table)"
        )
    if sc.eval.query_split is not None or sc.eval.gallery_split is not None:
        raise FCTError(
            f"{where} [eval]: query_split and gallery_split name image splits; on stored "
            "embeddings give embeddings = { train, query, gallery } files instead"
        )
    if sc.eval.query_fraction is not None and "query" in sc.embeddings.paths():
        raise FCTError(
            f"{where} [eval]: query_fraction and the stored query file both name the queries; "
            "keep one"
        )


def _validate_eval_sets(ev: Any, where: str) -> None:
    """The query set apart from the gallery: known splits, a fraction in (0, 1), one way of
    naming the queries (docs/suites.md, "[eval]")."""
    from fct.data.base import SPLITS

    for key in ("split", "query_split", "gallery_split"):
        value = getattr(ev, key)
        if value is None and key != "split":
            continue
        if not isinstance(value, str) or value not in SPLITS:
            raise FCTError(
                f"{where}: unknown {key} {value!r}; use one of {', '.join(map(repr, SPLITS))}"
            )
    fraction = ev.query_fraction
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise FCTError(f"{where}: query_fraction must be a number in (0, 1), got {fraction!r}")
        if not 0 < fraction < 1:
            raise FCTError(
                f"{where}: query_fraction must lie in (0, 1) (the share of the split's items "
                f"made queries), got {fraction!r}"
            )
        if ev.query_split is not None or ev.gallery_split is not None:
            raise FCTError(
                f"{where}: query_fraction and query_split/gallery_split both name the queries; "
                "keep one"
            )
    if ev.gallery_split is not None and ev.query_split is None:
        raise FCTError(
            f"{where}: gallery_split needs query_split (the queries' split); for leave-one-out "
            "on one split set split instead"
        )
    if ev.query_split is not None and ev.query_split == ev.gallery_data:
        raise FCTError(
            f"{where}: query_split {ev.query_split!r} is also the gallery's split; drop it for "
            "leave-one-out on that split, or set query_fraction to draw queries from it"
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


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise FCTError(f"{where} must be a table, got {table!r}; see docs/suites.md")
    for key in table:
        if key in _MOVED and key not in allowed:
            raise FCTError(f"{where}: '{key}' is no longer a key here; {_MOVED[key]}")
        if key not in allowed:
            raise FCTError(
                f"{where}: unknown key '{key}'{did_you_mean(key, allowed)}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )


#: First parts of a ``--set`` path that name a table of the suite file, not a method.
SET_SECTIONS = ("suite", "defaults", "methods", "scenario")


def parse_set(items: list[str] | tuple[str, ...]) -> dict[Any, Any]:
    """``--set`` overrides. ``METHOD.SETTING=VALUE`` (``bct.weight=0.5``) overrides a method
    setting in every scenario: returned as ``{method: {setting: value}}``. A path whose first
    part is a table of the suite file (``defaults.model.epochs=2``, ``suite.methods=[...]``,
    ``methods.bct.weight=2``, ``scenario.NAME.new.epochs=3``) sets that key of the file before
    it is validated: returned under the tuple of its parts, ``{("defaults", "model",
    "epochs"): 2}``. VALUE is read as TOML (``0.5``, ``true``, ``"mean"``, ``[0, 5]``; a bare
    word is taken as a string)."""
    out: dict[Any, Any] = {}
    for item in items:
        head, eq, raw = item.partition("=")
        parts = tuple(p.strip() for p in head.split("."))
        if not eq or len(parts) < 2 or not all(parts):
            raise FCTError(
                "--set takes METHOD.SETTING=VALUE (e.g. bct.weight=0.5) or a key of the suite "
                f"file (e.g. defaults.model.epochs=2); got {item!r:.120}"
            )
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        if parts[0] in SET_SECTIONS:
            if parts[0] == "scenario" and len(parts) < 3:
                raise FCTError(
                    f"--set scenario.NAME.KEY=VALUE names a scenario and a key; got {item!r:.120}"
                )
            out[parts] = value
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise FCTError(
                f"--set {head!r:.80}: a method setting is METHOD.SETTING (two parts); a longer "
                f"path starts with one of {', '.join(SET_SECTIONS)} (a key of the suite file)"
            )
    return out


def apply_set_paths(doc: dict[str, Any], overrides: dict[Any, Any], where: str) -> None:
    """Set the suite-file keys of ``overrides`` (tuple paths from parse_set) in the parsed
    TOML ``doc``, creating tables on the way; validation happens afterwards, as for the file."""
    for path, value in overrides.items():
        if not isinstance(path, tuple):
            continue
        shown = ".".join(path)
        table: Any = doc
        keys = list(path)
        if keys[0] == "scenario":
            entries = doc.get("scenario")
            named = [e for e in entries or [] if isinstance(e, dict) and e.get("name") == keys[1]]
            if not named:
                names = [e.get("name") for e in entries or [] if isinstance(e, dict)]
                raise FCTError(
                    f"--set {shown}: {where} has no scenario '{keys[1]:.80}'"
                    f"{did_you_mean(keys[1], [n for n in names if isinstance(n, str)])}"
                )
            table, keys = named[0], keys[2:]
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise FCTError(f"--set {shown}: '{key}' is not a table in {where}")
        table[keys[-1]] = value
