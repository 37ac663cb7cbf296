"""Embeddings: a data split embedded by a trained model (sharded under torchrun, cached), a
loader embedded batch by batch, and a transformation applied to stored embeddings."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fct import distributed
from fct.hashing import config_hash
from fct.session import Session, Trained, loader_workers

if TYPE_CHECKING:
    from fct.scenarios import EvalSpec, ModelSpec

# The log lines keep the name they always had ("fct.context: embedding ...").
log = logging.getLogger("fct.context")

EMBED_BATCH = 512


def data_key(spec: ModelSpec | EvalSpec, split: str, size: int | None) -> dict:
    """What determines a split's images: dataset, split, classes, items per class, size."""
    return {
        "dataset": spec.dataset,
        "split": split,
        "classes": spec.classes,
        "max_per_class": spec.max_per_class,
        "image_size": size,
    }


def embedding_key(
    model: Trained,
    spec: ModelSpec | EvalSpec,
    split: str,
    view: int,
    augment: str | None,
    seed: int,
) -> dict:
    """The cache key of ``model``'s embeddings of a split: at the size the model was trained
    at; view v > 0 is the split augmented with ``augment``, draws fixed by (seed, v)."""
    size = getattr(model.spec, "image_size", None)
    key: dict[str, Any] = {"model": model.digest, "data": data_key(spec, split, size)}
    if view:
        key["view"] = {"index": view, "augment": augment, "seed": seed}
    return key


def embed_split(
    session: Session, model: Trained, spec: ModelSpec | EvalSpec, split: str, key: dict
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(features, labels, images per second)`` of ``key`` (see ``embedding_key``): loaded
    from the cache, or embedded (each rank a contiguous shard under torchrun) and stored. The
    speed is the one measured when the entry was built (None for an instant build)."""
    from fct.data import make_loader

    tag = f"-view{key['view']['index']}" if "view" in key else ""
    entry = session.entry("features", f"{model.name}-{spec.dataset}-{split}{tag}", key)

    def build(e):
        # At the model's size; a model without one reads a training split at its spec's size.
        size = key["data"]["image_size"] or getattr(spec, "image_size", None)
        src = session.source(spec.dataset, split, spec.classes, spec.max_per_class, size)
        # Under torchrun each rank embeds a contiguous shard; gathered back in order.
        start, stop = distributed.shard(len(src))
        part = src if (start, stop) == (0, len(src)) else src.subset(range(start, stop))
        view = key.get("view")
        loader = make_loader(
            part,
            EMBED_BATCH,
            shuffle=False,
            seed=view["seed"] if view else 0,
            augment=view["augment"] if view else None,
            epoch=view["index"] if view else 0,
            device=session.device,
            num_workers=loader_workers(src),
        )
        log.info(
            "embedding %s (%d images%s) with %s",
            f"{spec.dataset}/{split}",
            len(src),
            f", {distributed.world()} shards" if distributed.active() else "",
            model.name,
        )
        t0 = time.perf_counter()
        feats = embed_loader(model.module, loader, session.device)
        if session.device.type == "cuda":
            torch.cuda.synchronize()
        feats = distributed.all_gather_rows(feats, len(src))
        dt = time.perf_counter() - t0
        return (
            {"features": feats, "labels": torch.from_numpy(src.labels)},
            {"images_per_s": len(src) / dt if dt > 0 else None, "n": len(src)},
        )

    tensors, meta, _ = session.cache.get_or_build(entry, build)
    return tensors["features"], tensors["labels"], meta.get("images_per_s")


def query_mask(spec: EvalSpec, labels: torch.Tensor) -> torch.Tensor:
    """Which items of the evaluation split are queries under ``spec.query_fraction`` (bool
    ``[N]``; the rest are the gallery). Stratified: in each class of ``c`` items,
    ``round(fraction * c)`` (halves up) become queries, at least one and at most ``c - 1``
    when ``c >= 2`` (a class of one item stays in the gallery). Which ones is a seeded draw
    fixed by the dataset, split, classes, items per class and fraction, not by the run's
    seed: every seed and method sees the same query set."""
    fraction = float(spec.query_fraction)
    y = labels.numpy().astype(np.int64)
    seed = int(config_hash(data_key(spec, spec.split, None) | {"fraction": fraction}), 16)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        items = np.flatnonzero(y == c)
        k = int(np.floor(fraction * len(items) + 0.5))
        k = min(max(k, 1), len(items) - 1) if len(items) >= 2 else 0
        mask[rng.permutation(items)[:k]] = True
    return torch.from_numpy(mask)


@torch.inference_mode()
def embed_loader(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    """Embeddings of every batch of ``loader`` (eval mode, no augmentation), on the CPU."""
    from tqdm import tqdm

    model.eval().to(device)
    out = []
    for x, _ in tqdm(
        loader, desc="embed", leave=False, disable=distributed.quiet(), file=sys.stderr
    ):
        out.append(model.embed(x).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def apply_transformation(
    h: nn.Module,
    old: torch.Tensor,
    side: torch.Tensor | None,
    device: torch.device,
    batch: int = 4096,
) -> tuple[torch.Tensor, float]:
    """h applied to stored embeddings in batches; returns (new gallery, embeddings per second)."""
    h.eval().to(device)
    fast = h.folded() if hasattr(h, "folded") else h
    fast.to(device)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(old), batch):
        s = None if side is None else side[i : i + batch].to(device)
        out.append(fast(old[i : i + batch].to(device), s).float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return torch.cat(out), (len(old) / dt if dt > 0 else float("inf"))
