"""Training losses: backbone losses by name, BCT's influence loss, NT-Xent, h's MSE.

Shapes: N items per batch, d embedding size, C classes. Labels are int64 ``[N]``.

Backbone losses live in ``LOSSES``; each entry is a factory ``make(**kwargs)`` returning
``loss(embedding [N, d], logits [N, C], labels [N], classifier_weight [C, d]) -> scalar``,
so the trainer calls every loss the same way whatever it uses.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fct.errors import FCTError
from fct.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES: Registry[Callable[..., LossFn]] = Registry("loss", hint="fct list losses")


def _register_loss(name: str) -> Callable[[Callable[..., LossFn]], Callable[..., LossFn]]:
    """Register a loss factory; the registered ``make(**kwargs)`` rejects unknown arguments.

    Loss arguments come from suite files, so a typo must say which arguments exist rather
    than surface as a TypeError.
    """

    def deco(factory: Callable[..., LossFn]) -> Callable[..., LossFn]:
        allowed = list(inspect.signature(factory).parameters)

        @functools.wraps(factory)
        def make(**kwargs: float) -> LossFn:
            unknown = sorted(set(kwargs) - set(allowed))
            if unknown:
                raise FCTError(
                    f"loss '{name}' got unknown argument(s) {', '.join(unknown)}; "
                    f"allowed: {', '.join(allowed) or 'none'}"
                )
            return factory(**kwargs)

        LOSSES.register(name)(make)
        return make

    return deco


def make_loss(name: str, **kwargs: float) -> LossFn:
    """The backbone loss registered as ``name``, built with ``kwargs`` (see LOSSES)."""
    return LOSSES.get(name)(**kwargs)


def _check_range(name: str, value: float, low: float, high: float = math.inf) -> float:
    # Closed at low, open at high: smoothing 1.0 or temperature 0 make the loss meaningless.
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value < high:
        bound = f"in [{low}, {high})" if high != math.inf else f">= {low}"
        raise FCTError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    _check_range(name, value, 0.0)
    if value == 0:
        raise FCTError(f"{name} must be > 0, got {value!r}")
    return float(value)


def _cosine(embedding: torch.Tensor, classifier_weight: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[N, C]`` of embeddings to classifier rows (both L2-normalised)."""
    if embedding.ndim != 2 or classifier_weight.ndim != 2:
        raise FCTError("cosine-margin losses expect embeddings [N, d] and a weight [C, d]")
    if embedding.shape[1] != classifier_weight.shape[1]:
        raise FCTError(
            f"embedding size {embedding.shape[1]} does not match the classifier's "
            f"{classifier_weight.shape[1]}"
        )
    return F.linear(F.normalize(embedding, dim=1), F.normalize(classifier_weight, dim=1))


def cosface_loss(
    embedding: torch.Tensor,
    classifier_weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 30.0,
    margin: float = 0.35,
) -> torch.Tensor:
    """CosFace (Wang et al. 2018): cross-entropy on ``scale * (cos - margin [target])``.

    embedding ``[N, d]``, classifier_weight ``[C, d]`` (bias-free classifier), labels ``[N]``.
    """
    cos = _cosine(embedding, classifier_weight)
    target = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(scale * (cos - margin * target), labels)


def arcface_loss(
    embedding: torch.Tensor,
    classifier_weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 30.0,
    margin: float = 0.5,
) -> torch.Tensor:
    """ArcFace (Deng et al. 2019): cross-entropy on ``scale * cos(theta + margin [target])``.

    Where theta + margin would pass pi, cos(theta + m) stops decreasing in theta; there the
    target logit is ``cos - m sin(m)`` instead (the usual InsightFace fallback), which keeps
    the loss monotonic. Shapes as cosface_loss.
    """
    # Clamp away from +-1: sin = sqrt(1 - cos^2) has an infinite gradient there.
    cos = _cosine(embedding, classifier_weight).clamp(-1 + 1e-7, 1 - 1e-7)
    index = labels.unsqueeze(1)
    cos_t = cos.gather(1, index)
    sin_t = torch.sqrt(1 - cos_t * cos_t)
    shifted = cos_t * math.cos(margin) - sin_t * math.sin(margin)
    fallback = cos_t - math.sin(math.pi - margin) * margin
    target = torch.where(cos_t > math.cos(math.pi - margin), shifted, fallback)
    return F.cross_entropy(scale * cos.scatter(1, index, target), labels)


def supcon_loss(
    embedding: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on one view per item.

    embedding ``[N, d]`` (L2-normalised here), labels ``[N]``. For each anchor i with at least
    one other same-class item: mean over positives p of ``-log softmax_{a != i}(z_i.z_a / t)[p]``;
    averaged over those anchors. The original's extra ``t / base_t`` factor is left out
    (it is 1 at its defaults). A batch with no positive pair gives 0.
    """
    z = F.normalize(embedding, dim=1)
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(self_mask, -math.inf)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    n_pos = positive.sum(1)
    # where(), not multiplication: the diagonal is -inf and -inf * 0 is nan.
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(1) / n_pos.clamp_min(1)
    has_pos = (n_pos > 0).to(per_anchor.dtype)
    # No .any()/.item(): a host sync per step would stall GPU training.
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)


@_register_loss("ce")
def _make_ce(smoothing: float = 0.1) -> LossFn:
    """Cross-entropy on the classifier's logits with label smoothing (reference: 0.1)."""
    smoothing = _check_range("smoothing", smoothing, 0.0, 1.0)

    def loss(embedding, logits, labels, classifier_weight):
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)

    return loss


