"""The method interface: a compatibility method turns a Context into a Deployment.

A user's method is one small class in their own file::

    from fct.methods import Method, Deployment, register_method

    @register_method("my_method")
    class MyMethod(Method):
        label = "My method"

        def fit(self, ctx):
            new = ctx.new_model()
            return Deployment(query_model=new, gallery_update=lambda old, side: old)

loaded with ``fct run SUITE --plugin my_module`` (a module name or a .py path) or through an
entry point in the group ``fct.methods``.

A method's settings are a frozen dataclass derived from ``Settings`` (typed fields with the
paper's defaults), named by the class attribute ``Settings``; a suite sets them in
``[methods.NAME]`` tables (suite-wide) and ``settings.NAME`` tables (per scenario), validated
at load, and ``fct run --set NAME.KEY=VALUE`` overrides them. A table with ``base = "bct"``
defines a *variant*: a new name for a registered method with other settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fct.errors import FCTError
from fct.record import METHOD
from fct.registry import Registry, did_you_mean

if TYPE_CHECKING:
    import torch

    from fct.context import Context
    from fct.scenarios import Scenario
    from fct.session import Trained

METHODS: Registry[type[Method]] = Registry("method", hint="fct list methods")


def register_method(name: str):
    """Class decorator registering a Method subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


@dataclass
class Deployment:
    """How a method deploys its new model.

    - ``query_model``: encodes queries after the update (its own gallery gives new/new).
    - ``transformation``: a trained h applied to the stored old gallery (FCT family); or
    - ``gallery_update(old, side) -> new gallery``: any other update of the stored embeddings.
      With neither, the old gallery is kept untouched (independent, BCT).
    - ``uses_side``: the update reads the stored side-information.
    - ``backfill_fraction``: share of the gallery re-encoded with the new model.
    - ``artifacts``: every trained artifact this deployment relies on (for the cost columns).
    - ``backfill_order``: optional, the method's own backfilling order: a permutation of the
      gallery's indices (the evaluation split's order), most urgent first (e.g. FastFill's
      decreasing uncertainty). The backfilling curves (fct.curves) then get an extra curve
      under the name ``backfill_order_name``, beside the random order every method gets.
    - ``query_update(new_queries) -> queries in the old space``: the other direction (the
      query-side adapters): new queries are mapped into the old model's space and searched
      against the untouched old gallery (zero backfill); the cross case is then adapted new
      queries against the old gallery. Exclusive with ``transformation`` and ``gallery_update``.
    - ``fit_seconds``: the method's own fit time, when it measures it (else the records use
      the training time of what was trained for it alone).
    """

    query_model: Trained
    transformation: Trained | None = None
    gallery_update: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    uses_side: bool = False
    backfill_fraction: float = 0.0
    artifacts: tuple[Trained, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)
    backfill_order: torch.Tensor | None = None
    backfill_order_name: str = "method"
    query_update: Callable[[torch.Tensor], torch.Tensor] | None = None
    fit_seconds: float | None = None


def require_images(scenario: Scenario, what: str) -> None:
    """FCTError when ``scenario`` has stored embeddings only (no images to train on): a
    method's ``check`` calls it when it trains an image model. ``what`` says what it trains."""
    if getattr(scenario, "embeddings", None) is not None:
        raise FCTError(
            f"{what}, which needs images; scenario '{scenario.name}' has stored embeddings "
            "only: drop the method from its methods"
        )


@dataclass(frozen=True)
class Settings:
    """Settings of a method: subclass it with typed fields whose defaults are the paper's.

    Supported field types: bool, int, float, str, ``X | None`` of those, and
    ``typing.Literal[...]`` for a choice. ``validate`` checks ranges (raise FCTError with the
    bare problem; the suite loader adds where it was set). ``label`` is the display name in
    reports; it is not part of a record's hash.
    """

    label: str = ""

    def validate(self) -> None:
        """Raise FCTError when a value is out of range (types are checked before)."""

    def hashed(self) -> dict[str, Any]:
        """Every setting but the display label: what a record's hash covers."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "label"}


def _type_ok(value: Any, hint: Any) -> tuple[bool, str]:
    """Whether ``value`` fits the type ``hint``, and a phrase naming the type."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return value in choices, "one of " + ", ".join(repr(c) for c in choices)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_ok(value, a) for a in typing.get_args(hint) if a is not type(None)]
        return any(ok for ok, _ in parts), " or ".join(w for _, w in parts)
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and value == value and abs(value) != float("inf"), "a finite number"
    if hint is str:
        return isinstance(value, str), "a string"
    return False, f"a {hint}"


