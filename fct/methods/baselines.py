"""The four baseline methods: independent (no compatibility), BCT, FCT, FCT + side-information."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, Settings, register_method, require_images
from fct.methods.old_batch import check_equal_dims
from fct.record import BASELINE
from fct.session import Role

if TYPE_CHECKING:
    from fct.builders import Batch
    from fct.context import Context
    from fct.scenarios import ModelSpec, Scenario


@register_method("independent")
class Independent(Method):
    """No compatibility: the new model is trained alone; the gallery keeps old embeddings."""

    label = "Independent"
    report_order = 10
    role = BASELINE
    keeps_new_model = True

    def check(self, scenario: Scenario) -> None:
        """The cross case puts new queries against the untouched old gallery: equal sizes."""
        check_equal_dims("Independent", scenario.old.embedding_dim, scenario.new.embedding_dim)

    def fit(self, ctx: Context) -> Deployment:
        new = ctx.new_model()
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))


@dataclass(frozen=True)
class BCTSettings(Settings):
    """BCT's settings; the defaults are the paper's form (Shen et al. 2020)."""

    weight: float = 1.0  # lambda of the influence loss
    # Rows of the old classifier the new embedding goes through: "old+means" (the paper: the
    # frozen old classifier, plus the old model's raw class means for the classes it never
    # saw); "means" (BT-2's pseudo-classifier: old-model class means for every class);
    # "old+scaled-means" (an ablation: the new-class means rescaled to the old rows' norm).
    rows: Literal["old+means", "means", "old+scaled-means"] = "old+means"
    normalize: bool = False  # L2-normalise old and new features in the influence term (BT-2)
    # Label smoothing of the influence term. Unset: the old model's own loss, as the paper
    # writes both terms with the same L (cross-entropy at the old model's smoothing, or its
    # CosFace/ArcFace margin form). A number overrides it (cross-entropy old models only).
    smoothing: float | None = None
    # In a sequence scenario (fct.sequence), the model each new generation is constrained by:
    # "previous", BCT's own model of the step before (the deployed chain); "first", the first
    # model, as the CL2R-style variant (Biondi et al. 2023). No effect on an old/new pair.
    anchor: Literal["previous", "first"] = "previous"

    def validate(self) -> None:
        """weight >= 0 and smoothing in [0, 1)."""
        if not self.weight >= 0:
            raise FCTError(f"setting 'weight' must be >= 0, got {self.weight}")
        if self.smoothing is not None and not 0 <= self.smoothing < 1:
            raise FCTError(f"setting 'smoothing' must be in [0, 1), got {self.smoothing}")

    def hashed(self) -> dict:
        """The hashed settings; ``anchor`` only when it is not the default, so records made
        before it existed keep their hashes (it changes nothing outside a sequence)."""
        out = super().hashed()
        if out["anchor"] == "previous":
            del out["anchor"]
        return out


class BCTInfluence:
    """BCT's influence loss: the old model's own training loss applied to the new embedding
    through the frozen old classifier, extended with rows for the classes it never saw."""

    name = "bct"

    def __init__(self, settings: BCTSettings) -> None:
        self.settings = settings
        self.old_weight: torch.Tensor | None = None
        self.loss_fn = None
        self._old_digest: str | None = None

    def key(self) -> dict:
        """The settings that shape the term (not the label) and the old model's digest."""
        # Not the anchor: it chooses the old model, whose digest is here already.
        shaping = {k: v for k, v in self.settings.hashed().items() if k != "anchor"}
        return {**shaping, "old": self._old_digest, "form": 2}

    def bind(self, ctx: Context) -> BCTInfluence:
        """Tie the term to the context's old model (its digest enters the cache key)."""
        self._old_digest = ctx.old_model().digest
        return self

    def prepare(self, ctx: Context, model: torch.nn.Module) -> None:
        """Build the extended old classifier and the old model's loss before training."""
        from fct.losses import make_loss, synthesize_old_classifier

        st = self.settings
        old = ctx.old_model()
        feats, labels = ctx.embed(old, Role.NEW_TRAIN)
        if st.normalize:
            feats = F.normalize(feats.float(), dim=1)
        weight = old.classifier_weight().cpu()
        if st.rows == "means" or ctx.scenario.old.dataset != ctx.scenario.new.dataset:
            # BT-2's pseudo-classifier; or cross-dataset, where no new class is an old class.
            weight = weight[:0]
        rows = synthesize_old_classifier(weight, feats, labels, model.num_classes)
        n_old = len(weight)
        if st.rows == "old+scaled-means" and 0 < n_old < len(rows):
            scale = weight.norm(dim=1).mean()
            synth = rows[n_old:]
            rows[n_old:] = synth / synth.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
        self.old_weight = rows.to(ctx.device)
        name, args = influence_loss_args(ctx.scenario.old, st)
        self.loss_fn = make_loss(name, **args)

    def __call__(self, batch: Batch) -> torch.Tensor:
        """The weighted influence term of the new model's batch embeddings."""
        emb = batch.embedding.float()
        if self.settings.normalize:
            emb = F.normalize(emb, dim=1)
        w = self.old_weight
        return self.settings.weight * self.loss_fn(emb, emb @ w.T, batch.labels, w)


def influence_loss_args(old: ModelSpec, settings: BCTSettings) -> tuple[str, dict]:
    """(loss name, arguments) of the influence term: the old model's own training loss, with
    the ``smoothing`` setting in place of its own when given."""
    args = dict(old.loss_args)
    if settings.smoothing is not None:
        args["smoothing"] = settings.smoothing
    return old.loss, args


@register_method("bct")
class BCT(Method):
    """Backward compatible training: the new model is trained with the influence loss, so
    its queries search the untouched old gallery."""

    label = "BCT"
    report_order = 20
    keeps_new_model = False
    Settings = BCTSettings

    def check(self, scenario: Scenario) -> None:
        """Equal embedding sizes, an old model with a classifier, a usable smoothing."""
        from fct.losses import check_bct_dims

        require_images(scenario, "BCT trains a new model")
        check_bct_dims(scenario.old.embedding_dim, scenario.new.embedding_dim)
        if scenario.old.loss not in ("ce", "cosface", "arcface"):
            raise FCTError(
                f"BCT's influence loss goes through the old classifier, but the old model is "
                f"trained with {scenario.old.loss}, which trains none; use fct or l2_bct"
            )
        if self.settings.smoothing is not None and scenario.old.loss != "ce":
            raise FCTError(
                f"setting 'smoothing' applies to a cross-entropy old model; this one uses "
                f"{scenario.old.loss}: remove the setting"
            )

    def sequence_anchor(self) -> str:
        """The ``anchor`` setting: each generation constrained by the previous or the first."""
        return self.settings.anchor

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        new = ctx.new_model(extra=BCTInfluence(self.settings).bind(ctx), tag=self.run_name)
        return Deployment(query_model=new, artifacts=(ctx.old_model(), new))


@register_method("fct")
class FCT(Method):
    """Forward compatible training without side-information: h(old) replaces the gallery."""

    label = "FCT"
    report_order = 30
    keeps_new_model = True
    use_side = False

    def check(self, scenario: Scenario) -> None:
        """fct_side needs the scenario's side-information model."""
        if self.use_side and scenario.side is None:
            raise FCTError(
                f"scenario '{scenario.name}' has no side-information model; set side_info = "
                "true or use fct"
            )

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
    report_order = 40
    use_side = True