@_register_loss("cosface")
def _make_cosface(scale: float = 30.0, margin: float = 0.35) -> LossFn:
    """CosFace on normalised embeddings and classifier rows (see cosface_loss)."""
    scale = _check_positive("scale", scale)
    margin = _check_range("margin", margin, 0.0)

    def loss(embedding, logits, labels, classifier_weight):
        return cosface_loss(embedding, classifier_weight, labels, scale, margin)

    return loss


@_register_loss("arcface")
def _make_arcface(scale: float = 30.0, margin: float = 0.5) -> LossFn:
    """ArcFace on normalised embeddings and classifier rows (see arcface_loss)."""
    scale = _check_positive("scale", scale)
    margin = _check_range("margin", margin, 0.0, math.pi / 2)

    def loss(embedding, logits, labels, classifier_weight):
        return arcface_loss(embedding, classifier_weight, labels, scale, margin)

    return loss


@_register_loss("supcon")
def _make_supcon(temperature: float = 0.1) -> LossFn:
    """Supervised contrastive loss on normalised embeddings (see supcon_loss)."""
    temperature = _check_positive("temperature", temperature)

    def loss(embedding, logits, labels, classifier_weight):
        return supcon_loss(embedding, labels, temperature)

    return loss


# --------------------------------------------------------------------------------------------
# BCT
# --------------------------------------------------------------------------------------------


def check_bct_dims(d_old: int, d_new: int) -> None:
    """Raise FCTError unless BCT can run: the old classifier must accept new embeddings."""
    if d_old != d_new:
        raise FCTError(
            f"BCT needs equal old and new embedding sizes (old {d_old}, new {d_new}); "
            "use fct or fct_side for cross-dimension scenarios"
        )


def bct_influence_loss(
    new_embedding: torch.Tensor,
    old_classifier_weight_extended: torch.Tensor,
    labels: torch.Tensor,
    smoothing: float = 0.1,
) -> torch.Tensor:
    """BCT's influence loss (Shen et al. 2020): the new embedding through the old classifier.

    new_embedding ``[N, d]``, old_classifier_weight_extended ``[C, d]`` (frozen old classifier
    with rows synthesised for new classes, see synthesize_old_classifier), labels ``[N]``.
    Returns label-smoothed cross-entropy of ``new_embedding @ W_ext.T``. Gradients reach the
    new model only; pass a detached weight so the old classifier stays frozen.
    """
    check_bct_dims(old_classifier_weight_extended.shape[-1], new_embedding.shape[-1])
    logits = new_embedding @ old_classifier_weight_extended.T
    return F.cross_entropy(logits, labels, label_smoothing=smoothing)


@torch.no_grad()
def synthesize_old_classifier(
    old_weight: torch.Tensor,
    old_embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """The old classifier extended to ``num_classes`` rows, as BCT does for new classes.

    old_weight ``[C_old, d]``: the frozen old classifier; old_embeddings ``[N, d]``: the old
    model's embeddings of the new training set; labels ``[N]``. Rows ``0..C_old-1`` are copied
    from old_weight; row c >= C_old is the mean old embedding of class c's items (a class
    with no items gets zeros and a warning). Returns a detached ``[num_classes, d]`` tensor
    with old_weight's dtype and device.
    """
    c_old, d = old_weight.shape
    if old_embeddings.ndim != 2 or old_embeddings.shape[1] != d:
        raise FCTError(
            f"old embeddings must be [N, {d}] to match the old classifier, "
            f"got {tuple(old_embeddings.shape)}"
        )
    if labels.shape != old_embeddings.shape[:1]:
        raise FCTError(
            f"need one label per embedding, got {tuple(labels.shape)} labels for "
            f"{old_embeddings.shape[0]} embeddings"
        )
    if num_classes < c_old:
        raise FCTError(f"num_classes ({num_classes}) is below the old classifier's {c_old}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise FCTError(f"labels must lie in [0, {num_classes}) for {num_classes} classes")

    out = old_weight.new_zeros(num_classes, d)
    out[:c_old] = old_weight
    n_new = num_classes - c_old
    if n_new == 0:
        return out
    is_new = labels >= c_old
    new_labels = (labels[is_new] - c_old).to(old_weight.device)
    new_embeddings = old_embeddings[is_new].to(old_weight.device, torch.float64)
    # float64 sums: a class mean over thousands of items should not drift.
    sums = torch.zeros(n_new, d, dtype=torch.float64, device=old_weight.device)
    sums.index_add_(0, new_labels, new_embeddings)
    counts = torch.bincount(new_labels, minlength=n_new)
    empty = (counts == 0).nonzero().flatten() + c_old
    if empty.numel():
        shown = ", ".join(str(c) for c in empty[:10].tolist())
        more = f" and {empty.numel() - 10} more" if empty.numel() > 10 else ""
        warnings.warn(
            f"BCT: classes {shown}{more} have no training items; their synthesised old "
            "classifier rows are zero",
            stacklevel=2,
        )
    out[c_old:] = (sums / counts.clamp_min(1).unsqueeze(1)).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Side-information (SimCLR) and the transformation
# --------------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020) for two views ``[B, d]`` of the same B items.

    The 2B projections are L2-normalised; each is classified among the other 2B - 1 by
    cosine / temperature, its positive being the other view of the same item. Returns the
    mean cross-entropy over all 2B.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise FCTError(
            f"nt_xent needs two views of equal shape [B, d], got {tuple(z1.shape)} "
            f"and {tuple(z2.shape)}"
        )
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), -math.inf)
    index = torch.arange(b, device=z.device)
    targets = torch.cat([index + b, index])
    return F.cross_entropy(sim, targets)


def transformation_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FCT's loss for h: mean squared error over all elements of ``[N, d_new]``."""
    if pred.shape != target.shape:
        raise FCTError(
            f"h's output {tuple(pred.shape)} does not match the new embeddings "
            f"{tuple(target.shape)}"
        )
    return F.mse_loss(pred, target)
