"""Training the models a Context hands out: backbones (old and new), the side-information
model (SimCLR) and FCT's transformation h, each built once and cached.

Every function takes the run's Session (cache, device, seed, data sources) explicitly. The
cache keys, entry names and initial-weight seeds made here decide which artifact a run reuses:
they must not change unless the artifact does.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from fct import distributed
from fct.errors import FCTError
from fct.provenance import source_digest
from fct.seeding import isolated_rng
from fct.session import Session, Trained, loader_workers
from fct.train import OptimConfig, TrainResult, train

if TYPE_CHECKING:
    from fct.artifacts import Entry
    from fct.context import Context
    from fct.data import BatchLoader
    from fct.scenarios import ModelSpec, TransformationSpec

# The log lines keep the name they always had ("fct.context: training ..."): users and
# tests (test_concurrency) read them.
log = logging.getLogger("fct.context")


@dataclass(frozen=True)
class Batch:
    """One training step of the new model, as an extra loss term sees it."""

    #: The new model's embeddings ``[N, d]`` (with gradients; bf16 under autocast on a GPU).
    embedding: torch.Tensor
    #: The new model's classifier logits ``[N, classes]``.
    logits: torch.Tensor
    #: Class labels ``[N]`` (int64, on the device).
    labels: torch.Tensor
    #: The images ``[N, C, H, W]`` as fed to the new model (augmented, on the device).
    images: torch.Tensor


class ExtraLoss(Protocol):
    """An extra term added to the new model's training loss (how BCT plugs in).

    ``key()`` returns what determines the term (it becomes part of the new model's cache key);
    ``prepare(ctx, model)`` runs once before training; ``__call__(batch)`` returns the term's
    value for a ``Batch`` (embeddings, logits, labels and images of the step), already weighted.
    """

    name: str

    def key(self) -> dict: ...

    def prepare(self, ctx: Context, model: nn.Module) -> None: ...

    def __call__(self, batch: Batch) -> torch.Tensor: ...


# --- names, keys, building blocks ---------------------------------------------------------


def model_name(spec: ModelSpec, tag: str = "") -> str:
    """A backbone's cache entry name: architecture, data, classes, loss, size, tag."""
    classes = f"{spec.classes[0]}-{spec.classes[1] - 1}" if spec.classes else "all"
    return f"{spec.arch}-{spec.dataset}-{classes}-{spec.loss}-{spec.embedding_dim}{tag}"


def model_key(spec: ModelSpec, seed: int, extra: dict | None = None) -> dict:
    """A backbone's cache key: its spec, the run's seed, the extra loss term's key."""
    return {"spec": spec.as_dict(), "seed": seed, "extra": extra, "trainer": 1}


def optim(spec: ModelSpec) -> OptimConfig:
    """The optimiser settings of a model spec."""
    return OptimConfig(
        spec.optimizer, spec.lr, spec.momentum, spec.weight_decay, spec.epochs, spec.warmup_epochs
    )


def train_source(session: Session, spec: ModelSpec):
    """A model spec's training data, at its image size."""
    return session.source(spec.dataset, "train", spec.classes, spec.max_per_class, spec.image_size)


def train_loader(
    session: Session,
    spec: ModelSpec,
    augment: str | None,
    epoch: int = 0,
    shuffle: bool = True,
) -> BatchLoader:
    """A seeded training loader over ``spec``'s data.

    ``spec.batch_size`` is the global batch: under torchrun each rank gets its share of
    every batch (the same global batches as one process, split; see fct.data.loader).
    """
    from fct.data import make_loader

    src = train_source(session, spec)
    return make_loader(
        src,
        distributed.local_batch(spec.batch_size, model_name(spec)),
        shuffle=shuffle,
        seed=session.seed,
        augment=augment,
        device=session.device,
        drop_last=len(src) > spec.batch_size,
        epoch=epoch,
        num_workers=loader_workers(src),
        rank=distributed.rank(),
        world=distributed.world(),
    )


def num_classes(session: Session, spec: ModelSpec) -> int:
    """Classifier outputs: labels keep their dataset ids, so it spans ids 0..end-1."""
    return spec.classes[1] if spec.classes else train_source(session, spec).num_classes


def build_model(session: Session, spec: ModelSpec, classes: int) -> nn.Module:
    """An untrained EmbeddingModel for ``spec`` (initial weights from the global stream)."""
    from fct.models import EmbeddingModel

    src = train_source(session, spec)
    return EmbeddingModel(
        spec.arch,
        spec.embedding_dim,
        classes,
        in_chans=src.channels,
        image_size=src.image_size,
        embed_act=spec.embed_act,
        arch_args=dict(spec.arch_args),
        small_stem=spec.small_stem,
    )


def load_or_train(
    session: Session,
    entry: Entry,
    module: nn.Module,
    fit: Callable[[Entry], TrainResult],
    spec: Any,
) -> Trained:
    """``module`` with the weights of ``entry``: loaded from the cache, or trained by ``fit``
    and stored (rebuilt once per run under ``--force``)."""
    force = session.claim_force(entry.digest)

    def build(e: Entry):
        log.info("training %s/%s (cache %s)", e.kind, e.name, e.path)
        result = fit(e)
        return module.state_dict(), {
            "train_seconds": result.seconds,
            "resumed_from": result.resumed_from,
            "final_loss": result.last_loss,
            "images_per_s": result.images_per_s,
        }

    tensors, meta, built = session.cache.get_or_build(entry, build, force=force)
    if not built:
        module.load_state_dict(tensors)
        log.info("loaded %s/%s from the cache", entry.kind, entry.name)
    module.to(session.device).eval()
    return Trained(module, entry, float(meta.get("train_seconds", 0.0)), spec, built)


def fit_on_images(
    session: Session,
    model: nn.Module,
    spec: ModelSpec,
    augment: str | None,
    e: Entry,
    step: Callable[[Any, nn.Module], torch.Tensor],
    views: int = 1,
) -> TrainResult:
    """Train ``model`` on ``spec``'s images with ``step`` (fct.train.train), checkpointing
    into the entry's partial folder; ``views`` images per item (2 for SimCLR's pairs)."""
    loader = train_loader(session, spec, augment)

    def batches(epoch: int):
        loader.set_epoch(epoch)
        return loader

    if session.device.type == "cuda":
        model.to(session.device, memory_format=torch.channels_last)
    return train(
        model,
        step,
        batches,
        len(loader),
        optim(spec),
        device=session.device,
        seed=session.seed,
        desc=e.name,
        checkpoint_dir=e.partial,
        items_per_batch=lambda b: views * len(b[1]),
        sync_bn=session.sync_bn,
    )


# --- the models ---------------------------------------------------------------------------


def train_backbone(
    session: Session,
    spec: ModelSpec,
    entry: Entry,
    extra: ExtraLoss | None = None,
    ctx: Context | None = None,
) -> Trained:
    """An old or new model trained with its spec's loss, plus ``extra``'s term (prepared with
    ``ctx``, the Context the method asked through)."""
    from fct.losses import make_loss

    if spec.weights is not None:
        if extra is not None:
            raise FCTError(
                f"{extra.name} trains the new model, whose weights are given "
                f"({spec.weights}); drop the method or the model's weights"
            )
        return load_pretrained(session, spec)
    with isolated_rng(session.init_seed(spec.as_dict())):
        model = build_model(session, spec, num_classes(session, spec))
    device = session.device

    def fit(e: Entry) -> TrainResult:
        loss_fn = make_loss(spec.loss, **dict(spec.loss_args))
        if extra is not None:
            extra.prepare(ctx, model)

        def step(batch, net: nn.Module) -> torch.Tensor:
            x, y = batch
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            emb, logits = net(x)
            loss = loss_fn(emb, logits, y, model.classifier.weight)
            if extra is not None:
                loss = loss + extra(Batch(emb, logits, y, x))
            return loss

        return fit_on_images(session, model, spec, spec.augment, e, step)

    return load_or_train(session, entry, model, fit, spec)


def train_side(session: Session, spec: ModelSpec) -> Trained:
    """The side-information model ψ: SimCLR on ``spec``'s data, labels unused."""
    from fct.losses import nt_xent
    from fct.models import SimCLRModel

    if spec.weights is not None:
        return load_pretrained(session, spec, side=True)

    with isolated_rng(session.init_seed(spec.as_dict())):
        model = SimCLRModel(build_model(session, spec, 1), spec.embedding_dim)
    # SimCLR never uses the encoder's classifier: frozen, neither the optimizer nor DDP
    # handle it (it never moved anyway: a parameter without gradient is skipped).
    model.encoder.classifier.requires_grad_(False)
    temperature = float(dict(spec.loss_args).get("temperature", 0.1))
    entry = session.entry("models", model_name(spec), model_key(spec, session.seed))

    def fit(e: Entry) -> TrainResult:
        def step(batch, net: nn.Module) -> torch.Tensor:
            (x1, x2), _ = batch  # labels are never used
            z = net(torch.cat([x1, x2]))
            return nt_xent(z[: len(x1)], z[len(x1) :], temperature)

        return fit_on_images(session, model, spec, "simclr", e, step, views=2)

    return load_or_train(session, entry, model, fit, spec)


def train_transformation(
    session: Session,
    ctx: Context,
    spec: TransformationSpec,
    models: tuple[Trained, Trained, Trained | None],
    name: str = "h",
    extra_key: dict | None = None,
    module: nn.Module | None = None,
    loss: Callable | None = None,
) -> Trained:
    """FCT's h (or a method's own ``module`` and ``loss``) from ``models`` = (old, new, side),
    fitted on the batches fct.h_data draws through ``ctx``; see ``Context.transformation``."""
    from fct.losses import transformation_loss
    from fct.models import Transformation

    old, new, side = models
    if loss is not None or module is not None:  # a method's own h: its source is key
        extra_key = {**(extra_key or {}), "source": source_digest(loss or type(module))}
    key = {
        "h": spec.as_dict(),
        "old": old.digest,
        "new": new.digest,
        "side": side.digest if side else None,
        "seed": session.seed,
        "extra": extra_key,
        "trainer": 1,
    }
    d_side = side.spec.embedding_dim if side else 0
    d_old, d_new = old.spec.embedding_dim, new.spec.embedding_dim
    with isolated_rng(session.init_seed(spec.as_dict(), d_old, d_new, d_side)):
        h = module or Transformation(d_old, d_new, d_side, spec.hidden)
    entry = session.entry("transformations", f"{name}-{new.name}{'-side' if side else ''}", key)

    wants_labels = loss is not None and accepts_labels(loss)

    def fit(e: Entry) -> TrainResult:
        from fct.h_data import h_batches

        batches, steps = h_batches(ctx, spec, models, wants_labels, e.name)
        freeze_at = int(spec.epochs * (1 - spec.freeze_bn_fraction))

        def step(batch, net: nn.Module) -> torch.Tensor:
            o, s, t, labels = batch
            if loss is not None:
                # ``net`` is h, or its DDP wrapper under torchrun: a custom loss calls it.
                return loss(net, o, s, t, labels=labels) if wants_labels else loss(net, o, s, t)
            return transformation_loss(net(o, s), t)

        def on_epoch(epoch: int) -> None:
            if epoch >= freeze_at and hasattr(h, "freeze_bn"):
                h.freeze_bn()

        cfg = OptimConfig("adam", spec.lr, 0.0, spec.weight_decay, spec.epochs, spec.warmup_epochs)
        return train(
            h,
            step,
            batches,
            steps,
            cfg,
            device=session.device,
            seed=session.seed,
            desc=e.name,
            checkpoint_dir=e.partial,
            on_epoch_start=on_epoch,
            items_per_batch=lambda b: len(b[0]),
        )

    return load_or_train(session, entry, h, fit, spec)


def accepts_labels(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``labels`` keyword (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "labels" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )


# --- given weights (fct.pretrained) ---------------------------------------------------------


def pretrained_module(session: Session, spec: ModelSpec, side: bool, classes: int) -> nn.Module:
    """The untrained module ``spec`` describes, seeded as a training run would seed it (an
    EmbeddingModel, or SimCLR's wrapper around one for side-information)."""
    from fct.models import SimCLRModel

    with isolated_rng(session.init_seed(spec.as_dict())):
        model = build_model(session, spec, classes)
        return SimCLRModel(model, spec.embedding_dim) if side else model


def _pretrained_classes(session: Session, spec: ModelSpec, side: bool) -> int:
    from fct import pretrained

    if not pretrained.is_timm(spec):
        return pretrained.file_classes(spec, side)  # the file's classifier, whatever the spec's
    return 1 if side else num_classes(session, spec)


def check_weights(session: Session, spec: ModelSpec, side: bool) -> None:
    """Refuse, before anything trains, weights that cannot be loaded into the model ``spec``
    describes (one line): a missing or unreadable file, a tensor of another shape, a timm tag
    with downloads off. Reads a file's header only."""
    from fct import pretrained

    if spec.weights is None:
        return
    if pretrained.is_timm(spec):
        pretrained.check_download(spec)
        return
    shapes = pretrained.file_shapes(spec.weights)
    module = pretrained_module(session, spec, side, _pretrained_classes(session, spec, side))
    pretrained.check_fit(spec, shapes, {k: tuple(v.shape) for k, v in module.state_dict().items()})


def load_pretrained(session: Session, spec: ModelSpec, side: bool = False) -> Trained:
    """The model ``spec`` describes, with its given ``weights``, through the cache: nothing is
    trained; the entry's key is the spec with the weights' identity (fct.pretrained)."""
    from fct import pretrained

    classes = _pretrained_classes(session, spec, side)
    module = pretrained_module(session, spec, side, classes)
    key = {"pretrained": spec.as_dict(), "classes": classes, "format": 1}
    if pretrained.is_timm(spec):  # the head keeps its seeded initial weights
        key["head_seed"] = session.init_seed(spec.as_dict())
    entry = session.entry("models", model_name(spec, "-pretrained"), key)

    def build(e: Entry):
        log.info(
            "loading %s for %s/%s (nothing trained; cache %s)", spec.weights, e.kind, e.name, e.path
        )
        pretrained.fill(module, spec, side)
        return module.state_dict(), {"train_seconds": 0.0, "weights": spec.weights}

    force = session.claim_force(entry.digest)
    tensors, _, built = session.cache.get_or_build(entry, build, force=force)
    if not built:
        module.load_state_dict(tensors)
        log.info("loaded %s/%s from the cache", entry.kind, entry.name)
    module.to(session.device).eval()
    return Trained(module, entry, 0.0, spec, built)
