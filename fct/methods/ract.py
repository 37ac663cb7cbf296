"""RACT (Zhang et al., ICLR 2022, "Hot-Refresh Model Upgrades with Regression-Alleviating
Compatible Training in Image Retrieval").

The new model is trained with its usual loss plus a contrastive regulariser: each new
embedding must be closer to the old embedding of the same image than to the old and new
embeddings of images of other classes. The gallery starts as the untouched old embeddings (as
BCT's) and is hot-refreshed, backfilled with new embeddings while the system serves queries;
the random backfilling curve of the run records measures that.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, register_method
from fct.methods.old_batch import OldBatchLoss, check_equal_dims

if TYPE_CHECKING:
    from fct.context import Context
    from fct.scenarios import Scenario


def ract_loss(
    new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """RACT's regression-alleviating contrastive term, on in-batch negatives.

    new ``[N, d]`` (new model, with gradients), old ``[N, d]`` (frozen old model, same images),
    labels ``[N]``; both L2-normalised here. For anchor i, with s(a, b) = a.b / temperature:
    ``-log exp(s(n_i, o_i)) / (exp(s(n_i, o_i)) + sum_{k: y_k != y_i} exp(s(n_i, o_k))
    + exp(s(n_i, n_k)))``, averaged over the batch. Same-class items other than i are neither
    positives nor negatives.
    """
    if new.shape != old.shape:
        raise FCTError(
            f"RACT compares new and old embeddings of one size, got {tuple(new.shape)} and {tuple(old.shape)}"
        )
    zn = F.normalize(new, dim=1)
    zo = F.normalize(old.detach(), dim=1)
    positive = (zn * zo).sum(1, keepdim=True) / temperature
    other_class = labels.unsqueeze(0) != labels.unsqueeze(1)
    # -inf removes same-class entries (self included) from the denominator.
    to_old = (zn @ zo.T / temperature).masked_fill(~other_class, -math.inf)
    to_new = (zn @ zn.T / temperature).masked_fill(~other_class, -math.inf)
    logits = torch.cat([positive, to_old, to_new], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive.squeeze(1)).mean()


class RACTRegularizer(OldBatchLoss):
    """RACT's contrastive term as an ExtraLoss of the new model's training."""

    name = "ract"

    def __init__(self, weight: float = 1.0, temperature: float = 0.1) -> None:
        super().__init__(weight)
        if not temperature > 0:
            raise FCTError(f"RACT's temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def params(self) -> dict:
        """The temperature (with the weight and the old model, the cache key)."""
        return {"temperature": self.temperature}

    def term(self, new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``ract_loss`` of the batch."""
        return ract_loss(new, old, labels, self.temperature)


@register_method("ract")
class RACT(Method):
    """RACT: the new model is trained with a contrastive regulariser to the old space.

    Its queries search the old gallery while that gallery is hot-refreshed (backfilled)."""

    label = "RACT"
    weight = 1.0
    temperature = 0.1

    def config(self) -> dict:
        """Name, label, the term's weight and temperature."""
        return {**super().config(), "weight": self.weight, "temperature": self.temperature}

    def check(self, scenario: Scenario) -> None:
        """The new embedding is compared with the old one: their sizes must be equal."""
        check_equal_dims("RACT", scenario.old.embedding_dim, scenario.new.embedding_dim)

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        extra = RACTRegularizer(self.weight, self.temperature).bind(ctx)
        new = ctx.new_model(extra=extra)
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))
