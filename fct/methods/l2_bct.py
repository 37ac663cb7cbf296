"""L2-BCT: backward compatibility by regression. The new model is trained with its usual loss
plus the mean squared error between its L2-normalised embedding and the frozen old model's
L2-normalised embedding of the same image, so its queries search the untouched old gallery (the "L2" baseline of the
compatible-training literature, e.g. Meng et al. 2021, Zhang et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, Settings, register_method, require_images
from fct.methods.old_batch import OldBatchLoss, check_equal_dims

if TYPE_CHECKING:
    from fct.context import Context
    from fct.scenarios import Scenario


def l2_compat_loss(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the L2-normalised new and old embeddings of the same items,
    averaged over batch and dimensions: ``mean_ij (n_ij - o_ij)^2`` with ``n = new/||new||``,
    ``o = old/||old||``; new, old ``[N, d]`` (the reference, OpenCompatible's ``l2``)."""
    if new.shape != old.shape:
        raise FCTError(
            f"L2-BCT compares new and old embeddings of one size, got {tuple(new.shape)} and {tuple(old.shape)}"
        )
    return F.mse_loss(F.normalize(new, dim=1), F.normalize(old.detach(), dim=1))


@dataclass(frozen=True)
class L2BCTSettings(Settings):
    """L2-BCT's settings: the weight of the regression term (reference: 1)."""

    weight: float = 1.0

    def validate(self) -> None:
        """weight >= 0."""
        if not self.weight >= 0:
            raise FCTError(f"setting 'weight' must be >= 0, got {self.weight}")


class L2Compatibility(OldBatchLoss):
    """L2-BCT's regression term as an ExtraLoss of the new model's training."""

    name = "l2_bct"

    def params(self) -> dict:
        """The form of the term (normalised MSE), so older cached models are not reused."""
        return {"form": "normalized-mse"}

    def term(self, new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``l2_compat_loss`` of the batch (labels unused)."""
        return l2_compat_loss(new, old)


@register_method("l2_bct")
class L2BCT(Method):
    """L2-BCT: the new model is pulled towards the old embeddings by an L2 term.

    The gallery keeps the old embeddings."""

    label = "L2-BCT"
    report_order = 80
    keeps_new_model = False
    Settings = L2BCTSettings

    def check(self, scenario: Scenario) -> None:
        """The new embedding is compared with the old one: their sizes must be equal."""
        require_images(scenario, "L2-BCT trains a new model")
        check_equal_dims("L2-BCT", scenario.old.embedding_dim, scenario.new.embedding_dim)

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        new = ctx.new_model(
            extra=L2Compatibility(self.settings.weight).bind(ctx), tag=self.run_name
        )
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))
