"""Extra training terms that compare the new embedding with the frozen old model's embedding
of the same batch images (the base of RACT and L2-BCT)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fct.errors import FCTError

if TYPE_CHECKING:
    from torch import nn

    from fct.builders import Batch
    from fct.context import Context


def check_equal_dims(method: str, d_old: int, d_new: int) -> None:
    """Raise FCTError unless old and new embeddings live in spaces of one size."""
    if d_old != d_new:
        raise FCTError(
            f"{method} needs equal old and new embedding sizes (old {d_old}, new {d_new}); "
            "use fct or fct_side for cross-dimension scenarios"
        )


class OldBatchLoss:
    """An ExtraLoss (fct.builders) whose term reads the old model's embedding of the batch.

    It embeds the batch images (``Batch.images``) with the frozen old model, in eval mode
    and without gradients, each step: the images are augmented per epoch, so
    cached embeddings of the training set would not be of the same images. Subclasses set
    ``name`` and implement ``term(new, old, labels)``; ``params()`` adds their settings to the
    cache key.
    """

    name = ""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)
        self._old: nn.Module | None = None
        self._old_digest: str | None = None
        self._old_size: int | None = None

    def params(self) -> dict[str, Any]:
        """Settings of the term besides its weight (part of the new model's cache key)."""
        return {}

    def key(self) -> dict:
        """What determines the term: its settings and the old model."""
        return {"weight": self.weight, **self.params(), "old": self._old_digest}

    def bind(self, ctx: Context) -> OldBatchLoss:
        """Tie the term to the context's old model (its digest enters the cache key)."""
        self._old_digest = ctx.old_model().digest
        return self

    def prepare(self, ctx: Context, model: nn.Module) -> None:
        """Fetch the frozen old model before training (it stays in eval mode)."""
        old = ctx.old_model()
        if old.in_chans != model.in_chans:
            raise FCTError(
                f"{self.name}: the old model reads {old.in_chans}-channel images but the "
                f"new model's training data has {model.in_chans}; use fct for this scenario"
            )
        self._old = old.module.eval()
        # As ctx.embed does: the old model sees images at the size it was trained at.
        self._old_size = old.spec.image_size

    @torch.no_grad()
    def old_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The old model's embeddings ``[N, d_old]`` of the batch images, without gradients."""
        if self._old is None:
            raise FCTError(f"{self.name}: prepare(ctx, model) must run before training")
        size = self._old_size
        if size and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return self._old.embed(x)

    def term(self, new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The unweighted term from new ``[N, d]`` and old ``[N, d]`` embeddings."""
        raise NotImplementedError

    def __call__(self, batch: Batch) -> torch.Tensor:
        """The weighted term of a batch: its images embedded by the old model."""
        # float32 for the term: under bf16 autocast the embeddings come in bf16.
        old = self.old_embedding(batch.images).float()
        return self.weight * self.term(batch.embedding.float(), old, batch.labels)
