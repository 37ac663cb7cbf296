"""The four baseline methods: independent (no compatibility), BCT, FCT, FCT + side-information."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fct.methods.base import Deployment, Method, register_method

if TYPE_CHECKING:
    from fct.context import Context
    from fct.scenarios import Scenario


@register_method("independent")
class Independent(Method):
    """No compatibility: the new model is trained alone; the gallery keeps old embeddings."""

    label = "Independent"

    def fit(self, ctx: Context) -> Deployment:
        new = ctx.new_model()
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))


class BCTInfluence:
    """BCT's influence loss (Shen et al. 2020): the new embedding through the frozen old
    classifier, whose rows for classes the old model never saw are the old model's class
    means of those classes' training items."""

    name = "bct"

    def __init__(self, weight: float, smoothing: float, new_rows: str = "scaled-mean") -> None:
        self.weight = weight
        self.smoothing = smoothing
        self.new_rows = new_rows
        self.old_weight: torch.Tensor | None = None
        self._old_digest: str | None = None

    def key(self) -> dict:
        return {
            "weight": self.weight,
            "smoothing": self.smoothing,
            "new_rows": self.new_rows,
            "old": self._old_digest,
        }

    def bind(self, ctx: Context) -> BCTInfluence:
        self._old_digest = ctx.old_model().digest
        return self

    def prepare(self, ctx: Context, model: torch.nn.Module) -> None:
        from fct.losses import synthesize_old_classifier

        old = ctx.old_model()
        feats, labels = ctx.embed(old, "new-train")
        weight = old.module.classifier.weight.detach().cpu()
        if ctx.scenario.old.dataset != ctx.scenario.new.dataset:
            # Cross-dataset: no new class is an old class, so every row is a class mean.
            weight = weight[:0]
        rows = synthesize_old_classifier(weight, feats, labels, model.num_classes)
        n_old = len(weight)
        if self.new_rows == "scaled-mean" and 0 < n_old < len(rows):
            scale = weight.norm(dim=1).mean()
            synth = rows[n_old:]
            rows[n_old:] = synth / synth.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
        self.old_weight = rows.to(ctx.device)

    def __call__(self, embedding, logits, labels):
        from fct.losses import bct_influence_loss

        return self.weight * bct_influence_loss(embedding, self.old_weight, labels, self.smoothing)


@register_method("bct")
class BCT(Method):
    """Backward compatible training: the new model is trained with the influence loss, so
    its queries search the untouched old gallery."""

    label = "BCT"

    def check(self, scenario: Scenario) -> None:
        """The old classifier takes the new embedding: old and new sizes must be equal."""
        from fct.losses import check_bct_dims

        check_bct_dims(scenario.old.embedding_dim, scenario.new.embedding_dim)

    def fit(self, ctx: Context) -> Deployment:
        sc = ctx.scenario
        self.check(sc)
        new = ctx.new_model(
            extra=BCTInfluence(sc.bct.weight, sc.bct.smoothing, sc.bct.new_rows).bind(ctx)
        )
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))


@register_method("fct")
class FCT(Method):
    """Forward compatible training without side-information: h(old) replaces the gallery."""

    label = "FCT"
    use_side = False

    def fit(self, ctx: Context) -> Deployment:
        new = ctx.new_model()
        h = ctx.transformation(new, use_side=self.use_side)
        arts = (ctx.old_model(), new, h) + ((ctx.side_model(),) if self.use_side else ())
        return Deployment(
            query_model=new, transformation=h, uses_side=self.use_side, artifacts=arts
        )


@register_method("fct_side")
class FCTSide(FCT):
    """FCT with side-information: h(old, ψ) replaces the gallery, ψ from SimCLR."""

    label = "FCT + side-info"
    use_side = True
