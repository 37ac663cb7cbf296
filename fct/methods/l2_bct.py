"""L2-BCT: backward compatibility by regression. The new model is trained with its usual loss
plus the squared L2 distance between its embedding and the frozen old model's embedding of the
same image, so its queries search the untouched old gallery (the "L2" baseline of the
compatible-training literature, e.g. Meng et al. 2021, Zhang et al. 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, register_method
from fct.methods.old_batch import OldBatchLoss, check_equal_dims

if TYPE_CHECKING:
    from fct.context import Context
    from fct.scenarios import Scenario


def l2_compat_loss(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean over items of the squared L2 distance ``||new_i - old_i||^2``; new, old ``[N, d]``.

    Summed over dimensions, not averaged: averaged, the term's gradient per dimension would
    shrink with d and a weight of 1 would barely act on a 128-d embedding.
    """
    if new.shape != old.shape:
        raise FCTError(
            f"L2-BCT compares new and old embeddings of one size, got {tuple(new.shape)} and {tuple(old.shape)}"
        )
    return (new - old.detach()).pow(2).sum(1).mean()


class L2Compatibility(OldBatchLoss):
    """L2-BCT's regression term as an ExtraLoss of the new model's training."""

    name = "l2_bct"

    def term(self, new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``l2_compat_loss`` of the batch (labels unused)."""
        return l2_compat_loss(new, old)


@register_method("l2_bct")
class L2BCT(Method):
    """L2-BCT: the new model is pulled towards the old embeddings by an L2 term.

    The gallery keeps the old embeddings."""

    label = "L2-BCT"
    weight = 1.0

    def config(self) -> dict:
        """Name, label and the L2 term's weight."""
        return {**super().config(), "weight": self.weight}

    def check(self, scenario: Scenario) -> None:
        """The new embedding is compared with the old one: their sizes must be equal."""
        check_equal_dims("L2-BCT", scenario.old.embedding_dim, scenario.new.embedding_dim)

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        new = ctx.new_model(extra=L2Compatibility(self.weight).bind(ctx))
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))
