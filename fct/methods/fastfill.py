"""FastFill (Jaeckle et al., ICLR 2023): FCT's transformation with an uncertainty head.

h is trained with FCT's MSE plus a label-smoothed (0.1) cross-entropy of the frozen new
classifier on h(old), each item's loss weighted by a learned uncertainty sigma (a linear head
on h's output): ``mean(0.5 exp(-sigma) L + 0.5 sigma)`` with L the item's loss. The gallery
starts as h(old), like FCT's; the items with the highest sigma, those h maps worst, are
backfilled first (the "uncertainty" backfilling curve).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fct.errors import FCTError
from fct.methods.base import Deployment, Method, Settings, register_method
from fct.models import Transformation
from fct.seeding import derive_seed, isolated_rng
from fct.session import Role

if TYPE_CHECKING:
    from fct.context import Context
    from fct.models import FoldedTransformation
    from fct.scenarios import ModelSpec, Scenario

#: The method's own backfilling order's name in run records.
ORDER = "uncertainty"


class UncertainTransformation(nn.Module):
    """FCT's h (``fct.models.Transformation``) plus FastFill's uncertainty head.

    ``forward(old, side)`` returns the new-model-compatible embedding only, so it drops in
    wherever h does (``fct.embedding.apply_transformation``, through ``folded()``);
    ``with_sigma`` and ``sigma`` also give the per-item uncertainty sigma (a log-variance).
    """

    def __init__(self, d_old: int, d_new: int, d_side: int = 0, hidden: int = 2048) -> None:
        super().__init__()
        self.h = Transformation(d_old, d_new, d_side, hidden)
        self.sigma_head = nn.Linear(d_new, 1)

    def forward(
        self, old: torch.Tensor, side: torch.Tensor | None = None, with_sigma: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """h(old, side): embeddings ``[N, d_new]``; with ``with_sigma`` also sigma ``[N]``.

        Training calls the module (``with_sigma=True``) rather than ``with_sigma()``, so the
        call goes through DistributedDataParallel's forward under torchrun.
        """
        out = self.h(old, side)
        return (out, self.sigma_head(out).squeeze(1)) if with_sigma else out

    def with_sigma(
        self, old: torch.Tensor, side: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h(old, side) [N, d_new], sigma [N])``."""
        return self(old, side, with_sigma=True)

    def sigma(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """The uncertainty sigma ``[N]`` of each item (higher: h maps it worse)."""
        return self.with_sigma(old, side)[1]

    def freeze_bn(self, frozen: bool = True) -> UncertainTransformation:
        """Freeze h's BatchNorm statistics (see ``Transformation.freeze_bn``); returns self."""
        self.h.freeze_bn(frozen)
        return self

    def folded(self) -> FoldedTransformation:
        """h alone with BatchNorm folded in, for applying it to a gallery (no sigma)."""
        return self.h.folded()


def fastfill_loss(
    pred: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    smoothing: float = 0.1,
) -> torch.Tensor:
    """FastFill's uncertainty-weighted loss.

    Per item i: ``L_i = mean_j (pred_ij - target_ij)^2 + CE_smoothed(logits_i, labels_i)``
    (the squared error averaged over dimensions, so without the other terms this is FCT's MSE;
    no CE when ``logits`` is None). Returns ``mean_i(0.5 exp(-sigma_i) L_i + 0.5 sigma_i)``.
    pred, target ``[N, d]``; sigma ``[N]``; logits ``[N, C]``; labels ``[N]``.
    """
    if pred.shape != target.shape:
        raise FCTError(
            f"h's output {tuple(pred.shape)} does not match the new embeddings {tuple(target.shape)}"
        )
    per_item = (pred.float() - target.float()).pow(2).mean(1)
    if logits is not None:
        per_item = per_item + F.cross_entropy(
            logits.float(), labels, label_smoothing=smoothing, reduction="none"
        )
    sigma = sigma.float()
    return (0.5 * torch.exp(-sigma) * per_item + 0.5 * sigma).mean()


def classifier_logits(spec: ModelSpec, weight: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The frozen new classifier's logits on ``emb``, as the new model was trained to read them.

    A linear classifier for cross-entropy; ``scale * cos`` for the cosine-margin losses (their
    classifier rows are class centres on the sphere, and h(old) lives at the new embedding's
    scale, which the cosine ignores). The margin is a training device and is left out.
    """
    if spec.loss in ("cosface", "arcface"):
        scale = float(dict(spec.loss_args).get("scale", 30.0))
        return scale * F.linear(F.normalize(emb, dim=1), F.normalize(weight, dim=1))
    return emb @ weight.T


def _uses_classifier(spec: ModelSpec) -> bool:
    # SupCon never trains the classifier: its rows are noise, so there is no CE term.
    return spec.loss != "supcon"


@dataclass(frozen=True)
class FastFillSettings(Settings):
    """FastFill's settings: the label smoothing of its classification term (paper: 0.1)."""

    smoothing: float = 0.1

    def validate(self) -> None:
        """smoothing in [0, 1)."""
        if not 0 <= self.smoothing < 1:
            raise FCTError(f"setting 'smoothing' must be in [0, 1), got {self.smoothing}")


@register_method("fastfill")
class FastFill(Method):
    """FastFill: FCT's h trained with a classification term and an uncertainty head.

    The gallery is h(old), as FCT's; backfilling re-encodes the most uncertain items first."""

    label = "FastFill"
    report_order = 50
    keeps_new_model = True
    use_side = False
    Settings = FastFillSettings

    def check(self, scenario: Scenario) -> None:
        """fastfill_side needs the scenario's side-information model."""
        if self.use_side and scenario.side is None:
            raise FCTError(
                f"scenario '{scenario.name}' has no side-information model; set side_info = true or use fastfill"
            )

    def fit(self, ctx: Context) -> Deployment:
        self.check(ctx.scenario)
        new = ctx.new_model()
        old = ctx.old_model()
        side = ctx.side_model() if self.use_side else None
        spec = ctx.scenario.transformation
        dims = (
            old.spec.embedding_dim,
            new.spec.embedding_dim,
            side.spec.embedding_dim if side else 0,
        )
        # Initial weights from what the module is, not from the global torch stream, which
        # depends on whether the models above were trained in this process or loaded.
        with isolated_rng(derive_seed("fastfill-init", ctx.seed, spec.as_dict(), *dims)):
            module = UncertainTransformation(*dims, spec.hidden)
        use_ce = _uses_classifier(new.spec)
        weight = new.classifier_weight().clone().to(ctx.device)
        smoothing = self.settings.smoothing
        if use_ce:
            _check_labels(ctx, old, spec.train_on, weight.shape[0])

        def loss(h: nn.Module, o, s, t, labels=None) -> torch.Tensor:
            pred, sigma = h(o, s, with_sigma=True)  # h may be the DDP wrapper: call it
            if not use_ce:
                return fastfill_loss(pred, sigma, t, None, None)
            logits = classifier_logits(new.spec, weight, pred)
            return fastfill_loss(pred, sigma, t, logits, labels, smoothing)

        key = {"method": "fastfill", "smoothing": smoothing, "ce": use_ce, "version": 1}
        h = ctx.transformation(
            new,
            use_side=self.use_side,
            name="fastfill",
            extra_key=key,
            module=module,
            loss=loss,
        )
        order = uncertainty_order(ctx, h.module, self.use_side)
        arts = (old, new, h) + ((side,) if side is not None else ())
        return Deployment(
            query_model=new,
            transformation=h,
            uses_side=self.use_side,
            artifacts=arts,
            backfill_order=order,
            backfill_order_name=ORDER,
        )


def _check_labels(ctx: Context, old, train_on: str, num_classes: int) -> None:
    # Checked once here, not per batch: a per-step .item() would stall GPU training.
    _, labels = ctx.embed(old, Role.training(train_on))
    if labels.numel() and int(labels.max()) >= num_classes:
        raise FCTError(
            f"FastFill: h's training labels go up to {int(labels.max())} but the new classifier "
            f"has {num_classes} classes; train h on the new data (transformation.train_on = 'new')"
        )


@torch.inference_mode()
def gallery_sigma(ctx: Context, module: UncertainTransformation, use_side: bool) -> torch.Tensor:
    """sigma ``[n]`` of every stored gallery item (the evaluation split, in its order)."""
    old_x, _ = ctx.embed(ctx.old_model(), Role.EVAL)
    side_x = ctx.embed(ctx.side_model(), Role.EVAL)[0] if use_side else None
    module.eval().to(ctx.device)
    out = []
    for i in range(0, len(old_x), 4096):
        s = None if side_x is None else side_x[i : i + 4096].to(ctx.device)
        out.append(module.sigma(old_x[i : i + 4096].to(ctx.device), s).float().cpu())
    return torch.cat(out)


def uncertainty_order(
    ctx: Context, module: UncertainTransformation, use_side: bool
) -> torch.Tensor:
    """Gallery indices by decreasing sigma (ties by index): the most uncertain first."""
    return torch.argsort(-gallery_sigma(ctx, module, use_side), stable=True)


@register_method("fastfill_side")
class FastFillSide(FastFill):
    """FastFill with side-information: h(old, ψ) with the uncertainty head."""

    label = "FastFill + side-info"
    report_order = 60
    use_side = True
