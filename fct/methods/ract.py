"""RACT (Zhang et al., ICLR 2022, "Hot-Refresh Model Upgrades with Regression-Alleviating
Compatible Training in Image Retrieval").

The new model is trained with its usual loss plus a contrastive regulariser: each new
embedding must be closer to the old embedding of the same image than to the old and new
embeddings of images of other classes. The gallery starts as the untouched old embeddings (as
BCT's) and is hot-refreshed, backfilled with new embeddings while the system serves queries;
the backfilling curves of the run records measure that (random order, and RACT's own
uncertainty order: the old embeddings whose old-classifier prediction is least certain first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, Settings, register_method, require_images
from fct.methods.old_batch import OldBatchLoss, check_equal_dims
from fct.session import Role

if TYPE_CHECKING:
    from fct.context import Context
    from fct.scenarios import Scenario


def ract_loss(
    new: torch.Tensor,
    old: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.01,
    topk: int = 10,
) -> torch.Tensor:
    """RACT's regression-alleviating contrastive term on in-batch negatives.

    new ``[N, d]`` (new model, with gradients), old ``[N, d]`` (frozen old model, same images),
    labels ``[N]``; both L2-normalised here. For anchor i, with s(a, b) = a.b / temperature,
    the positive is s(n_i, o_i); the negatives are s(n_i, o_k) and s(n_i, n_k) for the items
    k of other classes, of which only the ``topk`` largest of each kind are kept (the hardest;
    ``topk`` = 0 keeps all). The term is ``-log exp(pos) / (exp(pos) + sum exp(negatives))``
    averaged over the batch. Same-class items other than i are neither positives nor negatives.
    The reference (OpenCompatible ``contra_ract``): temperature 0.01, ``--comp_loss_topk 10``.
    """
    if new.shape != old.shape:
        raise FCTError(
            f"RACT compares new and old embeddings of one size, got {tuple(new.shape)} and {tuple(old.shape)}"
        )
    zn = F.normalize(new, dim=1)
    zo = F.normalize(old.detach(), dim=1)
    positive = (zn * zo).sum(1, keepdim=True) / temperature
    other_class = labels.unsqueeze(0) != labels.unsqueeze(1)
    # -inf removes same-class entries (self included): exp(-inf) adds nothing below.
    to_old = (zn @ zo.T / temperature).masked_fill(~other_class, -math.inf)
    to_new = (zn @ zn.T / temperature).masked_fill(~other_class, -math.inf)
    if 0 < topk < to_old.shape[1]:
        to_old = torch.topk(to_old, topk, dim=1).values
        to_new = torch.topk(to_new, topk, dim=1).values
    logits = torch.cat([positive, to_old, to_new], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive.squeeze(1)).mean()


@dataclass(frozen=True)
class RACTSettings(Settings):
    """RACT's settings; the defaults are the reference code's (OpenCompatible)."""

    weight: float = 1.0
    temperature: float = 0.01
    topk: int = 10  # hardest negatives of each kind per anchor; 0 = every in-batch negative

    def validate(self) -> None:
        """weight >= 0, temperature > 0, topk >= 0."""
        if not self.weight >= 0:
            raise FCTError(f"setting 'weight' must be >= 0, got {self.weight}")
        if not self.temperature > 0:
            raise FCTError(f"setting 'temperature' must be > 0, got {self.temperature}")
        if self.topk < 0:
            raise FCTError(f"setting 'topk' must be >= 0, got {self.topk}")


class RACTRegularizer(OldBatchLoss):
    """RACT's contrastive term as an ExtraLoss of the new model's training."""

    name = "ract"

    def __init__(self, weight: float = 1.0, temperature: float = 0.01, topk: int = 10) -> None:
        super().__init__(weight)
        if not temperature > 0:
            raise FCTError(f"RACT's temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.topk = int(topk)

    def params(self) -> dict:
        """The temperature and top-k (with the weight and the old model, the cache key)."""
        return {"temperature": self.temperature, "topk": self.topk}

    def term(self, new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``ract_loss`` of the batch."""
        return ract_loss(new, old, labels, self.temperature, self.topk)


#: The name of RACT's own backfilling order in run records.
ORDER = "uncertainty"


@torch.inference_mode()
def old_entropy_order(ctx: Context) -> torch.Tensor:
    """Gallery indices by decreasing uncertainty of the stored old embedding, most uncertain
    first: the entropy of the frozen old classifier's softmax over the old embedding (RACT's
    uncertainty-based backfilling, Zhang et al. 2022, sec. 3.3). Ties keep gallery order."""
    old = ctx.old_model()
    x, _ = ctx.embed(old, Role.EVAL)
    w = old.classifier_weight().float().cpu()
    entropies = []
    for i in range(0, len(x), 8192):
        logp = torch.log_softmax(x[i : i + 8192].float() @ w.T, dim=1)
        entropies.append(-(logp.exp() * logp).sum(1))
    return torch.argsort(-torch.cat(entropies), stable=True)


@register_method("ract")
class RACT(Method):
    """RACT: the new model is trained with a contrastive regulariser to the old space.

    Its queries search the old gallery while that gallery is hot-refreshed (backfilled),
    at random and, RACT's own order, most uncertain old embedding first."""

    label = "RACT"
    report_order = 70
    keeps_new_model = False
    Settings = RACTSettings

    def check(self, scenario: Scenario) -> None:
        """The new embedding is compared with the old one: their sizes must be equal."""
        require_images(scenario, "RACT trains a new model")
        check_equal_dims("RACT", scenario.old.embedding_dim, scenario.new.embedding_dim)

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        st = self.settings
        extra = RACTRegularizer(st.weight, st.temperature, st.topk).bind(ctx)
        new = ctx.new_model(extra=extra, tag=self.run_name)
        order = old_entropy_order(ctx) if ctx.scenario.old.loss != "supcon" else None
        return Deployment(
            query_model=new,
            artifacts=(ctx.old_model(), new),
            backfill_order=order,
            backfill_order_name=ORDER,
        )