def make_settings(cls: type[Settings], values: dict[str, Any]) -> Settings:
    """``cls(**values)`` with every key and type checked and ``validate`` run.

    Raises FCTError naming the unknown key (with "did you mean") or the expected type.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise FCTError(
                f"unknown setting '{key}'{did_you_mean(key, names)}; settings: {', '.join(names)}"
            )
        ok, what = _type_ok(value, hints[key])
        if not ok:
            raise FCTError(f"setting '{key}' must be {what}, got {value!r}")
        kwargs[key] = float(value) if hints[key] is float else value
    settings = cls(**kwargs)
    settings.validate()
    return settings


class Method:
    """Base class of compatibility methods. Subclasses implement ``fit``.

    An instance carries its ``settings`` (an instance of the class's ``Settings``) and the
    ``name`` it runs under: the registered name, or a variant's name from the suite.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # display name in tables (defaults to the registered name)
    Settings: ClassVar[type[Settings]] = Settings
    #: Where the method's rows come in reports (the built-ins: 10, 20, ...); None, a plugin's
    #: default: after those that have one, by registered name. A suite variant follows its base.
    report_order: ClassVar[int | None] = None
    #: ``"baseline"`` (fct.record.BASELINE) for the method every other one is measured against
    #: (Independent: no compatibility, its new model is the reference new/new); else "method".
    role: ClassVar[str] = METHOD
    #: Whether the method queries with Independent's new model (True: FCT, FastFill), trains
    #: its own (False: BCT, RACT, L2-BCT), or does not say (None). Records carry it; the report
    #: uses it where the records' artifact digests cannot tell.
    keeps_new_model: ClassVar[bool | None] = None

    def __init__(self, settings: Settings | None = None, name: str | None = None) -> None:
        self.settings = settings if settings is not None else type(self).Settings()
        self.run_name = name or type(self).name

    @property
    def display_label(self) -> str:
        """The label in reports: the suite's ``label`` setting, else the class's, else the name."""
        return (
            self.settings.label
            or (self.label if self.run_name == type(self).name else "")
            or (self.run_name)
        )

    def config(self) -> dict[str, Any]:
        """What configures this method, as stored in its run records (``method_config``): the
        hashed part, the display label and the class's traits (fct.record.MethodTraits)."""
        cls = type(self)
        return {
            **self.hash_config(),
            "label": self.display_label,
            "report_order": cls.report_order,
            "role": cls.role,
            "keeps_new_model": cls.keeps_new_model,
        }

    def hash_config(self) -> dict[str, Any]:
        """What a record's hash covers: the run name, the registered method, its settings."""
        return {"name": self.run_name, "base": type(self).name, "settings": self.settings.hashed()}

    def check(self, scenario: Scenario) -> None:
        """Raise FCTError when this method cannot run ``scenario`` (e.g. embedding sizes it
        cannot handle). The runner calls it for every scenario before anything trains, so a
        mistake costs seconds, not a finished training; the default accepts everything."""

    def sequence_anchor(self) -> str:
        """In a sequence scenario (fct.sequence), the old model of each update: ``"previous"``,
        the model this method deployed at the step before (the default), or ``"first"``, the
        first generation's model (BCT's ``anchor = "first"``, the CL2R-style variant)."""
        return "previous"

    def fit(self, ctx: Context) -> Deployment:
        """Build (through ``ctx``, which caches everything) and return the deployment."""
        raise NotImplementedError(f"{type(self).__name__}.fit")
