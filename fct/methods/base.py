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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fct.registry import Registry

if TYPE_CHECKING:
    import torch

    from fct.context import Context, Trained
    from fct.scenarios import Scenario

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


class Method:
    """Base class of compatibility methods. Subclasses implement ``fit``."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # display name in tables (defaults to the registered name)

    def config(self) -> dict[str, Any]:
        """What configures this method (stored in run records; part of the record's hash)."""
        return {"name": self.name, "label": self.label or self.name}

    def check(self, scenario: Scenario) -> None:
        """Raise FCTError when this method cannot run ``scenario`` (e.g. embedding sizes it
        cannot handle). The runner calls it for every scenario before anything trains, so a
        mistake costs seconds, not a finished training; the default accepts everything."""

    def fit(self, ctx: Context) -> Deployment:
        """Build (through ``ctx``, which caches everything) and return the deployment."""
        raise NotImplementedError(f"{type(self).__name__}.fit")
