"""What a compatibility method is handed: trained models, data, embeddings, all cached.

A method never trains or saves anything itself; it asks the Context, which builds each
artifact once (keyed by everything that determines it) and loads it on every later request,
in this process or a later run. Artifacts shared by several scenarios of a suite (one old
model, one side-information model) therefore train once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fct import distributed
from fct.artifacts import Cache, Entry
from fct.errors import FCTError
from fct.models.simclr import SimCLRModel
from fct.provenance import source_digest
from fct.scenarios import EvalSpec, ModelSpec, Scenario, TransformationSpec, config_hash
from fct.train import OptimConfig, TrainResult, isolated_rng, train

log = logging.getLogger(__name__)

EMBED_BATCH = 512


def loader_workers() -> int:
    """DataLoader workers per process for folder datasets: this node's cores shared by its
    ranks, at least 2 and at most 8 each."""
    import os

    return max(2, min(8, (os.cpu_count() or 4) // distributed.local_world()))


class ExtraLoss(Protocol):
    """An extra term added to the new model's training loss (how BCT plugs in).

    ``key()`` returns what determines the term (it becomes part of the new model's cache key);
    ``prepare(ctx, model)`` runs once before training; ``__call__`` returns the term's value
    for a batch, already weighted.

    A term that needs the batch's images (e.g. to embed them with the frozen old model, as RACT
    and L2-BCT do) sets the class attribute ``wants_images = True``; it is then called with
    the images as the keyword argument ``x`` (as fed to the new model: augmented, on the
    device). Terms without the attribute are called with the three arguments only.
    """

    name: str

    def key(self) -> dict: ...

    def prepare(self, ctx: Context, model: nn.Module) -> None: ...

    def __call__(
        self, embedding: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class Trained:
    """A trained, cached model with the key that identifies it."""

    module: nn.Module
    entry: Entry
    train_seconds: float
    spec: Any
    built_now: bool

    @property
    def digest(self) -> str:
        """Cache digest: changes whenever anything that determines the model changes."""
        return self.entry.digest

    @property
    def name(self) -> str:
        """Human-readable artifact name."""
        return self.entry.name


def _optim(spec: ModelSpec) -> OptimConfig:
    return OptimConfig(
        spec.optimizer, spec.lr, spec.momentum, spec.weight_decay, spec.epochs, spec.warmup_epochs
    )


@dataclass
class Context:
    """Everything a method may use for one scenario; every artifact goes through the cache."""

    scenario: Scenario
    cache: Cache
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    data_root: str | None = None
    download: bool = False
    force: bool = False
    sync_bn: bool = False
    _sources: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)
    _forced: set = field(default_factory=set, repr=False)

    # --- data ---------------------------------------------------------------------------

    def source(self, spec: ModelSpec | EvalSpec, split: str = "train", size: int | None = None):
        """The ImageSource of a model spec's training data, or of the evaluation split.

        Images come at ``size``, else the model spec's ``image_size``, else the native size.
        """
        from fct.data import load_dataset

        if isinstance(spec, EvalSpec):
            split = spec.split
        size = size or (spec.image_size if isinstance(spec, ModelSpec) else None)
        key = (spec.dataset, split, spec.classes, spec.max_per_class, size)
        if key not in self._sources:
            src = load_dataset(
                spec.dataset,
                split,
                root=self.data_root,
                classes=spec.classes,
                max_per_class=spec.max_per_class,
                download=self.download,
            )
            self._sources[key] = src.resized(size) if size else src
        return self._sources[key]

    def eval_source(self):
        """The evaluation split (queries and gallery)."""
        return self.source(self.scenario.eval)

    def loader(self, spec: ModelSpec, augment: str | None, epoch: int = 0, shuffle: bool = True):
        """A seeded training loader over ``spec``'s data.

        ``spec.batch_size`` is the global batch: under torchrun each rank gets its share of
        every batch (the same global batches as one process, split; see fct.data.loader).
        """
        from fct.data import make_loader

        src = self.source(spec)
        return make_loader(
            src,
            distributed.local_batch(spec.batch_size, self._model_name(spec)),
            shuffle=shuffle,
            seed=self.seed,
            augment=augment,
            device=self.device,
            drop_last=len(src) > spec.batch_size,
            epoch=epoch,
            num_workers=loader_workers() if src.images is None else 0,
            rank=distributed.rank(),
            world=distributed.world(),
        )

    def _data_key(self, spec: ModelSpec | EvalSpec, split: str, size: int | None) -> dict:
        return {
            "dataset": spec.dataset,
            "split": split,
            "classes": spec.classes,
            "max_per_class": spec.max_per_class,
            "image_size": size,
        }

    # --- models ---------------------------------------------------------------------------

    def _num_classes(self, spec: ModelSpec) -> int:
        # Labels keep their dataset ids, so the classifier spans ids 0..end-1.
        return spec.classes[1] if spec.classes else self.source(spec).num_classes

    def _build_model(self, spec: ModelSpec, num_classes: int) -> nn.Module:
        from fct.models import EmbeddingModel

        src = self.source(spec)
        return EmbeddingModel(
            spec.arch,
            spec.embedding_dim,
            num_classes,
            in_chans=src.channels,
            image_size=src.image_size,
            embed_act=spec.embed_act,
            arch_args=dict(spec.arch_args),
            small_stem=spec.small_stem,
        )

    def _init_seed(self, *what: Any) -> int:
        """The torch seed for a module's initial weights: from what it is and the run's seed.

        Seeding each module from its own description, not from whatever the global stream holds
        by then, gives it the same initial weights whichever artifacts this process trained or
        loaded before it (an interrupted and resumed run, a ``--methods`` subset).
        """
        return int(config_hash({"init": list(what), "seed": self.seed}), 16)

    def _entry(self, kind: str, name: str, key: dict) -> Entry:
        return self.cache.entry(kind, name, key)

    def _load_or_train(
        self, entry: Entry, module: nn.Module, fit: Callable[[Entry], TrainResult], spec: Any
    ) -> Trained:
        force = self.force and entry.digest not in self._forced
        self._forced.add(entry.digest)

        def build(e: Entry):
            log.info("training %s/%s (cache %s)", e.kind, e.name, e.path)
            result = fit(e)
            return module.state_dict(), {
                "train_seconds": result.seconds,
                "resumed_from": result.resumed_from,
                "final_loss": result.last_loss,
                "images_per_s": result.images_per_s,
            }

        tensors, meta, built = self.cache.get_or_build(entry, build, force=force)
        if not built:
            module.load_state_dict(tensors)
            log.info("loaded %s/%s from the cache", entry.kind, entry.name)
        module.to(self.device).eval()
        return Trained(module, entry, float(meta.get("train_seconds", 0.0)), spec, built)

    def _model_name(self, spec: ModelSpec, tag: str = "") -> str:
        classes = f"{spec.classes[0]}-{spec.classes[1] - 1}" if spec.classes else "all"
        return f"{spec.arch}-{spec.dataset}-{classes}-{spec.loss}-{spec.embedding_dim}{tag}"

    def _model_key(self, spec: ModelSpec, extra: dict | None = None) -> dict:
        return {"spec": spec.as_dict(), "seed": self.seed, "extra": extra, "trainer": 1}

    def _train_backbone(
        self, spec: ModelSpec, entry: Entry, extra: ExtraLoss | None = None
    ) -> Trained:
        from fct.losses import make_loss

        with isolated_rng(self._init_seed(spec.as_dict())):
            model = self._build_model(spec, self._num_classes(spec))

        def fit(e: Entry) -> TrainResult:
            loss_fn = make_loss(spec.loss, **dict(spec.loss_args))
            if extra is not None:
                extra.prepare(self, model)

            def step(batch, net: nn.Module) -> torch.Tensor:
                x, y = batch
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                emb, logits = net(x)
                loss = loss_fn(emb, logits, y, model.classifier.weight)
                if extra is not None:
                    # Only terms that ask for the images get them: older ExtraLoss
                    # implementations take exactly (embedding, logits, labels).
                    images = {"x": x} if getattr(extra, "wants_images", False) else {}
                    loss = loss + extra(emb, logits, y, **images)
                return loss

            return self._fit_on_images(model, spec, spec.augment, e, step)

        return self._load_or_train(entry, model, fit, spec)

    def _fit_on_images(
        self,
        model: nn.Module,
        spec: ModelSpec,
        augment: str | None,
        e: Entry,
        step: Callable[[Any, nn.Module], torch.Tensor],
        views: int = 1,
    ) -> TrainResult:
        """Train ``model`` on ``spec``'s images with ``step`` (fct.train.train), checkpointing
        into the entry's partial folder; ``views`` images per item (2 for SimCLR's pairs)."""
        loader = self.loader(spec, augment)

        def batches(epoch: int):
            loader.set_epoch(epoch)
            return loader

        if self.device.type == "cuda":
            model.to(self.device, memory_format=torch.channels_last)
        return train(
            model,
            step,
            batches,
            len(loader),
            _optim(spec),
            device=self.device,
            seed=self.seed,
            desc=e.name,
            checkpoint_dir=e.partial,
            items_per_batch=lambda b: views * len(b[1]),
            sync_bn=self.sync_bn,
        )

    def old_model(self) -> Trained:
        """The old model φ_old, trained on the old data with the old loss."""
        spec = self.scenario.old
        return self._memoized(
            ("model", spec),
            lambda: self._train_backbone(
                spec, self._entry("models", self._model_name(spec), self._model_key(spec))
            ),
        )

    def new_model(self, extra: ExtraLoss | None = None, tag: str | None = None) -> Trained:
        """The new model φ_new; with ``extra`` its training loss gains that term (e.g. BCT).

        ``tag`` names the model's cache entry (default: the term's name); methods pass their
        run name, so a suite's variants (``bct_scaled``) get entries of their own names."""
        spec = self.scenario.new
        # A method's own loss term: its source file is part of the model's key, so editing
        # the method retrains the models it shaped (and nothing else).
        extra_key = (
            None
            if extra is None
            else {"name": extra.name, **extra.key(), "source": source_digest(type(extra))}
        )
        tag = "" if extra is None else f"-{tag or extra.name}"
        return self._memoized(
            ("model", spec, str(extra_key)),
            lambda: self._train_backbone(
                spec,
                self._entry(
                    "models", self._model_name(spec, tag), self._model_key(spec, extra_key)
                ),
                extra,
            ),
        )

    def side_model(self) -> Trained | None:
        """The side-information model ψ (SimCLR, no labels, on the old training data)."""
        spec = self.scenario.side
        if spec is None:
            return None
        return self._memoized(("side", spec), lambda: self._train_side(spec))

    def _train_side(self, spec: ModelSpec) -> Trained:
        from fct.losses import nt_xent

        with isolated_rng(self._init_seed(spec.as_dict())):
            model = SimCLRModel(self._build_model(spec, num_classes=1), spec.embedding_dim)
        # SimCLR never uses the encoder's classifier: frozen, neither the optimizer nor DDP
        # handle it (it never moved anyway: a parameter without gradient is skipped).
        model.encoder.classifier.requires_grad_(False)
        temperature = float(dict(spec.loss_args).get("temperature", 0.1))
        entry = self._entry("models", self._model_name(spec), self._model_key(spec))

        def fit(e: Entry) -> TrainResult:
            def step(batch, net: nn.Module) -> torch.Tensor:
                (x1, x2), _ = batch  # labels are never used
                z = net(torch.cat([x1, x2]))
                return nt_xent(z[: len(x1)], z[len(x1) :], temperature)

            return self._fit_on_images(model, spec, "simclr", e, step, views=2)

        return self._load_or_train(entry, model, fit, spec)

    def shared_digests(self) -> set[str]:
        """Digests of the scenario's shared models built so far in this context: the old
        model, the new model without any method's loss term (Independent's) and the
        side-information model. Everything else a method deploys was trained for it alone."""
        sc = self.scenario
        keys = [("model", sc.old), ("model", sc.new, "None"), ("side", sc.side)]
        return {self._memo[k].digest for k in keys if self._memo.get(k) is not None}

    def _memoized(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # --- embeddings -------------------------------------------------------------------------

    def embed(
        self, model: Trained, data: str = "eval", view: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of a data split by ``model`` (cached).

        ``data``: "eval" (the evaluation split), "new-train" or "old-train" (the new or old
        model's training data). ``view`` 0 is the images as they are; view v > 0 is the split
        augmented as its model spec trains (draws fixed by the run's seed and v), the same
        augmented images whichever model embeds them.
        """
        spec, split = {
            "eval": (self.scenario.eval, self.scenario.eval.split),
            "new-train": (self.scenario.new, "train"),
            "old-train": (self.scenario.old, "train"),
        }[data]
        # Every model sees images at the size it was trained at.
        size = getattr(model.spec, "image_size", None)
        key = {"model": model.digest, "data": self._data_key(spec, split, size)}
        if view:
            if not isinstance(spec, ModelSpec):
                raise FCTError("augmented views are of training data only, not the eval split")
            key["view"] = {"index": view, "augment": spec.augment, "seed": self.seed}
        return self._memoized(("embed", str(key)), lambda: self._embed(model, spec, split, key))

    def _embed(
        self, model: Trained, spec, split: str, key: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from fct.data import make_loader

        tag = f"-view{key['view']['index']}" if "view" in key else ""
        entry = self._entry("features", f"{model.name}-{spec.dataset}-{split}{tag}", key)

        def build(e: Entry):
            src = self.source(spec, split, size=key["data"]["image_size"])
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
                device=self.device,
                num_workers=loader_workers() if src.images is None else 0,
            )
            log.info(
                "embedding %s (%d images%s) with %s",
                f"{spec.dataset}/{split}",
                len(src),
                f", {distributed.world()} shards" if distributed.active() else "",
                model.name,
            )
            t0 = time.perf_counter()
            feats = embed_loader(model.module, loader, self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            feats = distributed.all_gather_rows(feats, len(src))
            dt = time.perf_counter() - t0
            return (
                {"features": feats, "labels": torch.from_numpy(src.labels)},
                {"images_per_s": len(src) / dt if dt > 0 else None, "n": len(src)},
            )

        tensors, meta, _ = self.cache.get_or_build(entry, build)
        self._memo[("embed-speed", model.digest)] = meta.get("images_per_s")
        return tensors["features"], tensors["labels"]

    def embed_speed(self, model: Trained) -> float | None:
        """Images per second measured when ``model`` embedded a split (the backfill cost)."""
        return self._memo.get(("embed-speed", model.digest))

    # --- transformation ---------------------------------------------------------------------

    def transformation(
        self,
        new: Trained,
        use_side: bool,
        spec: TransformationSpec | None = None,
        name: str = "h",
        extra_key: dict | None = None,
        module: nn.Module | None = None,
        loss: Callable | None = None,
    ) -> Trained:
        """FCT's h: old (+ side) embedding -> new embedding, trained with MSE on embeddings
        of the training data (``spec.train_on``: the new or the old training set), cached
        views or recomputed from augmented images every step (``spec.features``, fct.h_data).

        ``module`` and ``loss(module, old, side, target)`` let a method train its own variant
        through the same cached loop; ``extra_key`` must then say what differs. Under
        torchrun ``loss`` is handed the DistributedDataParallel wrapper of ``module``: compute
        through calls of it (``module(old, side, ...)``), not its other methods, or the
        gradients are not averaged over ranks. A ``loss``
        with a ``labels`` parameter also gets the batch's class labels (int64 ``[N]``, on the
        device) as ``labels=`` (FastFill's classification term needs them).
        """
        from fct.losses import transformation_loss
        from fct.models import Transformation

        spec = spec or self.scenario.transformation
        old = self.old_model()
        side = self.side_model() if use_side else None
        if use_side and side is None:
            raise FCTError(
                f"scenario '{self.scenario.name}' has no side-information model; set side_info = true or use fct"
            )
        if loss is not None or module is not None:  # a method's own h: its source is key
            extra_key = {**(extra_key or {}), "source": source_digest(loss or type(module))}
        key = {
            "h": spec.as_dict(),
            "old": old.digest,
            "new": new.digest,
            "side": side.digest if side else None,
            "seed": self.seed,
            "extra": extra_key,
            "trainer": 1,
        }
        d_side = side.spec.embedding_dim if side else 0
        with isolated_rng(
            self._init_seed(spec.as_dict(), old.spec.embedding_dim, new.spec.embedding_dim, d_side)
        ):
            h = module or Transformation(
                old.spec.embedding_dim, new.spec.embedding_dim, d_side, spec.hidden
            )
        entry = self._entry("transformations", f"{name}-{new.name}{'-side' if side else ''}", key)

        wants_labels = loss is not None and _accepts_labels(loss)

        def fit(e: Entry) -> TrainResult:
            from fct.h_data import h_batches

            batches, steps = h_batches(self, spec, (old, new, side), wants_labels, e.name)
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

            cfg = OptimConfig(
                "adam", spec.lr, 0.0, spec.weight_decay, spec.epochs, spec.warmup_epochs
            )
            return train(
                h,
                step,
                batches,
                steps,
                cfg,
                device=self.device,
                seed=self.seed,
                desc=e.name,
                checkpoint_dir=e.partial,
                on_epoch_start=on_epoch,
                items_per_batch=lambda b: len(b[0]),
            )

        return self._load_or_train(entry, h, fit, spec)


def _accepts_labels(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``labels`` keyword (by name or through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "labels" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )


@torch.inference_mode()
def embed_loader(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    """Embeddings of every batch of ``loader`` (eval mode, no augmentation), on the CPU."""
    import sys

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
