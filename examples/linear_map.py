"""An example plugin: a closed-form linear map from old to new embeddings.

The simplest thing a researcher might compare against FCT: fit ``new ≈ [old, 1] @ W`` by ridge
regression on the training set's embeddings, then apply it to the stored gallery. Run it with

    fct run quickstart --plugin examples/linear_map.py --methods fct,linear_map

Everything it needs comes from the Context, which trains and caches the models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fct.errors import FCTError
from fct.methods import Deployment, Method, Settings, register_method


@dataclass(frozen=True)
class LinearMapSettings(Settings):
    """Set from a suite (``[methods.linear_map] ridge = 0.01``) or ``--set linear_map.ridge=0.01``."""

    ridge: float = 1e-3  # ridge penalty, relative to the number of training items

    def validate(self) -> None:
        if not self.ridge >= 0:
            raise FCTError(f"setting 'ridge' must be >= 0, got {self.ridge}")


@register_method("linear_map")
class LinearMap(Method):
    """Ridge regression old -> new embedding (no side-information, no training loop)."""

    label = "Linear map"
    keeps_new_model = True  # queries with ctx.new_model(), Independent's new model
    Settings = LinearMapSettings

    def fit(self, ctx) -> Deployment:
        old, new = ctx.old_model(), ctx.new_model()
        x, _ = ctx.embed(old, "new-train")
        y, _ = ctx.embed(new, "new-train")
        x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
        gram = x1.T @ x1 + self.settings.ridge * len(x1) * torch.eye(
            x1.shape[1], dtype=torch.float64
        )
        w = torch.linalg.solve(gram, x1.T @ y.double()).float()

        def update(old_gallery: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
            return old_gallery @ w[:-1] + w[-1]

        return Deployment(query_model=new, gallery_update=update, artifacts=(old, new))
