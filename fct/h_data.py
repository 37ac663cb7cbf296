"""The batches FCT's transformation h is fitted on: (old, side, new, labels) embeddings.

Two ways, chosen by ``[transformation] features``:

- ``"cached"``: the training set embedded once per *view* and cached. ``views = 1`` is one
  un-augmented view (the cheapest); ``views = K > 1`` is K augmented views (the augmentation
  the data's model spec trains with, drawn from the run's seed), epoch e fitting on view
  e mod K: each epoch costs what one view costs, and h sees K augmentations of every image.
- ``"online"``: the reference's way (apple/ml-fct): every step takes a freshly augmented batch
  of training images and embeds it with the frozen old, new and side models.

Every path yields the same 4-tuples ``(old [B, d_old], side [B, d_side] | None,
new [B, d_new], labels [B] | None)`` on the context's device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fct import distributed
from fct.seeding import derive_seed
from fct.session import Role

if TYPE_CHECKING:
    from fct.context import Context
    from fct.scenarios import TransformationSpec
    from fct.session import Trained

#: One step of h's fit: (old, side, new, labels) embeddings on the device.
HBatch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def h_batches(
    ctx: Context,
    spec: TransformationSpec,
    models: tuple[Trained, Trained, Trained | None],
    with_labels: bool,
    name: str,
) -> tuple[Callable[[int], Iterator[HBatch]], int]:
    """``(batches(epoch), steps per epoch)`` for fitting h; ``models`` = (old, new, side)."""
    if spec.features == "online":
        return _online(ctx, spec, models, with_labels)
    return _cached(ctx, spec, models, with_labels, name)


def cached_views(spec: TransformationSpec) -> list[int]:
    """The view indices a cached fit uses: [0] (un-augmented) or 1..K (augmented)."""
    return [0] if spec.views == 1 else list(range(1, spec.views + 1))


def _cached(
    ctx: Context,
    spec: TransformationSpec,
    models: tuple[Trained, Trained, Trained | None],
    with_labels: bool,
    name: str,
) -> tuple[Callable[[int], Iterator[HBatch]], int]:
    old, new, side = models
    data = Role.training(spec.train_on)
    views = cached_views(spec)

    def view(v: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x_old, y = ctx.embed(old, data, view=v)
        x_side = ctx.embed(side, data, view=v)[0] if side else None
        return x_old, x_side, ctx.embed(new, data, view=v)[0], y

    n = len(view(views[0])[0])
    bs = min(spec.batch_size, n)
    steps = max(1, n // bs)
    # Under torchrun rank r trains on the r-th slice of every global batch.
    local = distributed.local_batch(bs, name)
    lo = distributed.rank() * local
    dev = ctx.device

    def batches(epoch: int) -> Iterator[HBatch]:
        x_old, x_side, x_new, y = view(views[epoch % len(views)])
        gen = torch.Generator().manual_seed(derive_seed("h-batches", ctx.seed, epoch))
        perm = torch.randperm(n, generator=gen)
        for i in range(steps):
            idx = perm[i * bs : (i + 1) * bs][lo : lo + local]
            yield (
                x_old[idx].to(dev),
                None if x_side is None else x_side[idx].to(dev),
                x_new[idx].to(dev),
                y[idx].to(dev) if with_labels else None,
            )

    return batches, steps


def _online(
    ctx: Context,
    spec: TransformationSpec,
    models: tuple[Trained, Trained, Trained | None],
    with_labels: bool,
) -> tuple[Callable[[int], Iterator[HBatch]], int]:
    old, new, side = models
    data_spec = ctx.scenario.new if spec.train_on == "new" else ctx.scenario.old
    loader = ctx.loader(
        dataclasses.replace(data_spec, batch_size=spec.batch_size), data_spec.augment
    )

    def batches(epoch: int) -> Iterator[HBatch]:
        loader.set_epoch(epoch)
        for x, y in loader:
            yield (
                _embed_at(old, x),
                _embed_at(side, x) if side is not None else None,
                _embed_at(new, x),
                y.to(ctx.device) if with_labels else None,
            )

    return batches, len(loader)


@torch.no_grad()
def _embed_at(model: Trained, x: torch.Tensor) -> torch.Tensor:
    """``model``'s embeddings of a batch, the images resized to the size it was trained at."""
    size: Any = getattr(model.spec, "image_size", None)
    if size and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return model.module.eval().embed(x).float()
